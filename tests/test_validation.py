"""Every bad input at the public boundary raises a clear error naming the argument."""

import pytest
import torch

from llavit_kernels import SpanLayout, modality_linear, modality_qkv, span_attention

IMG = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)


# ----------------------------------------------------------------------------- SpanLayout builders


def test_is_image_wrong_dtype():
    with pytest.raises(TypeError, match=r"is_image: expected dtype in \(bool\), got int64"):
        SpanLayout.from_image_mask(IMG.long())


def test_is_image_wrong_shape():
    with pytest.raises(ValueError, match=r"is_image: expected a 2-D tensor, got shape \(4,\)"):
        SpanLayout.from_image_mask(IMG[0])
    with pytest.raises(ValueError, match=r"is_image: expected a 1-D tensor, got shape \(1, 4\)"):
        SpanLayout.from_packed(IMG, torch.tensor([0, 4], dtype=torch.int32))


def test_attention_mask_wrong_shape():
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 4\).*got \(1, 5\)"):
        SpanLayout.from_image_mask(IMG, torch.ones(1, 5))


def test_attention_mask_wrong_device():
    with pytest.raises(ValueError, match="attention_mask: expected a tensor on cpu, got one on meta"):
        SpanLayout.from_image_mask(IMG, torch.ones(1, 4, device="meta"))


def test_attention_mask_with_hole():
    with pytest.raises(ValueError, match="attention_mask: expected left or right padding.*hole"):
        SpanLayout.from_image_mask(IMG, torch.tensor([[1, 0, 1, 1]]))


def test_attention_mask_left_and_right_padding_are_fine():
    SpanLayout.from_image_mask(IMG, torch.tensor([[0, 1, 1, 1]]))
    SpanLayout.from_image_mask(IMG, torch.tensor([[1, 1, 1, 0]]))


def test_span_ids_mark_text():
    with pytest.raises(ValueError, match="span_ids: expected -1 on every text token"):
        SpanLayout.from_image_mask(IMG, span_ids=torch.tensor([[0, 0, 0, -1]]))


def test_span_ids_negative_on_image():
    with pytest.raises(ValueError, match="span_ids: expected a span id >= 0 on every image token"):
        SpanLayout.from_image_mask(IMG, span_ids=torch.tensor([[-1, -1, 0, -1]]))


def test_span_ids_wrong_shape():
    with pytest.raises(ValueError, match=r"span_ids: expected shape \(1, 4\)"):
        SpanLayout.from_image_mask(IMG, span_ids=torch.tensor([[-1, 0, 0]]))


def test_cu_seqlens_not_starting_at_zero():
    with pytest.raises(ValueError, match=r"cu_seqlens: expected cu_seqlens\[0\] == 0, got 1"):
        SpanLayout.from_packed(IMG[0], torch.tensor([1, 4], dtype=torch.int32))


def test_cu_seqlens_decreasing():
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        SpanLayout.from_packed(IMG[0], torch.tensor([0, 3, 2, 4], dtype=torch.int32))


def test_cu_seqlens_not_ending_at_n():
    with pytest.raises(ValueError, match=r"cu_seqlens: expected cu_seqlens\[-1\] == N == 4.*got 3"):
        SpanLayout.from_packed(IMG[0], torch.tensor([0, 3], dtype=torch.int32))


def test_cu_seqlens_wrong_dtype_and_device():
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype in"):
        SpanLayout.from_packed(IMG[0], torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="cu_seqlens: expected a tensor on cpu, got one on meta"):
        SpanLayout.from_packed(IMG[0], torch.tensor([0, 4], device="meta"))


def test_image_token_id_not_int():
    with pytest.raises(TypeError, match="image_token_id: expected an int, got str"):
        SpanLayout.from_input_ids(torch.zeros(1, 4, dtype=torch.long), "9")


def test_past_length_negative():
    with pytest.raises(ValueError, match="past_length: expected an int >= 0, got -1"):
        SpanLayout.from_image_mask(IMG, past_length=-1)


def test_query_chunk_bad_range():
    layout = SpanLayout.from_image_mask(IMG)
    with pytest.raises(ValueError, match="query_chunk: expected 0 <= start"):
        layout.query_chunk(2, 5)


# ----------------------------------------------------------------------------- span_attention


def qkv(b=1, t=4, h=4, hkv=2, d=8, dtype=torch.float32):
    return torch.randn(b, t, h, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype)


def test_attention_layout_not_a_layout():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="layout: expected a SpanLayout, got Tensor"):
        span_attention(q, k, v, IMG)


def test_attention_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q: expected dtype in .* got int64"):
        span_attention(q.long(), k, v, SpanLayout.from_image_mask(IMG))
    with pytest.raises(TypeError, match="k, v: expected the dtype of q"):
        span_attention(q, k.half(), v, SpanLayout.from_image_mask(IMG))


def test_attention_wrong_rank_and_length():
    q, k, v = qkv()
    layout = SpanLayout.from_image_mask(IMG)
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        span_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match=r"q: expected leading dims \(1, 4\)"):
        span_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match=r"k: expected leading dims \(1, 4\)"):
        span_attention(q, k[:, :3], v[:, :3], layout)


def test_attention_gqa_not_dividing():
    q, k, v = qkv(h=4, hkv=3)
    with pytest.raises(ValueError, match="k: expected a number of KV heads that divides the 4 query heads, got 3"):
        span_attention(q, k, v, SpanLayout.from_image_mask(IMG))


def test_attention_head_dim_mismatch_and_scale():
    q, k, v = qkv()
    layout = SpanLayout.from_image_mask(IMG)
    with pytest.raises(ValueError, match="k: expected head dim 8"):
        span_attention(q, k[..., :4], v[..., :4], layout)
    with pytest.raises(ValueError, match="softmax_scale: expected a positive float"):
        span_attention(q, k, v, layout, softmax_scale=-1.0)


def test_attention_device_mismatch():
    q, k, v = qkv()
    layout = SpanLayout.from_image_mask(IMG.to("meta"))
    with pytest.raises(ValueError, match="q: expected a tensor on meta, got one on cpu"):
        span_attention(q, k, v, layout)


def test_backend_unknown():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend: expected None, 'reference', 'triton', 'composed' or 'cpp', got 'cuda'"):
        span_attention(q, k, v, SpanLayout.from_image_mask(IMG), backend="cuda")


def test_backend_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        span_attention(q, k, v, SpanLayout.from_image_mask(IMG), backend="triton")
    x, w = torch.randn(1, 4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        modality_linear(x, IMG, w, None, w, None, backend="triton")


# ----------------------------------------------------------------------------- modality_linear / qkv


def test_linear_leading_dims_mismatch():
    x, w = torch.randn(1, 5, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"x: expected leading dims \(1, 4\) \(the layout's tokens\)"):
        modality_linear(x, IMG, w, None, w, None)


def test_linear_weight_shapes():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=r"weight_text: expected shape \[out_features, 8\]"):
        modality_linear(x, IMG, torch.randn(6, 7), None, torch.randn(6, 7), None)
    with pytest.raises(ValueError, match="weight_image: expected the shape of weight_text"):
        modality_linear(x, IMG, torch.randn(6, 8), None, torch.randn(5, 8), None)
    with pytest.raises(ValueError, match=r"bias_image: expected shape \[6\], got \(5,\)"):
        modality_linear(x, IMG, torch.randn(6, 8), None, torch.randn(6, 8), torch.randn(5))


def test_linear_dtype_mismatch_and_bad_layout():
    x, w = torch.randn(1, 4, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match=r"weight_text: expected dtype in \(float32\), got float16"):
        modality_linear(x, IMG, w.half(), None, w, None)
    with pytest.raises(TypeError, match="layout: expected a SpanLayout or a bool is_image tensor, got a torch.int64 tensor"):
        modality_linear(x, IMG.long(), w, None, w, None)


def test_qkv_bad_heads_and_rope():
    x = torch.randn(1, 4, 8)
    w = torch.randn((4 + 2 * 2) * 2, 8)
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor of num_heads=4, got 3"):
        modality_qkv(x, IMG, w, None, w, None, 4, 3)
    with pytest.raises(ValueError, match="weight_text: expected out_features divisible by num_heads"):
        modality_qkv(x, IMG, w[:-1], None, w[:-1], None, 4, 2)
    with pytest.raises(ValueError, match="cos, sin: expected both or neither"):
        modality_qkv(x, IMG, w, None, w, None, 4, 2, cos=torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"cos: expected shape \(1, 4, 2\) or \(4, 2\)"):
        modality_qkv(x, IMG, w, None, w, None, 4, 2, cos=torch.ones(4, 3), sin=torch.ones(4, 3))


def test_validate_false_skips_value_checks_only():
    # a hole is not detected without validation (documented: the caller vouches for the input) ...
    SpanLayout.from_image_mask(IMG, torch.tensor([[1, 0, 1, 1]]), validate=False)
    SpanLayout.from_packed(IMG[0], torch.tensor([0, 3, 2, 4], dtype=torch.int32), validate=False)
    # ... but metadata checks still run
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 4\)"):
        SpanLayout.from_image_mask(IMG, torch.ones(1, 5), validate=False)

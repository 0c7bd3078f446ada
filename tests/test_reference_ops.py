"""Reference ops against float64 brute force, forward and every gradient."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from brute_force import attention_float64, modality_linear_float64, packed_mask, padded_mask
from llavit_kernels import SpanLayout, modality_linear, modality_qkv, span_attention
from llavit_kernels.ops.modality_linear import apply_rotary

FP32 = dict(atol=2e-5, rtol=2e-5)


def random_image_mask(batch, length, generator):
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, length, (1,), generator=generator))
        run = int(torch.randint(1, length - start + 1, (1,), generator=generator))
        is_image[b, start:start + run] = True
    return is_image


def grads_of(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward(torch.ones_like(out) * 0 + torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (7, 1)])  # GQA ratios 1, 2, 4, 7
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_span_attention_reference_padded(heads, kv_heads, padding):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, length, dim = 2, 37, 16
    is_image = random_image_mask(batch, length, g)
    attention_mask = None
    if padding is not None:
        attention_mask = torch.ones(batch, length, dtype=torch.int64)
        if padding == "left":
            attention_mask[1, :9] = 0
        else:
            attention_mask[1, -9:] = 0
    layout = SpanLayout.from_image_mask(is_image, attention_mask)
    mask = padded_mask(is_image, attention_mask)
    q = torch.randn(batch, length, heads, dim, generator=g)
    k = torch.randn(batch, length, kv_heads, dim, generator=g)
    v = torch.randn(batch, length, kv_heads, dim, generator=g)
    out, grads = grads_of(lambda a, b, c: span_attention(a, b, c, layout, softmax_scale=0.3), q, k, v)
    want, want_grads = grads_of(lambda a, b, c: attention_float64(a, b, c, mask, softmax_scale=0.3), q, k, v)
    torch.testing.assert_close(out, want.float(), **FP32)
    for name, got, exp in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, exp.float(), **FP32, msg=lambda m: f"d{name}: {m}")
    if padding is not None:  # padding query rows give exactly 0, and their q gets no gradient
        pad_rows = ~attention_mask.bool()
        assert bool((out[pad_rows] == 0).all()) and bool((grads[0][pad_rows] == 0).all())


@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_span_attention_reference_packed(doc_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(doc_lengths).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    is_image = torch.rand(n, generator=g) < 0.5
    layout = SpanLayout.from_packed(is_image, cu)
    mask = packed_mask(is_image, cu)
    q = torch.randn(n, 4, 8, generator=g)
    k = torch.randn(n, 2, 8, generator=g)
    v = torch.randn(n, 2, 8, generator=g)
    out, grads = grads_of(lambda a, b, c: span_attention(a, b, c, layout), q, k, v)
    want, want_grads = grads_of(lambda a, b, c: attention_float64(a, b, c, mask), q, k, v)
    torch.testing.assert_close(out, want.float(), **FP32)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp.float(), **FP32)


def test_span_attention_reference_query_chunk():
    """Queries 20..30 of a 30-token sequence against all 30 cached keys equal rows 20..30 of the full op."""
    g = torch.Generator().manual_seed(3)
    is_image = torch.zeros(1, 30, dtype=torch.bool)
    is_image[0, 22:27] = True
    full = SpanLayout.from_image_mask(is_image)
    chunk = SpanLayout.from_image_mask(is_image[:, 20:], past_length=20)
    q = torch.randn(1, 30, 2, 8, generator=g)
    k = torch.randn(1, 30, 1, 8, generator=g)
    v = torch.randn(1, 30, 1, 8, generator=g)
    torch.testing.assert_close(span_attention(q[:, 20:], k, v, chunk), span_attention(q, k, v, full)[:, 20:], **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_span_attention_reference_low_precision(dtype):
    """Half inputs are computed in fp32 and rounded once: error within a few ulps of the dtype."""
    g = torch.Generator().manual_seed(1)
    is_image = random_image_mask(1, 50, g)
    layout = SpanLayout.from_image_mask(is_image)
    q, k, v = (torch.randn(1, 50, 2, 16, generator=g).to(dtype) for _ in range(3))
    want = attention_float64(q, k, v, padded_mask(is_image))
    err = (span_attention(q, k, v, layout).double() - want).abs().max()
    assert err <= 2 * torch.finfo(dtype).eps * want.abs().max()


@pytest.mark.parametrize("shape", [(37,), (3, 11), (2, 3, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_modality_linear_reference(shape, with_bias):
    g = torch.Generator().manual_seed(len(shape))
    in_f, out_f = 13, 9
    is_image = torch.rand(shape, generator=g) < 0.4
    x = torch.randn(*shape, in_f, generator=g)
    w_t, w_i = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    b_t, b_i = (torch.randn(out_f, generator=g), torch.randn(out_f, generator=g)) if with_bias else (None, None)
    params = [x, w_t, w_i] + ([b_t, b_i] if with_bias else [])

    def ours(x, w_t, w_i, *b):
        return modality_linear(x, is_image, w_t, b[0] if b else None, w_i, b[1] if b else None)

    def brute(x, w_t, w_i, *b):
        return modality_linear_float64(x, is_image, w_t, b[0] if b else None, w_i, b[1] if b else None)

    out, grads = grads_of(ours, *params)
    want, want_grads = grads_of(brute, *params)
    torch.testing.assert_close(out, want.float(), **FP32)
    for got, exp in zip(grads, want_grads):  # dx, dW_text, dW_image (, db_text, db_image)
        torch.testing.assert_close(got, exp.float(), **FP32)
    # a layout works in place of the bool mask
    if len(shape) == 2:
        layout = SpanLayout.from_image_mask(is_image)
        torch.testing.assert_close(modality_linear(x, layout, w_t, b_t, w_i, b_i), out)


def test_modality_qkv_reference_matches_separate_projections():
    g = torch.Generator().manual_seed(5)
    batch, length, hidden, heads, kv_heads, dim = 2, 12, 24, 4, 2, 8
    is_image = random_image_mask(batch, length, g)
    x = torch.randn(batch, length, hidden, generator=g)
    rows = (heads + 2 * kv_heads) * dim
    w_t, w_i = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    b_t, b_i = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    angles = torch.randn(batch, length, dim // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, heads, kv_heads, cos, sin)
    y = modality_linear_float64(x, is_image, w_t, b_t, w_i, b_i)
    q_want, k_want, v_want = y.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q_want = apply_rotary(q_want.reshape(batch, length, heads, dim), cos.double(), sin.double())
    k_want = apply_rotary(k_want.reshape(batch, length, kv_heads, dim), cos.double(), sin.double())
    torch.testing.assert_close(q, q_want.float(), **FP32)
    torch.testing.assert_close(k, k_want.float(), **FP32)
    torch.testing.assert_close(v, v_want.reshape(batch, length, kv_heads, dim).float(), **FP32)
    # rotate-half RoPE on a pair (d, d + D/2) is a 2-D rotation: norms are preserved
    q_plain, _, _ = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, heads, kv_heads)
    torch.testing.assert_close(q.norm(dim=-1), q_plain.norm(dim=-1), **FP32)

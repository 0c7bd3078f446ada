"""Defaults of the padded span-attention path against float64 brute force: ``softmax_scale=None`` means
``1 / sqrt(D)``, on left- and right-padded batches with GQA, forward and every gradient.

(test_reference_ops.py's padded test passes an explicit scale; the default was checked only through
the packed test and through the Triton tests, which compare against the reference's own default.)
"""

import math

import pytest
import torch

from brute_force import attention_float64, padded_mask
from llavit_kernels import SpanLayout, span_attention

from test_reference_ops import FP32, grads_of, random_image_mask  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _padded_inputs(padding, heads, kv_heads, dim, length=29, seed=11, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    is_image = random_image_mask(2, length, g)
    mask = torch.ones(2, length, dtype=torch.int64)
    if padding == "left":
        mask[1, :7] = 0
    else:
        mask[1, -7:] = 0
    q = torch.randn(2, length, heads, dim, generator=g) * 2  # large enough that the scale matters
    k = torch.randn(2, length, kv_heads, dim, generator=g) * 2
    v = torch.randn(2, length, kv_heads, dim, generator=g)
    layout = SpanLayout.from_image_mask(is_image.to(device), mask.to(device))
    return layout, padded_mask(is_image, mask), mask, q, k, v


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (3, 1, 12)])
def test_padded_reference_default_scale_is_one_over_sqrt_head_dim(padding, heads, kv_heads, dim):
    layout, mask, attention_mask, q, k, v = _padded_inputs(padding, heads, kv_heads, dim)
    out, grads = grads_of(lambda a, b, c: span_attention(a, b, c, layout, backend="reference"), q, k, v)
    want, want_grads = grads_of(lambda a, b, c: attention_float64(a, b, c, mask, 1.0 / math.sqrt(dim)), q, k, v)
    torch.testing.assert_close(out, want.float(), **FP32)
    for name, got, exp in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, exp.float(), **FP32, msg=lambda m: f"d{name}: {m}")
    pad_rows = ~attention_mask.bool()
    assert bool((out[pad_rows] == 0).all()) and bool((grads[0][pad_rows] == 0).all())
    # the default is the only scale that matches: 1/D (a plausible slip) does not
    other = span_attention(q, k, v, layout, softmax_scale=1.0 / dim, backend="reference")
    assert (other - out).abs().max() > 1e-2


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_triton_default_scale_is_one_over_sqrt_head_dim(padding):
    """The Triton wrapper computes its own default: checked against brute force, not against the reference."""
    dev = "cuda" if HAS_CUDA else "cpu"
    layout, mask, attention_mask, q, k, v = _padded_inputs(padding, 2, 1, 64, length=21, device=dev)
    out = span_attention(q.to(dev), k.to(dev), v.to(dev), layout, backend="triton")
    want = attention_float64(q, k, v, mask, 1.0 / math.sqrt(64))
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(37,), (3, 11)])
def test_modality_linear_reference_backend_matches_brute_force(shape):
    """backend="reference" (the oracle the Triton tests compare against) itself vs the float64 per-token
    weight pick, forward and every gradient. (backend=None on CPU takes another path, so the
    reference-tier test of the front door no longer reaches the oracle.)"""
    from brute_force import modality_linear_float64
    from llavit_kernels import modality_linear

    g = torch.Generator().manual_seed(len(shape) + 40)
    is_image = torch.rand(shape, generator=g) < 0.4
    x = torch.randn(*shape, 13, generator=g)
    w_t, w_i = torch.randn(9, 13, generator=g), torch.randn(9, 13, generator=g)
    b_t, b_i = torch.randn(9, generator=g), torch.randn(9, generator=g)
    out, grads = grads_of(lambda *a: modality_linear(a[0], is_image, a[1], a[2], a[3], a[4], backend="reference"),
                          x, w_t, b_t, w_i, b_i)
    want, want_grads = grads_of(lambda *a: modality_linear_float64(a[0], is_image, a[1], a[2], a[3], a[4]),
                                x, w_t, b_t, w_i, b_i)
    torch.testing.assert_close(out, want.float(), **FP32)
    for name, got, exp in zip(("dx", "dw_text", "db_text", "dw_image", "db_image"), grads, want_grads):
        torch.testing.assert_close(got, exp.float(), **FP32, msg=lambda m: f"{name}: {m}")

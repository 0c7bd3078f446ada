"""The C++ CPU span-attention kernel (csrc/, backend="cpp") against float64 ground truth.

Forward: float64 brute force (tests/brute_force.py: mask pair by pair, independent of layout.py).
Gradients: the float64 reference, whose mask is checked against the brute-force mask in the same
test. fp32 is held to a tight bound; fp16/bf16 to a small multiple of the error the reference itself
has when run in that dtype (fp32 math, rounded), plus a dtype-sized slack. Outputs of the kernel
start full of NaN (LLAVIT_CPP_POISON=1), so an element it forgets to write fails.

The extension is built once per environment (first test that needs it; ~10-60 s on 2 cores) into
the user cache; the subprocess tests reuse that build (and one checks that it is not rebuilt).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import attention_float64, packed_mask, padded_mask, span_labels
from llavit_kernels import SpanLayout, span_attention
from llavit_kernels.ops import _span_attention_cpp as C
from llavit_kernels.ops.span_attention import span_attention_reference

REPO = Path(__file__).resolve().parents[1]
SLACK = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ERR_FACTOR = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 2.0}

if os.environ.get("LLAVIT_NO_CPP", "0") not in ("", "0"):
    pytest.skip("LLAVIT_NO_CPP is set: the C++ kernel is disabled in this run", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _built():
    # A failing build fails the suite (CI must build csrc/), it does not skip it.
    assert C.load_extension(), f"the C++ extension did not build: {C.cpp_unavailable_reason()}"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("LLAVIT_CPP_POISON", "1")


# ----------------------------------------------------------------------------- layouts
def padded_case(rng: random.Random, batch: int, length: int, image_share=0.4, pad="none", past_length=0):
    """Random images at odd offsets, no/left/right padding, optional cached prefix (query chunk).
    Returns the layout and the brute-force mask [B, Tq, Tk]."""
    img = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pos = rng.randrange(0, 4)
        while pos < length:
            if rng.random() < image_share:
                span = rng.randrange(1, max(2, length // 2))
                img[b, pos:pos + span] = True
                pos += span + rng.randrange(0, 3)
            else:
                pos += rng.randrange(1, 9)
    total = past_length + length
    mask = None
    if pad != "none":
        mask = torch.ones(batch, total, dtype=torch.long)
        for b in range(batch):
            cut = rng.randrange(0, max(1, total // 2))
            if b == 0 and pad == "left" and past_length == 0:
                cut = total  # one fully padded row
            if pad == "left":
                mask[b, :cut] = 0
            else:
                mask[b, total - cut:] = 0
    layout = SpanLayout.from_image_mask(img, mask, past_length=past_length)
    return layout, padded_mask(img, mask, past_length=past_length)


def packed_case(rng: random.Random, doc_lengths, image_share=0.4):
    n = sum(doc_lengths)
    img = torch.zeros(n, dtype=torch.bool)
    pos = 0
    while pos < n:
        if rng.random() < image_share:
            span = rng.randrange(1, 12)
            img[pos:pos + span] = True  # may cross a document edge: the layout splits it
            pos += span
        else:
            pos += rng.randrange(1, 7)
    cu = torch.tensor([0] + torch.tensor(doc_lengths).cumsum(0).tolist(), dtype=torch.int32)
    return SpanLayout.from_packed(img, cu), packed_mask(img, cu)


def unpadded_mask(img: torch.Tensor) -> torch.Tensor:
    """The brute-force rule for one unpadded row, vectorised over pairs (span labels from
    brute_force.span_labels): the Python pair loop is too slow for 1000+ tokens."""
    labels = torch.tensor(span_labels(img[0].tolist(), [False] * img.shape[1]))
    pos = torch.arange(img.shape[1])
    same_span = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    return ((pos[None, :] <= pos[:, None]) | same_span)[None]


def make_qkv(layout, heads, kv_heads, head_dim, dtype, scale=1.0, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    lead_q = (layout.num_queries,) if layout.packed else (layout.batch_size, layout.num_queries)
    lead_k = (layout.num_keys,) if layout.packed else (layout.batch_size, layout.num_keys)
    q = (torch.randn(*lead_q, heads, head_dim, generator=gen) * scale).to(dtype)
    k = (torch.randn(*lead_k, kv_heads, head_dim, generator=gen) * scale).to(dtype)
    v = torch.randn(*lead_k, kv_heads, head_dim, generator=gen).to(dtype)
    do = torch.randn(*lead_q, heads, head_dim, generator=gen).to(dtype)
    return q, k, v, do


# ----------------------------------------------------------------------------- checking
def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(layout, brute_mask, q, k, v, do, softmax_scale=None):
    dtype = q.dtype
    assert torch.equal(layout.dense_mask(), brute_mask), "layout.py and the brute-force mask disagree"
    ours = _fwd_bwd(lambda q, k, v: span_attention(q, k, v, layout, softmax_scale, backend="cpp"), q, k, v, do)
    ref = lambda q, k, v: span_attention_reference(q, k, v, layout, softmax_scale)  # noqa: E731
    gold = _fwd_bwd(ref, q.double(), k.double(), v.double(), do.double())
    brute = attention_float64(q, k, v, brute_mask, softmax_scale)
    low = _fwd_bwd(ref, q, k, v, do)
    assert _err(gold[0], brute) < 1e-12
    for name, o, g, l in zip(("out", "dq", "dk", "dv"), ours, gold, low):
        assert o.dtype == dtype and o.shape == g.shape, (name, o.dtype, o.shape, g.shape)
        assert not torch.isnan(o).any(), f"{name}: NaN (an unwritten element or a NaN in the math)"
        scale = max(g.abs().max().item(), 1.0) if g.numel() else 1.0
        bound = ERR_FACTOR[dtype] * _err(l, g) + SLACK[dtype] * scale
        err = _err(o, g)
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {_err(l, g):.3g})"
    no_keys = layout.kv_start >= layout.kv_end
    assert (ours[0][no_keys] == 0).all() and (ours[1][no_keys] == 0).all()
    no_queries = layout.q_start >= layout.q_end
    assert (ours[2][no_queries] == 0).all() and (ours[3][no_queries] == 0).all()
    return ours


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- oracle suite
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_padded_batch(dtype, pad):
    layout, mask = padded_case(random.Random(len(pad)), batch=2, length=150, pad=pad)  # > one 64-row block
    check(layout, mask, *make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 4), (6, 2), (7, 1)])  # MHA, GQA, MQA
def test_gqa_mqa(heads, kv_heads):
    layout, mask = padded_case(random.Random(heads), batch=1, length=77)
    check(layout, mask, *make_qkv(layout, heads=heads, kv_heads=kv_heads, head_dim=32, dtype=torch.float32))


@pytest.mark.parametrize("head_dim", [1, 8, 24, 80, 96, 128, 130])
def test_odd_head_dims(head_dim):
    layout, mask = padded_case(random.Random(head_dim), batch=1, length=70, pad="left")
    check(layout, mask, *make_qkv(layout, heads=2, kv_heads=1, head_dim=head_dim, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_documents(dtype):
    layout, mask = packed_case(random.Random(7), [130, 1, 222, 0, 17])  # one-token and empty docs too
    check(layout, mask, *make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_chunk_against_a_cache(dtype):
    # Chunked prefill: Tq = 90 queries at key offset 600 (Tk = 690; > one 512-key chunk).
    layout, mask = padded_case(random.Random(3), batch=2, length=90, past_length=600, pad="left")
    assert layout.num_keys == 690 and layout.num_queries == 90
    check(layout, mask, *make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype))


def test_decode_single_query():
    layout, mask = padded_case(random.Random(4), batch=3, length=1, past_length=40, pad="right")
    check(layout, mask, *make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32))


def test_query_chunk_view_of_full_layout():
    img = torch.zeros(1, 700, dtype=torch.bool)
    img[0, 5:17] = True
    img[0, 400:650] = True
    full = SpanLayout.from_image_mask(img)
    chunk = full.query_chunk(300, 380)  # the long image ends inside the chunk
    mask = unpadded_mask(img)[:, 300:680, :680]
    check(chunk, mask, *make_qkv(chunk, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["all_image", "no_image"])
def test_all_image_and_no_image(kind):
    img = torch.full((1, 600), kind == "all_image", dtype=torch.bool)  # all image: full blocks, 2 chunks
    layout = SpanLayout.from_image_mask(img)
    check(layout, unpadded_mask(img), *make_qkv(layout, heads=2, kv_heads=2, head_dim=16, dtype=torch.float32))


def test_long_image_span_long_sequence():
    # 1300 tokens, images at 40 (576 tokens) and 900 (300): several query blocks and key chunks,
    # unmasked chunks inside the span and the causal diagonal crossing chunk edges.
    img = torch.zeros(1, 1300, dtype=torch.bool)
    img[0, 40:616] = True
    img[0, 900:1200] = True
    layout = SpanLayout.from_image_mask(img)
    check(layout, unpadded_mask(img), *make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32))


def test_softmax_scale_and_large_logits():
    layout, mask = padded_case(random.Random(5), batch=1, length=100)
    check(layout, mask, *make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32, scale=4.0),
          softmax_scale=0.3)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    length=st.integers(1, 200),
    past=st.sampled_from([0, 0, 37]),
    pad=st.sampled_from(["none", "left", "right"]),
    share=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    dims=st.sampled_from([(2, 1, 64), (3, 3, 48), (4, 1, 20)]),
)
def test_fuzzed_padded_layouts(seed, length, past, pad, share, dims):
    layout, mask = padded_case(random.Random(seed), batch=2, length=length, image_share=share, pad=pad,
                               past_length=past)
    heads, kv_heads, dim = dims
    check(layout, mask, *make_qkv(layout, heads=heads, kv_heads=kv_heads, head_dim=dim, dtype=torch.float32,
                                  seed=seed))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), docs=st.lists(st.integers(0, 150), min_size=1, max_size=4))
def test_fuzzed_packed_layouts(seed, docs):
    if sum(docs) == 0:
        docs = docs + [5]
    layout, mask = packed_case(random.Random(seed), docs)
    check(layout, mask, *make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32, seed=seed))


# ----------------------------------------------------------------------------- bf16 block products
def _avx512_cpu() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= C._cpu_flags()


def test_micro_kernels_engage_where_the_cpu_has_them(monkeypatch):
    """oneDNN's bf16 micro-kernel needs AVX-512, its fp32 one AVX2 (and oneDNN on);
    LLAVIT_CPP_NO_BRGEMM=1 turns both off."""
    monkeypatch.delenv("LLAVIT_CPP_NO_BRGEMM", raising=False)
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    assert C.bf16_block_products() == (_avx512_cpu() and onednn)
    assert C.f32_block_products() == ({"avx2", "fma"} <= C._cpu_flags() and onednn)
    monkeypatch.setenv("LLAVIT_CPP_NO_BRGEMM", "1")
    assert not C.bf16_block_products() and not C.f32_block_products()
    monkeypatch.delenv("LLAVIT_CPP_NO_BRGEMM")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not C.bf16_block_products() and not C.f32_block_products()


@pytest.mark.parametrize("dtype,products", [(torch.bfloat16, "micro-kernel"), (torch.bfloat16, "mm"),
                                            (torch.float32, "micro-kernel"), (torch.float32, "mm")])
@pytest.mark.parametrize("case", ["odd_offsets", "long_chunks", "query_chunk", "packed"])
def test_both_product_paths(monkeypatch, dtype, products, case):
    """Block products on oneDNN's micro-kernels (bf16: pair-packed K/V, P and dS rounded to bf16;
    fp32: K^T / V^T transposed) and through at::mm_out (bf16 converted to fp32), each against the
    float64 oracle: odd block sizes, chunks starting at odd keys (rounded down to a pair in bf16),
    several 512-key chunks, a query chunk, packed documents."""
    native = C.bf16_block_products if dtype == torch.bfloat16 else C.f32_block_products
    if products == "micro-kernel":
        monkeypatch.delenv("LLAVIT_CPP_NO_BRGEMM", raising=False)
        if not native():
            pytest.skip(f"no {dtype} micro-kernel on this CPU (oneDNN; bf16 needs AVX-512, fp32 AVX2)")
    else:
        monkeypatch.setenv("LLAVIT_CPP_NO_BRGEMM", "1")
        assert not native()
    rng = random.Random(hash(case) % 1000)
    if case == "odd_offsets":  # left padding of 37 and 1 tokens: every key range starts at an odd key
        img = torch.zeros(2, 133, dtype=torch.bool)
        img[0, 50:91] = True
        img[1, 1:100] = True
        attn = torch.ones(2, 133, dtype=torch.long)
        attn[0, :37] = 0
        attn[1, :1] = 0
        layout, mask = SpanLayout.from_image_mask(img, attn), padded_mask(img, attn)
    elif case == "long_chunks":
        img = torch.zeros(1, 1131, dtype=torch.bool)
        img[0, 37:613] = True  # a 576-token image at an odd offset: chunks start at odd keys
        img[0, 801:1001] = True
        layout, mask = SpanLayout.from_image_mask(img), unpadded_mask(img)
    elif case == "query_chunk":
        layout, mask = padded_case(rng, batch=2, length=71, past_length=555, pad="right")
    else:
        layout, mask = packed_case(rng, [131, 1, 260, 17])
    check(layout, mask, *make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accumulator_per_kv_head_and_per_query_head(threads, dtype):
    """GQA, batch 2 x 2 KV heads: with 1 thread the backward accumulates dK/dV per KV head (the group's
    query heads in turn), with 8 threads (more than the 4 KV-head tasks) per query head, summed at
    the end; both against the float64 oracle."""
    layout, mask = padded_case(random.Random(41), batch=2, length=150, pad="left")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(layout, mask, *make_qkv(layout, heads=6, kv_heads=2, head_dim=64, dtype=dtype))
    finally:
        torch.set_num_threads(before)


def test_strided_inputs():
    # q, k, v as head slices of one fused tensor, a transposed grad_out.
    layout, mask = padded_case(random.Random(31), batch=2, length=70, pad="left")
    heads, kv_heads, dim = 4, 2, 32
    gen = torch.Generator().manual_seed(4)
    fused = torch.randn(2, 70, heads + 2 * kv_heads, dim, generator=gen)
    do = torch.randn(2, heads, 70, dim, generator=gen).transpose(1, 2)

    def run(fn, fused):
        fused = fused.detach().clone().requires_grad_()
        q, k, v = fused[:, :, :heads], fused[:, :, heads:heads + kv_heads], fused[:, :, heads + kv_heads:]
        out = fn(q, k, v)
        return out.detach(), torch.autograd.grad(out, fused, do)[0]

    ours = run(lambda q, k, v: span_attention(q, k, v, layout, backend="cpp"), fused)
    gold = run(lambda q, k, v: span_attention_reference(q, k, v, layout), fused.double())
    for o, g in zip(ours, gold):
        assert _err(o, g) <= SLACK[torch.float32] * max(g.abs().max().item(), 1.0)


def test_backward_is_deterministic():
    layout, _ = padded_case(random.Random(13), batch=1, length=300)
    q, k, v, do = make_qkv(layout, heads=4, kv_heads=1, head_dim=64, dtype=torch.float32)
    fn = lambda q, k, v: span_attention(q, k, v, layout, backend="cpp")  # noqa: E731
    for a, b in zip(_fwd_bwd(fn, q, k, v, do), _fwd_bwd(fn, q, k, v, do)):
        assert torch.equal(a, b)


def test_lse_and_its_gradient_and_external_out_lse():
    # lse = logsumexp of the allowed scaled scores (+inf without keys); a gradient into lse is
    # handled; the backward op with the output and lse passed in is what autograd uses.
    layout, mask = padded_case(random.Random(17), batch=2, length=90, pad="left")
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    scale = 1 / 8.0
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(2, dim=2)) * scale
    m = mask[:, None]
    has = m.any(-1).expand(2, 2, 90)
    lse_gold = torch.logsumexp(scores.masked_fill(~m, float("-inf")), dim=-1)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = C.span_attention_cpp_with_lse(q2, k2, v2, layout, scale)
    assert lse.shape == (2, 2, 90) and lse.dtype == torch.float32
    assert torch.isinf(lse[~has]).all() and (lse[~has] > 0).all()
    torch.testing.assert_close(lse[has].double(), lse_gold[has], atol=1e-5, rtol=1e-5)
    weights = torch.randn(lse.shape, dtype=torch.float64)
    gq, gk = torch.autograd.grad((lse.double()[has] * weights[has]).sum() + (out.double() * do.double()).sum(), (q2, k2))
    out_gold = span_attention_reference(qd, kd, vd, layout, scale)
    lse_term = (torch.where(has, lse_gold, 0.0) * torch.where(has, weights, 0.0)).sum()
    gq_gold, gk_gold = torch.autograd.grad(lse_term + (out_gold * do.double()).sum(), (qd, kd))
    torch.testing.assert_close(gq.double(), gq_gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk.double(), gk_gold, atol=1e-5, rtol=1e-5)


def test_packed_lse_shape():
    layout, _ = packed_case(random.Random(2), [20, 30])
    q, k, v, _ = make_qkv(layout, heads=3, kv_heads=1, head_dim=16, dtype=torch.bfloat16)
    out, lse = C.span_attention_cpp_with_lse(q, k, v, layout)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (3, 50)


# ----------------------------------------------------------------------------- errors
def test_float64_and_wrong_device_rejected():
    layout = SpanLayout.from_image_mask(torch.zeros(1, 8, dtype=torch.bool))
    q = torch.randn(1, 8, 2, 64, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='cpp' supports dtypes float16, bfloat16 and float32, got float64"):
        span_attention(q, q, q, layout, backend="cpp")
    meta = SpanLayout.from_image_mask(torch.zeros(1, 8, dtype=torch.bool, device="meta"))
    qm = torch.randn(1, 8, 2, 64, device="meta")
    with pytest.raises(RuntimeError, match="backend='cpp' runs on CPU tensors, got a meta tensor"):
        span_attention(qm, qm, qm, meta, backend="cpp")


# ----------------------------------------------------------------------------- custom op / compile
def _op_args(requires_grad=False):
    layout, _ = padded_case(random.Random(21), batch=1, length=70, pad="left")
    q, k, v, _ = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    return layout, (q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, 0.125)


def test_opcheck_forward_op():
    _, args = _op_args(requires_grad=True)
    torch.library.opcheck(
        torch.ops.llavit.span_attention_cpp_fwd.default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_opcheck_backward_op():
    layout, args = _op_args()
    q, k, v = args[:3]
    out, lse = torch.ops.llavit.span_attention_cpp_fwd(*args)
    do = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        bargs = (do, dlse, q, k, v, out, lse, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, 0.125)
        torch.library.opcheck(
            torch.ops.llavit.span_attention_cpp_bwd.default, bargs, test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    layout, _ = padded_case(random.Random(23), batch=2, length=60, pad="right")
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)

    def step(q, k, v, kv_start, kv_end, q_start, q_end):
        lay = SpanLayout(layout.is_image, kv_start, kv_end, q_start, q_end, None, 0)
        return span_attention(q * 1.0, k, v, lay, backend="cpp").sum(dim=-1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = compiled(q1, k1, v1, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end)
    grads = torch.autograd.grad(out, (q1, k1, v1), do.sum(-1))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = span_attention_reference(q2, k2, v2, layout).sum(dim=-1)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), do.sum(-1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- build: fallback, cache
def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=600, cwd=str(REPO))


def test_fallback_when_disabled():
    result = _run(
        """
        import warnings, torch
        from llavit_kernels import SpanLayout, span_attention
        from llavit_kernels.ops import _span_attention_cpp as C
        from llavit_kernels.ops.span_attention import span_attention_reference
        img = torch.zeros(1, 20, dtype=torch.bool); img[0, 3:9] = True
        layout = SpanLayout.from_image_mask(img)
        q = torch.randn(1, 20, 2, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = span_attention(q, q, q, layout, backend="cpp")
            b = span_attention(q, q, q, layout, backend="cpp")
        msgs = [str(w.message) for w in caught if "C++ CPU kernel is unavailable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "LLAVIT_NO_CPP" in msgs[0], msgs
        assert torch.equal(a, span_attention(q, q, q, layout, backend="composed")) and torch.equal(a, b)
        torch.testing.assert_close(a, span_attention_reference(q, q, q, layout), rtol=1e-5, atol=1e-5)
        assert torch.equal(span_attention(q, q, q, layout), a)  # backend=None: composed, no second warning
        assert not C.cpp_available() and "LLAVIT_NO_CPP" in C.cpp_unavailable_reason()
        print("FALLBACK-OK")
        """,
        LLAVIT_NO_CPP="1",
    )
    assert "FALLBACK-OK" in result.stdout, result.stdout + result.stderr
    assert C.BUILD_MESSAGE not in result.stderr


def test_second_process_loads_cached_build():
    # This process built (or loaded) the extension in the fixture; a fresh process must find it.
    name = C.build_name(C._source_path(), C.build_flags())
    library = C.cache_dir() / name / f"{name}.so"
    assert library.is_file()
    before = library.stat().st_mtime_ns
    result = _run(
        """
        import time, torch
        from llavit_kernels.ops import _span_attention_cpp as C
        t0 = time.perf_counter()
        assert C.load_extension(), C.cpp_unavailable_reason()
        print(f"LOADED {time.perf_counter() - t0:.3f}")
        """
    )
    assert "LOADED" in result.stdout, result.stdout + result.stderr
    assert C.BUILD_MESSAGE not in result.stderr, "the second process compiled again"
    assert library.stat().st_mtime_ns == before, "the cached library was rebuilt"
    seconds = float(result.stdout.split("LOADED")[1].split()[0])
    assert seconds < 8.0, f"loading the cached build took {seconds:.1f} s"

"""Composed span attention (causal engine + image-span completion, merged by log-sum-exp).

Ground truth: the float64 brute force of tests/brute_force.py (the mask evaluated pair by pair from
the rule, independent of SpanLayout) for the forward; the gradients come from autograd through a
float64 dense softmax under that same brute-force mask. Half precision follows the project's rule:
the error against float64 stays within a small multiple of the error PyTorch's own computation in
that dtype (the reference) has, plus a dtype-sized slack. Padding rows are checked to be exactly 0
(output and dq) and keys no query sees get exactly 0 dk/dv.

The CPU tier (CPU tensors, on every machine) runs the ``cpu_flash`` engine; the GPU tier
(bench/gpu_check.sh) runs every CUDA engine present on CUDA tensors, skipped without a GPU.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import brute_force as bf
from llavit_kernels import SpanLayout, span_attention
from llavit_kernels.ops import _causal_engines as E
from llavit_kernels.ops import _span_attention_composed as C
from llavit_kernels.ops.span_attention import span_attention_reference

HAS_CUDA = torch.cuda.is_available()
# The CPU tier runs on CPU tensors on every machine (the CPU composed path exists there too); the
# GPU tier at the bottom builds its own CUDA tensors.
DEVICE = "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (GPU tier)")
SLACK = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


# ----------------------------------------------------------------------------- layouts + brute force
class Case:
    """A layout with its brute-force mask, built from the same raw description."""

    def __init__(self, is_image, attention_mask=None, past_length=0, cu_seqlens=None, device=DEVICE):
        self.raw = (is_image, attention_mask, past_length, cu_seqlens)
        if cu_seqlens is not None:
            self.layout = SpanLayout.from_packed(is_image.to(device), cu_seqlens.to(device))
            self.mask = bf.packed_mask(is_image, cu_seqlens)
        else:
            am = None if attention_mask is None else attention_mask.to(device)
            self.layout = SpanLayout.from_image_mask(is_image.to(device), am, past_length=past_length)
            self.mask = bf.padded_mask(is_image, attention_mask, past_length=past_length)


def random_padded(rng, batch, length, pad="none", past_length=0, image_share=0.4, edges=False, device=DEVICE):
    img = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pos = 0 if edges else rng.randrange(0, 4)
        while pos < length:
            if rng.random() < image_share:
                span = rng.randrange(1, max(2, length // 2))
                img[b, pos:pos + span] = True
                pos += span + rng.randrange(0, 3)
            else:
                pos += rng.randrange(1, 9)
        if edges:
            img[b, 0] = img[b, -1] = True  # image as first and last token
    mask = None
    if pad != "none":
        total = past_length + length
        mask = torch.ones(batch, total, dtype=torch.long)
        for b in range(batch):
            cut = rng.randrange(0, max(1, total // 2))
            if pad == "left":
                mask[b, :cut] = 0
            else:
                mask[b, total - cut:] = 0
    return Case(img, mask, past_length, device=device)


def random_packed(rng, doc_lengths, image_share=0.4, device=DEVICE):
    n = sum(doc_lengths)
    img = torch.zeros(n, dtype=torch.bool)
    pos = 0
    while pos < n:
        if rng.random() < image_share:
            span = rng.randrange(1, 12)
            img[pos:pos + span] = True
            pos += span
        else:
            pos += rng.randrange(1, 7)
    cu = torch.tensor([0] + torch.tensor(doc_lengths).cumsum(0).tolist(), dtype=torch.int32)
    return Case(img, cu_seqlens=cu, device=device)


def make_qkv(layout, heads, kv_heads, head_dim, dtype, seed=1234):
    device = layout.device
    gen = torch.Generator().manual_seed(seed)
    if layout.packed:
        q_shape, k_shape = (layout.num_queries, heads, head_dim), (layout.num_keys, kv_heads, head_dim)
    else:
        q_shape = (layout.batch_size, layout.num_queries, heads, head_dim)
        k_shape = (layout.batch_size, layout.num_keys, kv_heads, head_dim)
    q, k, v, do = (torch.randn(s, generator=gen).to(device, dtype) for s in (q_shape, k_shape, k_shape, q_shape))
    return q, k, v, do


def dense_float64(q, k, v, mask, scale=None):
    """Differentiable float64 softmax attention under a dense bool mask; rows without keys give 0."""
    packed = q.dim() == 3
    if packed:
        q, k, v, mask = q[None], k[None], v[None], mask[None]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    kh = k.transpose(1, 2).repeat_interleave(groups, 1)
    vh = v.transpose(1, 2).repeat_interleave(groups, 1)
    s = torch.matmul(q.transpose(1, 2), kh.transpose(-1, -2)) * scale
    m = mask[:, None].to(s.device)
    has = m.any(-1, keepdim=True)
    s = torch.where(m, s, torch.where(has, float("-inf"), 0.0))
    out = (torch.matmul(torch.softmax(s, -1) * has, vh)).transpose(1, 2)
    return out[0] if packed else out


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), do)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(case, q, k, v, do, scale=None, err_factor=3.0, **kw):
    layout = case.layout
    dtype = q.dtype
    ours = _grads(lambda q, k, v: span_attention(q, k, v, layout, scale, backend="composed", **kw), q, k, v, do)
    gold = _grads(lambda q, k, v: dense_float64(q, k, v, case.mask, scale), q.double(), k.double(), v.double(),
                  do.double())
    brute = bf.attention_float64(q.double().cpu(), k.double().cpu(), v.double().cpu(), case.mask, scale)
    assert _err(gold[0].cpu(), brute) < 1e-12  # the differentiable gold is the brute force
    low = _grads(lambda q, k, v: span_attention_reference(q, k, v, layout, scale), q, k, v, do)
    for name, o, g, lo in zip(("out", "dq", "dk", "dv"), ours, gold, low):
        assert o.dtype == dtype and o.shape == g.shape, (name, o.dtype, o.shape, g.shape)
        assert not torch.isnan(o).any(), f"{name}: NaN"
        mag = max(g.abs().max().item(), 1.0) if g.numel() else 1.0
        bound = err_factor * _err(lo, g) + SLACK[dtype] * mag
        err = _err(o, g)
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {_err(lo, g):.3g})"
    no_keys = layout.kv_start >= layout.kv_end
    assert (ours[0][no_keys] == 0).all() and (ours[1][no_keys] == 0).all()
    no_queries = layout.q_start >= layout.q_end
    assert (ours[2][no_queries] == 0).all() and (ours[3][no_queries] == 0).all()
    return ours


# ----------------------------------------------------------------------------- layout parts
@pytest.mark.parametrize("seed", range(12))
def test_completion_and_causal_part_partition_the_mask(seed):
    rng = random.Random(seed)
    kind = seed % 4
    if kind == 3:
        case = random_packed(rng, [rng.randrange(0, 20) for _ in range(3)])
    else:
        case = random_padded(rng, 2, rng.randrange(1, 40), pad=("none", "left", "right")[kind],
                             past_length=rng.choice([0, 5]))
    full = case.layout
    comp, causal = full.span_completion(), full.causal_part()
    mc, mp = comp.dense_mask(), causal.dense_mask()
    assert torch.equal((mc | mp).cpu(), case.mask) and not (mc & mp).any()
    # The per-key intervals describe the same masks (the backward walks them).
    assert torch.equal(mc, comp.dense_mask_from_key_intervals())
    assert torch.equal(mp, causal.dense_mask_from_key_intervals())
    # The completion of a query is (q, span_end): never a key at or before the query.
    pos = torch.arange(full.num_queries, device=full.device) + full.query_offset
    has = comp.kv_end > comp.kv_start
    assert (comp.kv_start[has] == (pos.expand_as(comp.kv_start) + 1)[has]).all()


# ----------------------------------------------------------------------------- CPU (and GPU) tier
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_padded_batch(dtype, pad):
    rng = random.Random(len(pad))
    case = random_padded(rng, batch=3, length=41, pad=pad)
    check(case, *make_qkv(case.layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_packed_documents(dtype):
    case = random_packed(random.Random(7), [13, 1, 22, 0, 17])  # a one-token and an empty document
    check(case, *make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1), (14, 2)])
def test_gqa_and_mqa(heads, kv_heads):
    case = random_padded(random.Random(heads), batch=2, length=29, pad="left")
    check(case, *make_qkv(case.layout, heads=heads, kv_heads=kv_heads, head_dim=64, dtype=torch.float32))


@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128, 40, 100, 17])
def test_head_dims(head_dim):
    case = random_padded(random.Random(head_dim), batch=2, length=33, pad="right")
    check(case, *make_qkv(case.layout, heads=4, kv_heads=2, head_dim=head_dim, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["all_image", "no_image", "edges", "all_image_left_pad"])
def test_special_rows(kind):
    if kind == "edges":
        case = random_padded(random.Random(5), batch=2, length=37, edges=True)
    else:
        img = torch.full((2, 30), kind != "no_image", dtype=torch.bool)
        mask = None
        if kind == "all_image_left_pad":
            mask = torch.ones(2, 30, dtype=torch.long)
            mask[0, :7] = 0
            mask[1, :] = 0  # a fully padded row
        case = Case(img, mask)
    check(case, *make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("pad", ["none", "left"])
def test_query_chunk_against_cache(dtype, pad):
    case = random_padded(random.Random(3), batch=2, length=20, past_length=29, pad=pad)
    check(case, *make_qkv(case.layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))


def test_query_chunk_view_of_full_layout():
    img = torch.zeros(1, 60, dtype=torch.bool)
    img[0, 5:17] = True
    img[0, 40:47] = True
    full = SpanLayout.from_image_mask(img.to(DEVICE))
    chunk = full.query_chunk(20, 30)
    q, k, v, do = make_qkv(chunk, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    ours = _grads(lambda q, k, v: span_attention(q, k, v, chunk, backend="composed"), q, k, v, do)
    mask = bf.padded_mask(img, past_length=0)[:, 20:50, :50]
    gold = _grads(lambda q, k, v: dense_float64(q, k, v, mask), q.double(), k.double(), v.double(), do.double())
    for o, g in zip(ours, gold):
        assert _err(o, g) < 1e-4


def test_softmax_scale_and_large_logits():
    case = random_padded(random.Random(9), batch=1, length=50, pad="left")
    q, k, v, do = make_qkv(case.layout, heads=2, kv_heads=2, head_dim=64, dtype=torch.float32)
    # Scores in the tens: the merge must stay stable (no inf/NaN). The bound is looser than elsewhere:
    # the fp32 flash kernel's blocked exp/accumulation order differs from the dense reference's and
    # peaked softmax rows amplify that (measured 1.5e-4 on dv of magnitude ~4).
    check(case, q * 4, k * 4, v, do, scale=0.3, err_factor=20.0)


@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["none", "left", "right", "packed", "chunk"]),
    length=st.integers(1, 40),
    groups=st.sampled_from([1, 2, 3]),
)
def test_fuzzed_layouts(seed, kind, length, groups):
    rng = random.Random(seed)
    if kind == "packed":
        case = random_packed(rng, [rng.randrange(0, length + 1) for _ in range(rng.randrange(1, 4))])
    elif kind == "chunk":
        case = random_padded(rng, 2, length, pad=rng.choice(["none", "left"]), past_length=rng.randrange(1, 9))
    else:
        case = random_padded(rng, 2, length, pad=kind, image_share=rng.choice([0.2, 0.5, 0.9]))
    if case.layout.num_queries == 0:
        return
    check(case, *make_qkv(case.layout, heads=2 * groups, kv_heads=2, head_dim=32, dtype=torch.float32, seed=seed))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_engine_modes(monkeypatch, native, dtype):
    # Half inputs run the flash kernel natively where the CPU supports it, else in fp32 (forced
    # here with False); both paths, with padding and a cache chunk.
    if native and not (E.CPU_NATIVE_BF16 if dtype == torch.bfloat16 else E.CPU_NATIVE_FP16):
        pytest.skip(f"this CPU has no native {dtype} dot product")
    monkeypatch.setattr(E, "CPU_HALF_NATIVE_ENGINE", native)
    assert E.cpu_compute_dtype(dtype) == (dtype if native else torch.float32)
    case = random_padded(random.Random(4), batch=2, length=41, pad="left")
    check(case, *make_qkv(case.layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))
    chunk = random_padded(random.Random(14), batch=2, length=20, past_length=9, pad="left")
    check(chunk, *make_qkv(chunk.layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))


# ----------------------------------------------------------------------------- front door
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("needs_grad", [False, True])
@pytest.mark.parametrize("cpp_builds", [True, False])
@pytest.mark.parametrize("bf16_native", [True, False])
def test_cpu_default_follows_the_table(monkeypatch, dtype, needs_grad, cpp_builds, bf16_native):
    """backend=None on CPU runs CPU_DEFAULT's choice for (dtype, grad needed), CPU_DEFAULT_BF16_CONVERTED's
    where the C++ kernel converts bf16 blocks to fp32; without the C++ build, composed."""
    if dtype != torch.bfloat16 and not bf16_native:
        pytest.skip("bf16_native only matters for bfloat16")
    front = importlib.import_module("llavit_kernels.ops.span_attention")  # the package exports a function of that name
    from llavit_kernels.ops import _span_attention_cpp as cpp

    case = random_padded(random.Random(2), batch=2, length=30, pad="left")
    q, k, v, _ = make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    q.requires_grad_(needs_grad)
    calls = []
    real_composed, real_cpp = C.span_attention_composed, cpp.span_attention_cpp
    monkeypatch.setattr(C, "span_attention_composed", lambda *a, **kw: calls.append("composed") or real_composed(*a, **kw))
    monkeypatch.setattr(cpp, "span_attention_cpp", lambda *a, **kw: calls.append("cpp") or real_cpp(*a, **kw))
    monkeypatch.setattr(cpp, "cpp_available", lambda: cpp_builds)
    monkeypatch.setattr(cpp, "warn_unavailable", lambda *a, **kw: None)
    monkeypatch.setattr(cpp, "bf16_block_products", lambda: bf16_native)

    def table(grad):
        if (dtype, grad) in front.CPU_DEFAULT_BF16_CONVERTED and not bf16_native:
            return front.CPU_DEFAULT_BF16_CONVERTED[(dtype, grad)]
        return front.CPU_DEFAULT.get((dtype, grad), "composed")

    planned = table(needs_grad)
    if cpp_builds and planned == "cpp" and not real_cpp_available():
        pytest.skip("the C++ kernel does not build on this machine")
    out = span_attention(q, k, v, case.layout)
    assert calls == [planned if cpp_builds else "composed"]
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 1e-5)
    torch.testing.assert_close(out.double(), span_attention_reference(q, k, v, case.layout).double(), atol=tol, rtol=tol)
    with torch.no_grad():  # no gradient needed: the forward-only choice
        calls.clear()
        span_attention(q, k, v, case.layout)
        assert calls == [table(False) if cpp_builds else "composed"]


def real_cpp_available():
    from llavit_kernels.ops import _span_attention_cpp as cpp

    return cpp.load_extension()


def test_causal_engine_with_the_cpu_default():
    """causal_engine= with backend=None on CPU runs the composed path with that engine."""
    case = random_padded(random.Random(3), batch=1, length=12)
    q, k, v, _ = make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    if DEVICE != "cpu":
        pytest.skip("the CPU default")
    out = span_attention(q, k, v, case.layout, causal_engine="cpu_flash")
    torch.testing.assert_close(out, span_attention_reference(q, k, v, case.layout), atol=1e-5, rtol=1e-5)


def test_causal_engine_errors():
    case = random_padded(random.Random(2), batch=1, length=10)
    q, k, v, _ = make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="causal_engine: expected None or one of"):
        span_attention(q, k, v, case.layout, backend="composed", causal_engine="nope")
    with pytest.raises(ValueError, match="causal_engine: only used by backend='composed'"):
        span_attention(q, k, v, case.layout, backend="reference", causal_engine="cpu_flash")
    other = "cudnn" if DEVICE == "cpu" else "cpu_flash"
    with pytest.raises(ValueError, match=f"causal_engine='{other}' does not cover this call"):
        span_attention(q, k, v, case.layout, backend="composed", causal_engine=other)


def test_lse_matches_reference_logsumexp():
    case = random_padded(random.Random(8), batch=2, length=25, pad="left")
    layout = case.layout
    q, k, v, _ = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float64)
    _, lse = C.span_attention_composed_with_lse(q, k, v, layout)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) / 8.0
    m = case.mask[:, None].to(s.device)
    gold = torch.logsumexp(s.masked_fill(~m, float("-inf")), -1)
    gold = torch.where(m.any(-1), gold, float("inf"))
    assert torch.allclose(lse, gold, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- custom ops
def _op_args(dtype=torch.float32, packed=False, requires_grad=False):
    rng = random.Random(12)
    case = random_packed(rng, [9, 0, 14]) if packed else random_padded(rng, 2, 23, pad="left")
    layout = case.layout
    q, k, v, do = make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    comp = layout.span_completion()
    engine = C._engine_for(q, k, layout, None)
    args = (q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, comp.kv_start, comp.q_start,
            comp.q_end, layout.cu_seqlens, layout.query_offset, 0.125, engine)
    return layout, args, do


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    _, args, do = _op_args(packed=packed, requires_grad=True)
    torch.library.opcheck(torch.ops.llavit.span_attention_composed_fwd.default, args)
    out, lse = torch.ops.llavit.span_attention_composed_fwd(*args)
    q, k, v = args[:3]
    bwd_args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(torch.ops.llavit.span_attention_composed_bwd.default, bwd_args)


def test_torch_compile_fullgraph_forward_backward():
    case = random_padded(random.Random(13), batch=2, length=27, pad="left")
    layout = case.layout
    q, k, v, do = make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32)

    def fn(q, k, v):
        return span_attention(q, k, v, layout, backend="composed")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = _grads(fn, q, k, v, do)
    traced = _grads(compiled, q, k, v, do)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- GPU tier: every engine
CUDA_ENGINE_NAMES = [e.name for e in E.CUDA_ENGINES]


@requires_cuda
@pytest.mark.parametrize("engine", CUDA_ENGINE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "left", "right", "packed"])
def test_gpu_engine(engine, dtype, kind, monkeypatch):
    reason = E.ENGINES[engine].supports(torch.device("cuda"), dtype, 128, 7, kind == "packed", 0)
    if reason is not None:
        pytest.skip(reason)
    from llavit_kernels.ops import _span_attention_triton as T

    monkeypatch.setattr(T, "POISON_OUTPUTS", True)
    rng = random.Random(hash((engine, kind)) % 1000)
    case = random_packed(rng, [150, 1, 200, 0, 97], device="cuda") if kind == "packed" else \
        random_padded(rng, batch=2, length=203, pad=kind, device="cuda")
    check(case, *make_qkv(case.layout, heads=28, kv_heads=4, head_dim=128, dtype=dtype), causal_engine=engine)


@requires_cuda
def test_gpu_query_chunk_is_not_covered_by_composed():
    case = random_padded(random.Random(1), batch=1, length=20, past_length=29, device="cuda")
    q, k, v, _ = make_qkv(case.layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="query chunks"):
        span_attention(q, k, v, case.layout, backend="composed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["cpp", "flash", "dense"])
def test_cpu_completion_blocks_each_engine(monkeypatch, dtype, blocks):
    # The CPU completion runs each span block on the C++ kernel when it is built, else on the flash
    # kernel with tokens reversed, else as dense per-span blocks (a torch without that kernel): all exact.
    from llavit_kernels.ops import _span_attention_cpp as cpp

    if blocks == "cpp" and not cpp.load_extension():
        pytest.skip("the C++ kernel does not build here")
    monkeypatch.setattr(C, "USE_CPP_BLOCKS", blocks == "cpp")
    monkeypatch.setattr(C, "USE_FLASH_BLOCKS", blocks == "flash")
    used = []
    for name in ("_cpp_completion_merge", "_cpp_completion_backward"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _real=real, _name=name, **kw: used.append(_name) or _real(*a, **kw))
    case = random_padded(random.Random(6), batch=2, length=41, pad="left", past_length=0)
    check(case, *make_qkv(case.layout, heads=4, kv_heads=2, head_dim=64, dtype=dtype))
    chunk = random_padded(random.Random(16), batch=2, length=20, past_length=9, pad="left")
    check(chunk, *make_qkv(chunk.layout, heads=4, kv_heads=1, head_dim=32, dtype=dtype))
    assert bool(used) == (blocks == "cpp")

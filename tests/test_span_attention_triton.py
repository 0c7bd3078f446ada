"""Triton span attention against the reference: interpreter tier (CPU) and GPU tier (CUDA).

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and these tests run the kernels through Triton's
interpreter on CPU in fp32 and fp16 (the interpreter's bf16 tl.dot is wrong, so bf16 is run with
fp32 dot operands there and only checked loosely). With a GPU the same tests run on CUDA, in fp16
and bf16, plus the bigger GPU-only cases at the bottom.

Ground truth: ``span_attention_reference`` in float64. The error of the kernel against it must stay
within a small multiple of the error that the reference itself has when run in the test dtype
(fp32 math, output rounded to the dtype), plus a dtype-sized absolute slack.

Every output and gradient buffer is allocated full of NaN (``POISON_OUTPUTS``), so an element a
kernel forgets to write fails the test.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from conftest import HAS_CUDA, requires_cuda  # tests/conftest.py
except ImportError:  # another conftest module (e.g. bench/conftest.py) took the name in a combined run
    HAS_CUDA = torch.cuda.is_available()
    requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (GPU tier)")
from llavit_kernels import SpanLayout, span_attention
from llavit_kernels.ops import _span_attention_kernels as K
from llavit_kernels.ops import _span_attention_triton as T
from llavit_kernels.ops.span_attention import span_attention_reference

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Interpreter: fp32 and fp16. GPU: fp16 and bf16 (fp32 runs too, with IEEE fp32 dots).
DTYPES = (torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)
# Absolute slack per dtype, relative to the largest magnitude of the quantity compared.
SLACK = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# The interpreter warns per element access (numpy deprecations, exp2 overflow to inf on masked lanes).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(T, "POISON_OUTPUTS", True)


# ----------------------------------------------------------------------------- layouts
def padded_layout(rng: random.Random, batch: int, length: int, image_share: float = 0.4, pad: str = "none",
                  past_length: int = 0):
    """Random images at odd offsets; left/right/no padding; optional cached prefix (chunk)."""
    img = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pos = rng.randrange(0, 4)
        while pos < length:
            if rng.random() < image_share:
                span = rng.randrange(1, max(2, length // 2))
                img[b, pos:pos + span] = True
                pos += span + rng.randrange(0, 3)  # 0: two images back to back form one span
            else:
                pos += rng.randrange(1, 9)
    mask = None
    if pad != "none":
        mask = torch.ones(batch, past_length + length, dtype=torch.long)
        for b in range(batch):
            cut = rng.randrange(0, max(1, (past_length + length) // 2))
            if b == 0:
                cut = (past_length + length) if pad == "left" and past_length == 0 else cut  # one fully padded row
            if pad == "left":
                mask[b, :cut] = 0
            else:
                mask[b, past_length + length - cut:] = 0
    return SpanLayout.from_image_mask(img.to(DEVICE), None if mask is None else mask.to(DEVICE), past_length=past_length)


def packed_layout(rng: random.Random, doc_lengths, image_share: float = 0.4):
    n = sum(doc_lengths)
    img = torch.zeros(n, dtype=torch.bool)
    pos = 0
    while pos < n:
        if rng.random() < image_share:
            span = rng.randrange(1, 12)
            img[pos:pos + span] = True  # may cross a document edge: the layout must split it
            pos += span
        else:
            pos += rng.randrange(1, 7)
    cu = torch.tensor([0] + list(torch.tensor(doc_lengths).cumsum(0).tolist()), dtype=torch.int32)
    return SpanLayout.from_packed(img.to(DEVICE), cu.to(DEVICE))


# ----------------------------------------------------------------------------- checking
def make_qkv(layout: SpanLayout, heads: int, kv_heads: int, head_dim: int, dtype, scale: float = 1.0):
    gen = torch.Generator().manual_seed(1234)
    if layout.packed:
        q_shape = (layout.num_queries, heads, head_dim)
        k_shape = (layout.num_keys, kv_heads, head_dim)
    else:
        q_shape = (layout.batch_size, layout.num_queries, heads, head_dim)
        k_shape = (layout.batch_size, layout.num_keys, kv_heads, head_dim)
    q = (torch.randn(q_shape, generator=gen) * scale).to(DEVICE, dtype)
    k = (torch.randn(k_shape, generator=gen) * scale).to(DEVICE, dtype)
    v = torch.randn(k_shape, generator=gen).to(DEVICE, dtype)
    do = torch.randn(q_shape, generator=gen).to(DEVICE, dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, backward=True):
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v)
    if not backward:
        return (out.detach(),)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(layout, q, k, v, do, softmax_scale=None, backward=True, err_factor=3.0):
    dtype = q.dtype
    ours = _fwd_bwd(lambda q, k, v: span_attention(q, k, v, layout, softmax_scale, backend="triton"), q, k, v, do, backward)
    gold = _fwd_bwd(lambda q, k, v: span_attention_reference(q, k, v, layout, softmax_scale),
                    q.double(), k.double(), v.double(), do.double(), backward)
    low = _fwd_bwd(lambda q, k, v: span_attention_reference(q, k, v, layout, softmax_scale), q, k, v, do, backward)
    names = ("out", "dq", "dk", "dv")
    for name, o, g, l in zip(names, ours, gold, low):
        assert o.dtype == dtype and o.shape == g.shape, (name, o.dtype, o.shape, g.shape)
        assert not torch.isnan(o).any(), f"{name}: NaN (an unwritten element or a NaN in the math)"
        scale = max(g.abs().max().item(), 1.0) if g.numel() else 1.0
        bound = err_factor * _max_err(l, g) + SLACK[dtype] * scale
        err = _max_err(o, g)
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference in {dtype}: {_max_err(l, g):.3g})"
    # Query rows without keys (padding) give exactly 0 output and exactly 0 gradient.
    no_keys = layout.kv_start >= layout.kv_end
    assert (ours[0][no_keys] == 0).all()
    if backward:
        assert (ours[1][no_keys] == 0).all()
        no_queries = layout.q_start >= layout.q_end
        assert (ours[2][no_queries] == 0).all() and (ours[3][no_queries] == 0).all()
    return ours


# ----------------------------------------------------------------------------- interpreter / GPU tier
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_padded_batch_matches_reference(dtype, pad):
    rng = random.Random(hash(pad) % 1000)
    layout = padded_layout(rng, batch=2, length=41, pad=pad)  # 41: not a multiple of any block size
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


@pytest.mark.parametrize("groups", [1, 2, 4, 7])
def test_gqa_groups(groups):
    dtype = DTYPES[0]
    rng = random.Random(groups)
    layout = padded_layout(rng, batch=1, length=29)
    q, k, v, do = make_qkv(layout, heads=groups * (2 if groups < 4 else 1), kv_heads=2 if groups < 4 else 1,
                           head_dim=64, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_documents(dtype):
    rng = random.Random(7)
    layout = packed_layout(rng, [13, 1, 22, 0, 17])  # a one-token and an empty document too
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


@pytest.mark.parametrize("kind", ["all_image", "no_image"])
def test_all_image_and_no_image(kind):
    img = torch.full((1, 50), kind == "all_image", dtype=torch.bool, device=DEVICE)
    layout = SpanLayout.from_image_mask(img)
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=2, head_dim=64, dtype=DTYPES[0])
    check_against_reference(layout, q, k, v, do)


@pytest.mark.parametrize("head_dim", [80, 96, 128])
def test_padded_head_dims(head_dim):
    # 80 and 96 run with BLOCK_D = 128 and a d < head_dim mask on every load and store.
    rng = random.Random(head_dim)
    layout = padded_layout(rng, batch=1, length=33, pad="left")
    q, k, v, do = make_qkv(layout, heads=1, kv_heads=1, head_dim=head_dim, dtype=DTYPES[-1])
    check_against_reference(layout, q, k, v, do)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_chunk_against_longer_kv(dtype):
    # Chunked prefill: Tq = 24 queries at key offset 29 into Tk = 53 keys (cache + chunk).
    rng = random.Random(3)
    layout = padded_layout(rng, batch=2, length=20, past_length=29, pad="left")
    assert layout.num_keys == 49 and layout.num_queries == 20
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


def test_query_chunk_view_of_full_layout():
    rng = random.Random(11)
    img = torch.zeros(1, 60, dtype=torch.bool, device=DEVICE)
    img[0, 5:17] = True
    img[0, 40:47] = True
    full = SpanLayout.from_image_mask(img)
    chunk = full.query_chunk(20, 30)  # image 40..47 stays inside the chunk
    q, k, v, do = make_qkv(chunk, heads=2, kv_heads=1, head_dim=64, dtype=DTYPES[0])
    check_against_reference(chunk, q, k, v, do)


@pytest.mark.parametrize("pad", ["left", "right_after_image", "left_in_cached_prefix"])
def test_padding_keys_in_unmasked_query_blocks_get_zero_grad(pad):
    # Padding keys (no query sees them) share a key block with valid keys whose query range holds
    # whole unmasked query blocks; the dK/dV kernel must not give them p = exp(s - lse) != 0 there.
    # 160 tokens: long enough for such blocks with the interpreter's (32, 16) and the GPU's (32 or 64, 128)
    # dK/dV tiles; the shorter layouts above never reach an unmasked block next to padding keys.
    length, past = (80, 80) if pad == "left_in_cached_prefix" else (160, 0)
    img = torch.zeros(1, length, dtype=torch.bool)
    mask = torch.ones(1, past + length, dtype=torch.long)
    if pad.startswith("left"):
        mask[0, :5] = 0
    else:  # right padding right after a long image span: its keys see queries 20..149
        img[0, 20:150] = True
        mask[0, 150:] = 0
    layout = SpanLayout.from_image_mask(img.to(DEVICE), mask.to(DEVICE), past_length=past)
    q, k, v, do = make_qkv(layout, heads=1, kv_heads=1, head_dim=64, dtype=DTYPES[0])
    check_against_reference(layout, q, k, v, do)


def test_strided_inputs_views_of_fused_qkv():
    # q, k, v as head slices of one fused [B, T, H + 2 Hkv, D] tensor (token stride != heads x D),
    # k through a [B, Hkv, T, D] transpose, a transposed grad_out, and a q with last-dim stride 2.
    rng = random.Random(31)
    layout = padded_layout(rng, batch=2, length=37, pad="left")
    heads, kv_heads, dim = 4, 2, 64
    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(4)
    fused = torch.randn(2, 37, heads + 2 * kv_heads, dim, generator=gen).to(DEVICE, dtype)
    do = torch.randn(2, heads, 37, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)

    def run(fn, fused):
        fused = fused.detach().clone().requires_grad_()
        q, k, v = fused[:, :, :heads], fused[:, :, heads:heads + kv_heads], fused[:, :, heads + kv_heads:]
        k = k.transpose(1, 2).contiguous().transpose(1, 2) * 1.0
        out = fn(q, k, v)
        return out.detach(), torch.autograd.grad(out, fused, do)[0]

    ours = run(lambda q, k, v: span_attention(q, k, v, layout, backend="triton"), fused)
    gold = run(lambda q, k, v: span_attention_reference(q, k, v, layout), fused.double())
    low = run(lambda q, k, v: span_attention_reference(q, k, v, layout), fused)
    for name, o, g, l in zip(("out", "dfused"), ours, gold, low):
        bound = 3 * _max_err(l, g) + SLACK[dtype] * max(g.abs().max().item(), 1.0)
        assert _max_err(o, g) <= bound, f"{name}: {_max_err(o, g):.3g} > {bound:.3g}"
    q_odd = torch.randn(2, 37, heads, 2 * dim, generator=gen).to(DEVICE, dtype)[..., ::2]
    k, v = fused[:, :, heads:heads + kv_heads], fused[:, :, heads + kv_heads:]
    out = span_attention(q_odd, k, v, layout, backend="triton")
    ref = span_attention_reference(q_odd.double(), k.double(), v.double(), layout)
    assert _max_err(out, ref) <= SLACK[dtype] * 2


def test_softmax_scale_and_large_logits():
    rng = random.Random(5)
    layout = padded_layout(rng, batch=1, length=40)
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32, scale=4.0)
    check_against_reference(layout, q, k, v, do, softmax_scale=0.3)


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    length=st.integers(1, 60),
    pad=st.sampled_from(["none", "left", "right"]),
    share=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
)
def test_fuzzed_padded_layouts(seed, length, pad, share):
    rng = random.Random(seed)
    layout = padded_layout(rng, batch=2, length=length, image_share=share, pad=pad)
    q, k, v, do = make_qkv(layout, heads=1, kv_heads=1, head_dim=64, dtype=DTYPES[0])
    check_against_reference(layout, q, k, v, do)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), docs=st.lists(st.integers(0, 30), min_size=1, max_size=4))
def test_fuzzed_packed_layouts(seed, docs):
    if sum(docs) == 0:
        docs = docs + [5]
    rng = random.Random(seed)
    layout = packed_layout(rng, docs)
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=DTYPES[0])
    check_against_reference(layout, q, k, v, do)


def test_bf16_runs_and_is_close():
    # The interpreter's bf16 tl.dot is wrong; the kernels upcast bf16 dot operands when interpreting,
    # so bf16 is only checked here loosely (casts truncate in the interpreter). The GPU tier checks it properly.
    rng = random.Random(9)
    layout = padded_layout(rng, batch=1, length=40, pad="right")
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.bfloat16)
    check_against_reference(layout, q, k, v, do, err_factor=6.0)


def test_backward_is_deterministic():
    rng = random.Random(13)
    layout = padded_layout(rng, batch=1, length=40)
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=DTYPES[0])
    fn = lambda q, k, v: span_attention(q, k, v, layout, backend="triton")  # noqa: E731
    first = _fwd_bwd(fn, q, k, v, do)
    second = _fwd_bwd(fn, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_lse_output_and_its_gradient():
    # lse (natural log) equals logsumexp of the allowed scaled scores; +inf on rows without keys;
    # a gradient flowing into lse is handled (d lse / d s = p).
    rng = random.Random(17)
    layout = padded_layout(rng, batch=2, length=30, pad="left")
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    scale = 1 / 8.0
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(2, dim=2)) * scale
    mask = layout.dense_mask()[:, None]
    has = mask.any(-1).expand(2, 2, 30)
    lse_gold = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = T.span_attention_triton_with_lse(q2, k2, v2, layout, scale)
    assert lse.shape == (2, 2, 30) and lse.dtype == torch.float32
    assert torch.isinf(lse[~has]).all() and (lse[~has] > 0).all()
    torch.testing.assert_close(lse[has].double(), lse_gold[has], atol=1e-5, rtol=1e-5)
    weights = torch.randn(lse.shape, dtype=torch.float64)
    gq, gk = torch.autograd.grad((lse.double()[has] * weights[has]).sum() + (out.double() * do.double()).sum(), (q2, k2))
    out_gold = span_attention_reference(qd, kd, vd, layout, scale)
    lse_term = (torch.where(has, lse_gold, 0.0) * torch.where(has, weights, 0.0)).sum()
    gq_gold, gk_gold = torch.autograd.grad(lse_term + (out_gold * do.double()).sum(), (qd, kd))
    torch.testing.assert_close(gq.double(), gq_gold, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gk.double(), gk_gold, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- launch path: bounds, device, recompiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_intervals_past_the_tensors_are_clamped(dtype):
    # A layout whose intervals reach past the tensors: query_chunk(validate=False) cutting an image
    # (kv_end > Tk for the image's queries), then by hand kv_end and q_end pushed further past Tk
    # and Tq (by more than a block). Keys/queries that do not exist are not attended to: the result
    # equals the reference on the mask intersected with the tensors, and no full-block load leaves
    # the tensors (poisoned outputs: every element written).
    img = torch.zeros(1, 90, dtype=torch.bool, device=DEVICE)
    img[0, 3:9] = True
    img[0, 40:85] = True  # cut by the chunk [20, 60)
    chunk = SpanLayout.from_image_mask(img).query_chunk(20, 40, validate=False)
    tq, tk = chunk.num_queries, chunk.num_keys
    assert (chunk.kv_end > tk).any()
    kv_end = torch.where(chunk.kv_end > tk, chunk.kv_end + 70, chunk.kv_end)
    q_end = torch.where(chunk.q_end >= tq, chunk.q_end + 70, chunk.q_end)
    layout = SpanLayout(chunk.is_image, chunk.kv_start, kv_end.contiguous(), chunk.q_start, q_end.contiguous(),
                        None, chunk.query_offset)
    assert (layout.kv_end > tk + 64).any() and (layout.q_end > tq + 64).any()
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


def test_launches_run_under_the_device_guard(monkeypatch):
    # Every kernel launch happens inside _launch_guard(q.device) (on CUDA: torch.cuda.device(q.device),
    # so a model split over GPUs launches on the tensors' GPU, not the current one).
    depth, launches, guarded = [0], [], []
    real_guard, real_launch = T._launch_guard, T._launch

    class Recorder:
        def __init__(self, device):
            guarded.append(device)
            self.inner = real_guard(device)

        def __enter__(self):
            depth[0] += 1
            return self.inner.__enter__()

        def __exit__(self, *exc):
            depth[0] -= 1
            return self.inner.__exit__(*exc)

    def launch(kernel, grid, args, config=None, **constexprs):
        launches.append((getattr(kernel, "__name__", str(kernel)), depth[0]))
        return real_launch(kernel, grid, args, config, **constexprs)

    monkeypatch.setattr(T, "_launch_guard", Recorder)
    monkeypatch.setattr(T, "_launch", launch)
    layout = padded_layout(random.Random(2), batch=1, length=20)
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)
    _fwd_bwd(lambda q, k, v: span_attention(q, k, v, layout, backend="triton"), q, k, v, do)
    assert len(launches) == 4 and all(d == 1 for _, d in launches), launches  # fwd, pre, dq, dkdv
    assert guarded and all(dev == q.device for dev in guarded)
    if HAS_CUDA:
        assert isinstance(real_guard(torch.device("cuda", 0)), torch.cuda.device)


def _specialization_keys(kernel_launches, honour_do_not_specialize=True):
    """The compile-cache key Triton's launcher computes for each recorded launch, for sm_90 (no GPU
    needed: the binder only looks at argument values and pointer alignment)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = {}
    for kernel, args, constexprs in kernel_launches:
        dns = getattr(kernel, "do_not_specialize", None)
        if dns is None:  # interpreter object: the decorator's arguments are kept in .kwargs
            dns = kernel.kwargs.get("do_not_specialize", ())
        jit = JITFunction(kernel.fn, do_not_specialize=list(dns) if honour_do_not_specialize else [])
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        constexprs = dict(constexprs)
        options = {n: constexprs.pop(n) for n in ("num_warps", "num_stages") if n in constexprs}
        _, specialization, _ = binder(*args, **constexprs)
        keys.setdefault(kernel.fn.__name__, set()).add(repr((specialization, sorted(options.items()))))
    return keys


def test_no_recompile_across_sequence_lengths(monkeypatch):
    # One compiled variant per kernel for every T (and batch size): lengths and the strides that
    # follow T are not value-specialised (do_not_specialize), so Triton's cache key does not change.
    launches = []

    def record(kernel, grid, args, config=None, **constexprs):
        if config is not None:
            constexprs.update(BLOCK_M=config[0], BLOCK_N=config[1], num_warps=config[2], num_stages=config[3])
        launches.append((kernel, args, dict(constexprs)))

    monkeypatch.setattr(T, "_launch", record)
    for length, batch in ((1, 1), (17, 2), (37, 1), (48, 3), (64, 2), (100, 1), (129, 2), (1000, 1)):
        img = torch.zeros(batch, length, dtype=torch.bool, device=DEVICE)
        img[:, length // 3: length // 2] = True
        layout = SpanLayout.from_image_mask(img)
        q, k, v, do = make_qkv(layout, heads=4, kv_heads=2, head_dim=64, dtype=torch.float16)
        out, lse = T._forward_impl(q, k, v, layout.kv_start, layout.kv_end, 0.125)
        T._backward_impl(do, None, q, k, v, out, lse, layout.kv_start, layout.kv_end, layout.q_start,
                         layout.q_end, 0.125)
    keys = _specialization_keys(launches)
    assert len(launches) == 8 * 4 and len(keys) == 4
    assert all(len(v) == 1 for v in keys.values()), {k: len(v) for k, v in keys.items()}
    # The check can fail: without do_not_specialize the same launches give several variants.
    unpinned = _specialization_keys(launches, honour_do_not_specialize=False)
    assert all(len(v) > 1 for v in unpinned.values()), {k: len(v) for k, v in unpinned.items()}


def test_pinned_config_per_arch_dtype_head_dim(monkeypatch):
    # No timing-based choice anywhere: the config is a function of (kind, dtype, head dim, arch).
    monkeypatch.setattr(K, "INTERPRETING", False)
    for kind in ("fwd", "dq", "dkdv"):
        for head_dim in (64, 80, 96, 128):
            assert K.pinned_config(kind, "bf16", head_dim, 90) == K.HALF_CONFIGS_SM90[kind][head_dim][0]
            assert K.pinned_config(kind, "fp16", head_dim, 90) == K.HALF_CONFIGS_SM90[kind][head_dim][0]
            assert K.pinned_config(kind, "fp32", head_dim, 90) == K.FP32_CONFIGS[kind][head_dim][0]
            assert K.pinned_config(kind, "bf16", head_dim, 80) == K.HALF_CONFIGS_OTHER[kind][head_dim][0]
    monkeypatch.setattr(K, "FORCE_CONFIG", 1)
    assert K.pinned_config("fwd", "bf16", 128, 90) == K.HALF_CONFIGS_SM90["fwd"][128][1]


_TWO_PROCESS_SCRIPT = r"""
import os, sys, random, torch
sys.path[:0] = [os.environ["REPO"], os.path.join(os.environ["REPO"], "tests")]
from llavit_kernels import SpanLayout, span_attention
img = torch.zeros(2, {length}, dtype=torch.bool)
img[:, 5:{length} // 2] = True
layout = SpanLayout.from_image_mask(img.to("{device}"))
gen = torch.Generator().manual_seed(7)
q = torch.randn(2, {length}, 4, {dim}, generator=gen).to("{device}", {dtype}).requires_grad_()
k = torch.randn(2, {length}, 2, {dim}, generator=gen).to("{device}", {dtype}).requires_grad_()
v = torch.randn(2, {length}, 2, {dim}, generator=gen).to("{device}", {dtype}).requires_grad_()
out = span_attention(q, k, v, layout, backend="triton")
grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
torch.save([t.detach().cpu() for t in (out, *grads)], sys.argv[1])
"""


def test_bitwise_equal_across_processes(tmp_path):
    # Determinism that holds across processes (the pinned config, no autotuning by timing): two
    # fresh processes give bitwise-equal outputs and gradients. GPU tier: bf16 at a size where the
    # GPU configs see many blocks; interpreter tier: a small fp32 case (each process ~10 s).
    import os
    import subprocess
    import sys

    if HAS_CUDA:
        params = dict(length=700, dim=128, device="cuda", dtype="torch.bfloat16")
    else:
        params = dict(length=24, dim=64, device="cpu", dtype="torch.float32")
    script = tmp_path / "run.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(**params))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, REPO=repo)
    results = []
    for i in range(2):
        path = tmp_path / f"r{i}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=600)
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_runs_on_a_non_current_device():
    rng = random.Random(41)
    layout = padded_layout(rng, batch=1, length=200, pad="left").to("cuda:1")
    q, k, v, do = (t.to("cuda:1") for t in make_qkv(layout, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16))
    assert torch.cuda.current_device() == 0
    check_against_reference(layout, q, k, v, do)


# ----------------------------------------------------------------------------- errors
def test_unsupported_head_dim_raises():
    layout = SpanLayout.from_image_mask(torch.zeros(1, 8, dtype=torch.bool, device=DEVICE))
    q = torch.randn(1, 8, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dims \(64, 80, 96, 128\), got 48"):
        span_attention(q, q, q, layout, backend="triton")
    # The reference accepts any head dim.
    assert span_attention(q, q, q, layout, backend="reference").shape == q.shape


def test_int32_row_offsets_guard():
    # Offsets inside one batch row are int32 in the kernels: a packed 7B-shaped input of 600k tokens
    # (600k x 28 x 128 > 2**31) must raise, not wrap around; S2 (2 x 8192 x 28 x 128) is far below.
    def meta(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    n = 600_000
    idx = torch.empty(n, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"q: backend='triton' needs offsets within one batch row below 2\*\*31"):
        T._forward_impl(meta(n, 28, 128), meta(n, 4, 128), meta(n, 4, 128), idx, idx, 0.1)
    T._check_row_offsets_fit_int32(q=meta(2, 8192, 28, 128), k=meta(2, 8192, 4, 128))  # S2: fine


def test_float64_rejected_by_triton_backend():
    layout = SpanLayout.from_image_mask(torch.zeros(1, 8, dtype=torch.bool, device=DEVICE))
    q = torch.randn(1, 8, 2, 64, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        span_attention(q, q, q, layout, backend="triton")


# ----------------------------------------------------------------------------- custom op / compile
def _op_args(dtype=torch.float32, requires_grad=False):
    rng = random.Random(21)
    layout = padded_layout(rng, batch=1, length=20, pad="left")
    q, k, v, _ = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=dtype)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    return layout, (q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, 0.125)


def test_opcheck_forward_op():
    _, args = _op_args(requires_grad=True)
    torch.library.opcheck(
        torch.ops.llavit.span_attention_fwd.default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_opcheck_backward_op():
    layout, args = _op_args()
    q, k, v = args[:3]
    out, lse = torch.ops.llavit.span_attention_fwd(*args)
    do = torch.randn_like(out)
    bargs = (do, None, q, k, v, out, lse, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, 0.125)
    torch.library.opcheck(
        torch.ops.llavit.span_attention_bwd.default, bargs, test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    rng = random.Random(23)
    layout = padded_layout(rng, batch=2, length=30, pad="right")
    q, k, v, do = make_qkv(layout, heads=2, kv_heads=1, head_dim=64, dtype=torch.float32)

    def step(q, k, v, kv_start, kv_end, q_start, q_end, cu):
        lay = SpanLayout(layout.is_image, kv_start, kv_end, q_start, q_end, None, 0)
        return span_attention(q * 1.0, k, v, lay, backend="triton").sum(dim=-1)

    # Inductor on CPU too: it compiles the surrounding graph (C++), our ops stay opaque custom ops
    # whose fake implementations and registered autograd make the fullgraph trace possible.
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = compiled(q1, k1, v1, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, None)
    grads = torch.autograd.grad(out, (q1, k1, v1), do.sum(-1))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = span_attention_reference(q2, k2, v2, layout).sum(dim=-1)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), do.sum(-1))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GPU-only tier
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_gpu_realistic_sizes(dtype, head_dim):
    # Sizes where the GPU configs (BLOCK 64/128) see many full and edge blocks.
    rng = random.Random(head_dim)
    layout = padded_layout(rng, batch=2, length=777, image_share=0.3, pad="left")
    q, k, v, do = make_qkv(layout, heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype)
    check_against_reference(layout, q, k, v, do)


@requires_cuda
@pytest.mark.parametrize("config_index", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_gpu_every_config(monkeypatch, config_index, head_dim):
    # Entry 0 of each candidate list is pinned and runs in every other test; the other candidates
    # (kept for re-pinning from GPU timings) must be correct on their own too.
    monkeypatch.setattr(K, "FORCE_CONFIG", config_index)
    rng = random.Random(config_index)
    layout = padded_layout(rng, batch=2, length=333, image_share=0.3, pad="left")
    q, k, v, do = make_qkv(layout, heads=6, kv_heads=2, head_dim=head_dim, dtype=torch.bfloat16)
    check_against_reference(layout, q, k, v, do)


@requires_cuda
def test_gpu_llavit_image_at_35_like_s1():
    img = torch.zeros(2, 1100, dtype=torch.bool, device="cuda")
    img[:, 35:35 + 576] = True
    layout = SpanLayout.from_image_mask(img)
    q, k, v, do = make_qkv(layout, heads=7, kv_heads=1, head_dim=128, dtype=torch.bfloat16)
    check_against_reference(layout, q, k, v, do)


@requires_cuda
def test_gpu_cuda_graph_capture_and_replay():
    rng = random.Random(29)
    layout = padded_layout(rng, batch=2, length=300, pad="left")
    q, k, v, do = make_qkv(layout, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = lambda: torch.autograd.grad(span_attention(q, k, v, layout), (q, k, v), do)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: autotuning and compilation happen outside the capture
            expected = fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b)


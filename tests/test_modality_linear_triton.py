"""Interpreter and GPU tiers of the Triton modality_linear / modality_qkv.

Each test compares the Triton path against the float64 evaluation of the pure-torch reference,
forward and every gradient. On CPU the kernels run in Triton's interpreter (small shapes, fp32 and
fp16; bf16 dots are computed in fp32 there); the ``requires_cuda`` tests rerun them in bf16 on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llavit_kernels import SpanLayout
from llavit_kernels.ops import _modality_linear_kernels as kern
from llavit_kernels.ops import _modality_linear_triton as mlt
from llavit_kernels.ops.modality_linear import (
    modality_linear,
    modality_linear_grouped,
    modality_linear_reference,
    modality_qkv,
    modality_qkv_reference,
)

# the front-door module (``llavit_kernels.ops.modality_linear`` the attribute is the function)
ml_front = importlib.import_module("llavit_kernels.ops.modality_linear")
# (not imported from conftest: with bench/ in the same pytest run, "conftest" is bench's)
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (GPU tier)")
CPU = torch.device("cpu")
# The interpreter tier runs on CPU; on a GPU machine (no interpreter) the same tests run on CUDA.
DEV = torch.device("cuda") if HAS_CUDA else CPU
TM = kern.TILE_M


# ----------------------------------------------------------------------------- helpers
def mask_from_runs(M: int, spans, device=DEV) -> torch.Tensor:
    m = torch.zeros(M, dtype=torch.bool, device=device)
    for start, length in spans:
        m[start:start + length] = True
    return m


# Layouts in units of the tile so that they cut tiles the same way on the GPU (TILE_M=128) and in
# the interpreter (TILE_M=16); every one stresses a different tile-table case.
def named_layouts(tm: int):
    return {
        "mixed": (3 * tm + 5, [(5, tm + 1), (2 * tm - 2, 1), (2 * tm + 3, tm - 1)]),
        "all_text": (2 * tm + 7, []),
        "all_image": (2 * tm + 7, [(0, 2 * tm + 7)]),
        "aligned_span": (3 * tm, [(tm, tm)]),
        "one_token_spans": (2 * tm + 1, [(0, 1), (tm - 1, 1), (tm, 1), (2 * tm, 1)]),
        "alternating": (tm + 9, [(i, 1) for i in range(0, tm + 9, 2)]),
        "tiny": (3, [(1, 1)]),
    }


def make_linear_inputs(M_shape, K, N, dtype, device, bias=(True, True), scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(1234)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    x = r(*M_shape, K)
    w_t, w_i = r(N, K) / K ** 0.5, r(N, K) / K ** 0.5
    w_t = w_t.detach().requires_grad_(True)
    w_i = w_i.detach().requires_grad_(True)
    b_t = r(N) if bias[0] else None
    b_i = r(N) if bias[1] else None
    return x, w_t, b_t, w_i, b_i


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def grads(outs, inputs, gouts):
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outs, live, gouts, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def tolerance(dtype):
    # max-abs error allowed relative to the reference's magnitude (values here are O(1))
    return {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}[dtype]


def assert_close_to_f64(got, ref64, ref_lowp, dtype, what):
    """Ours vs float64 must be within 2x torch's own low-precision error (flash-attention's rule) + tol."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten / poisoned element?)"
    err = (got.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item() if ref_lowp is not None else 0.0
    scale = max(ref64.abs().max().item(), 1.0)
    assert err <= 2 * base + tolerance(dtype) * scale, f"{what}: max err {err:.3g} (torch's own {base:.3g}, scale {scale:.3g})"


@contextlib.contextmanager
def use_configs(gemm_configs, dw_configs):
    """Run the kernels with the given autotune configs (and a fresh autotune cache)."""
    saved = [(k, k.configs, k.cache) for k in (kern.routed_mm_kernel, kern.routed_dw_kernel)]
    kern.routed_mm_kernel.configs, kern.routed_mm_kernel.cache = list(gemm_configs), {}
    kern.routed_dw_kernel.configs, kern.routed_dw_kernel.cache = list(dw_configs), {}
    try:
        yield
    finally:
        for k, configs, cache in saved:
            k.configs, k.cache = configs, cache


@pytest.fixture(autouse=True)
def _one_config_on_gpu():
    # On a GPU every new shape would autotune (compile + time) all configs: the GPU tier's time
    # budget allows that only once, in test_gpu_every_config_bf16; the other tests use one config.
    if not HAS_CUDA:
        yield
        return
    with use_configs(kern.GEMM_CONFIGS[:1], kern.DW_CONFIGS[-1:]):  # both fit fp32 operands too
        yield


# GPU machines run the CPU tiers' tests on CUDA too; the wide fuzzing stays on the CPU tier there.
cpu_only_fuzz = pytest.mark.skipif(HAS_CUDA, reason="fuzzing runs in the interpreter tier; the GPU tier runs named layouts")


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(mlt, "POISON_OUTPUTS", True)


def check_linear(is_image, x, w_t, b_t, w_i, b_i, dtype, backend="triton"):
    inputs = [x, w_t, b_t, w_i, b_i]
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend=backend)
    assert y.shape == x.shape[:-1] + (w_t.shape[0],)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, dtype)
    g = grads([y], inputs, [gy])
    in64 = [_f64(t) for t in inputs]
    y64 = modality_linear_reference(in64[0], is_image, in64[1], in64[2], in64[3], in64[4])
    g64 = grads([y64], in64, [gy.double()])
    y_lp = modality_linear_reference(x, is_image, w_t, b_t, w_i, b_i)  # torch's own low-precision error
    g_lp = grads([y_lp], inputs, [gy])
    assert_close_to_f64(y, y64, y_lp, dtype, "y")
    for name, a, b, c in zip(("dx", "dw_text", "db_text", "dw_image", "db_image"), g, g64, g_lp):
        if b is None:
            assert a is None, name
            continue
        assert_close_to_f64(a, b, c, dtype, name)


# ----------------------------------------------------------------------------- token order
def _check_order(is_image: torch.Tensor, tm: int = TM):
    M = is_image.numel()
    table_t = kern.build_order(is_image)  # the Triton builder (two launches)
    assert torch.equal(table_t, kern.build_order_torch(is_image)), "Triton and torch order tables differ"
    assert len(table_t) == kern.order_table_size(M) and kern.ORDER_PAD >= max(TM, kern.TILE_M_GPU)
    assert not bool(table_t[M + 1:].any()), "padding after n_text must be zeros"
    order, n_text = table_t[:M].long(), int(table_t[M])
    img = is_image.reshape(-1)
    assert n_text == int((~img).sum())
    assert torch.equal(torch.sort(order).values, torch.arange(M)), "not a permutation of the tokens"
    assert not bool(img[order[:n_text]].any()) and bool(img[order[n_text:]].all()), "text first, then image"
    assert bool((order[1:n_text] > order[:n_text - 1]).all()) if n_text > 1 else True, "text in token order"
    assert bool((order[n_text + 1:] > order[n_text:-1]).all()) if M - n_text > 1 else True, "image in token order"
    # at most two partial tiles, whatever the number of runs: cdiv(M) + 1 tiles at most
    tiles = -(-n_text // tm) + -(-(M - n_text) // tm)
    assert tiles <= kern.slots_for(M, tm) and tiles <= -(-M // tm) + 1


@pytest.mark.parametrize("name", list(named_layouts(4)))
def test_order_named(name):
    M, spans = named_layouts(TM)[name]
    _check_order(mask_from_runs(M, spans))


@settings(max_examples=60)
@given(st.lists(st.booleans(), min_size=1, max_size=90))
def test_order_fuzz(bits):
    _check_order(torch.tensor(bits, dtype=torch.bool))


@pytest.mark.parametrize("M", [1023, 1024, 1025, 2 * 1024 + 77])
def test_order_across_windows(M):
    # the Triton builder works in windows of TABLE_WINDOW tokens: runs crossing window edges
    assert kern.TABLE_WINDOW == 1024
    is_image = torch.zeros(M, dtype=torch.bool, device=DEV)
    is_image[1000:1030] = True
    is_image[M - 5:] = True
    is_image[2040:2050] = True
    _check_order(is_image)


def test_order_counts_read_in_chunks(monkeypatch):
    # order_write_kernel reads the per-window counts COUNTS_CHUNK at a time: many chunks here
    monkeypatch.setattr(kern, "COUNTS_CHUNK", 2)
    M = 5 * kern.TABLE_WINDOW + 77
    is_image = torch.zeros(M, dtype=torch.bool, device=DEV)
    for s in range(300, M, 900):
        is_image[s:s + 200] = True
    _check_order(is_image)


class _ConstexprSpy:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def run(*args, **kwargs):  # records the launch, runs nothing
            self.calls.append((self.name, {k: v for k, v in kwargs.items() if k.isupper()}))
        return run


def test_table_kernels_compile_once_for_every_batch_size(monkeypatch):
    # a new token count must not need a new compile (e.g. a new batch size inside a CUDA-graph
    # capture): no constexpr of the table kernels depends on M, and M / n_windows are not specialised
    calls = []
    for name in ("order_count_kernel", "order_write_kernel"):
        monkeypatch.setattr(kern, name, _ConstexprSpy(name, calls))
    for M in (1, 5, 1000, 3000, 70_000, 2_000_000):
        kern.build_order(torch.zeros(M, dtype=torch.bool))
    by_kernel = {}
    for name, consts in calls:
        by_kernel.setdefault(name, []).append(consts)
    for name, seen in by_kernel.items():
        assert all(c == seen[0] for c in seen), f"{name}: constexprs change with M: {seen}"
    monkeypatch.undo()
    assert set(kern.order_write_kernel.kwargs["do_not_specialize"]) >= {"M", "n_windows"}
    assert "M" in kern.order_count_kernel.kwargs["do_not_specialize"]


# ----------------------------------------------------------------------------- modality_linear (interpreter)
@pytest.mark.parametrize("name", list(named_layouts(TM)))
def test_linear_fp32_layouts(name, poison):
    M, spans = named_layouts(TM)[name]
    is_image = mask_from_runs(M, spans)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 24, 20, torch.float32, DEV)
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)


def test_linear_3d_odd_widths_one_bias(poison):
    # [B, T, K] input, widths not multiples of the tile, only the image bias, SpanLayout input
    B, T = 2, TM + 3
    is_image = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    is_image[0, 2:TM + 1] = True
    is_image[1, T - 1] = True
    layout = SpanLayout.from_image_mask(is_image)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), 19, 33, torch.float32, DEV, bias=(False, True))
    check_linear(layout.is_image, x, w_t, b_t, w_i, b_i, torch.float32)
    y = modality_linear(x, layout, w_t, b_t, w_i, b_i, backend="triton")
    assert y.shape == (B, T, 33)


def test_linear_no_bias_fp16(poison):
    M, spans = named_layouts(TM)["mixed"]
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 32, 24, torch.float16, DEV, bias=(False, False))
    check_linear(mask_from_runs(M, spans), x, w_t, b_t, w_i, b_i, torch.float16)


def test_linear_fp16_bias(poison):
    M, spans = named_layouts(TM)["one_token_spans"]
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 40, 17, torch.float16, DEV)
    check_linear(mask_from_runs(M, spans), x, w_t, b_t, w_i, b_i, torch.float16)


def test_linear_bf16_upcast_in_interpreter(poison):
    # bf16 dots run in fp32 under the interpreter; stores truncate there, so only the loose bf16 bound
    M, spans = named_layouts(TM)["mixed"]
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 24, 20, torch.bfloat16, DEV)
    check_linear(mask_from_runs(M, spans), x, w_t, b_t, w_i, b_i, torch.bfloat16)


@cpu_only_fuzz
@settings(max_examples=6)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 2 * TM + 1)), min_size=1, max_size=5),
    st.integers(1, 37),
    st.integers(1, 37),
)
def test_linear_fuzz(runs, K, N):
    is_image = torch.cat([torch.full((n,), img, dtype=torch.bool, device=DEV) for img, n in runs])
    x, w_t, b_t, w_i, b_i = make_linear_inputs((is_image.numel(),), K, N, torch.float32, DEV)
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)


def test_linear_dw_split_path(monkeypatch, poison):
    # the GPU splits the token reduction of dW when N x K is small; force it here (3 splits)
    monkeypatch.setattr(mlt, "_dw_split", lambda M, N, K, device: 3)
    M, spans = named_layouts(TM)["mixed"]
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 20, 18, torch.float32, DEV)
    check_linear(mask_from_runs(M, spans), x, w_t, b_t, w_i, b_i, torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tier runs every config at its real tile size (test_gpu_every_config_bf16)")
def test_gpu_config_tile_shapes_in_interpreter():
    # the GPU configs' BLOCK_N / BLOCK_K (with the interpreter's BLOCK_M), fwd and every gradient, so
    # the column masks and RoPE half-tiles of each real config are checked before any GPU time
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    gemm, dw = kern.gemm_configs(interpret=False), kern.dw_configs(interpret=False)
    for i in range(max(len(gemm), len(dw))):
        with use_configs([gemm[i % len(gemm)]], [dw[i % len(dw)]]):
            x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 72, 136, torch.float32, DEV)
            check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)
            H, Hkv, D = 2, 1, 128
            x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 72, (H + 2 * Hkv) * D, torch.float32, DEV)
            cos, sin = rope_tables(M, D)
            check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)


class _LaunchSpy:
    """Stands in for a Triton kernel: records, per launch, the device guard active at that moment."""

    def __init__(self, kernel, name, guards, launches):
        self.kernel, self.name, self.guards, self.launches = kernel, name, guards, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((self.name, self.guards[-1] if self.guards else None))
            return launch(*args, **kwargs)

        return run


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    # a model split over GPUs (device_map) calls the op with tensors on a non-current GPU: every
    # launch must sit inside the guard of its input's device (CPU check that the guard is on the path)
    guards, launches = [], []
    real_guard = mlt._on_device

    @contextlib.contextmanager
    def spy_guard(t):
        guards.append(t.device)
        with real_guard(t):
            yield
        guards.pop()

    monkeypatch.setattr(mlt, "_on_device", spy_guard)
    names = ["routed_mm_kernel", "routed_dw_kernel", "routed_db_kernel", "qkv_grad_kernel", "order_count_kernel",
             "order_write_kernel"]
    for name in names:
        monkeypatch.setattr(kern, name, _LaunchSpy(getattr(kern, name), name, guards, launches))
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    H, Hkv, D = 2, 1, 8
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 16, (H + 2 * Hkv) * D, torch.float32, DEV)
    cos, sin = rope_tables(M, D)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    q, k, v = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
    torch.autograd.grad(y.sum() + q.sum() + k.sum() + v.sum(), [x, w_t, b_t])
    assert sorted(set(n for n, _ in launches)) == sorted(names), launches
    assert all(device == x.device for _, device in launches), launches


def test_device_guard_targets_the_tensors_gpu():
    class FakeCuda:  # a tensor on GPU 1 without a GPU: the guard object is built, not entered
        device = torch.device("cuda", 1)

    guard = mlt._on_device(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(mlt._on_device(torch.zeros(1)), contextlib.nullcontext)


def test_strided_bias_views(poison):
    # biases that are strided 1-D views (columns of a stacked [N, 2] tensor): the kernels index
    # bias[n] as bias_ptr + n, so the op must compact them; gradients flow back into the stack
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    x, w_t, _, w_i, _ = make_linear_inputs((M,), 24, 20, torch.float32, DEV, bias=(False, False))
    stacked = torch.randn(20, 2, generator=torch.Generator().manual_seed(5)).to(DEV).requires_grad_(True)
    b_t, b_i = stacked[:, 0], stacked[:, 1]
    assert b_t.stride() == (2,)
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)
    H, Hkv, D = 2, 1, 8
    x, w_t, _, w_i, _ = make_linear_inputs((M,), 24, (H + 2 * Hkv) * D, torch.float32, DEV, bias=(False, False))
    stacked = torch.randn((H + 2 * Hkv) * D, 2, generator=torch.Generator().manual_seed(6)).to(DEV).requires_grad_(True)
    cos, sin = rope_tables(M, D)
    check_qkv(is_image, x, w_t, stacked[:, 0], w_i, stacked[:, 1], H, Hkv, cos, sin, torch.float32)


@contextlib.contextmanager
def _slow_path_warnings():
    seen = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        yield seen
    seen += [str(w.message) for w in rec if "slow path" in str(w.message)]


def test_misaligned_inputs_warn_once(monkeypatch):
    monkeypatch.setattr(mlt, "_SLOW_PATH_WARNED", set())
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 32, 16, torch.float32, DEV)
    with _slow_path_warnings() as seen:  # aligned: silent
        modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    assert seen == []
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 20, 16, torch.float32, DEV)  # rows of 20 elements
    with pytest.warns(UserWarning, match=r"modality_linear \(Triton\): x has a row stride of 20.*slow path"):
        modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    with _slow_path_warnings() as seen:  # once per cause
        modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    assert seen == []
    base = torch.randn(M * 32 + 1, device=DEV)
    x_off = base[1:].view(M, 32)  # 4-byte offset
    _, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 32, 16, torch.float32, DEV)
    with pytest.warns(UserWarning, match="x is not 16-byte aligned"):
        y = modality_linear(x_off, is_image, w_t, b_t, w_i, b_i, backend="triton")
    torch.testing.assert_close(y, modality_linear_reference(x_off, is_image, w_t, b_t, w_i, b_i))


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_routing_table_built_once_per_layout(monkeypatch):
    build = _Counter(mlt.routing_table)
    monkeypatch.setattr(mlt, "routing_table", build)
    B, T = 2, TM + 3
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    mask[:, 2:TM] = True
    layout = SpanLayout.from_image_mask(mask)
    H, Hkv, D = 2, 1, 8
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), 16, (H + 2 * Hkv) * D, torch.float32, DEV)
    for _ in range(3):  # three "layers": linear and fused QKV share the table
        y = modality_linear(x, layout, w_t, b_t, w_i, b_i, backend="triton")
        modality_qkv(x, layout, w_t, b_t, w_i, b_i, H, Hkv, backend="triton")
    assert build.calls == 1
    torch.testing.assert_close(y, modality_linear_reference(x, layout.is_image, w_t, b_t, w_i, b_i))
    modality_linear(x, layout.is_image, w_t, b_t, w_i, b_i, backend="triton")  # a bare mask: no cache
    assert build.calls == 2
    layout.is_image[:, 2:TM] = False  # changed in place: rebuilt, not stale
    y = modality_linear(x, layout, w_t, b_t, w_i, b_i, backend="triton")
    assert build.calls == 3
    torch.testing.assert_close(y, modality_linear_reference(x, layout.is_image, w_t, b_t, w_i, b_i))


def test_attention_module_passes_the_layout(monkeypatch):
    # LlavitAttention hands the SpanLayout (not its mask) to the projection, so the table is shared
    from llavit_kernels.nn import attention as attn_mod

    seen = []
    real = attn_mod.modality_qkv

    def spy(x, layout, *args, **kwargs):
        seen.append(type(layout).__name__)
        return real(x, layout, *args, **kwargs)

    monkeypatch.setattr(attn_mod, "modality_qkv", spy)
    attn = attn_mod.LlavitAttention(32, 4, 2)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    attn(torch.randn(1, 6, 32), SpanLayout.from_image_mask(mask))
    assert seen == ["SpanLayout"], seen


def test_linear_deterministic():
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    runs = []
    for _ in range(2):
        x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 24, 20, torch.float32, DEV)
        y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
        runs.append([y] + list(torch.autograd.grad(y.sum(), [x, w_t, b_t, w_i, b_i])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_linear_empty_tokens():
    x, w_t, b_t, w_i, b_i = make_linear_inputs((0,), 8, 5, torch.float32, DEV)
    y = modality_linear(x, torch.zeros(0, dtype=torch.bool, device=DEV), w_t, b_t, w_i, b_i, backend="triton")
    assert y.shape == (0, 5)
    gx, gw = torch.autograd.grad(y.sum(), [x, w_t])
    assert gx.shape == (0, 8) and bool((gw == 0).all())


def test_linear_float64_rejected():
    x, w_t, b_t, w_i, b_i = make_linear_inputs((4,), 8, 5, torch.float64, DEV)
    with pytest.raises(TypeError, match="x: backend='triton'"):
        modality_linear(x, torch.zeros(4, dtype=torch.bool, device=DEV), w_t, b_t, w_i, b_i, backend="triton")


# ----------------------------------------------------------------------------- CPU path (one GEMM per modality)
def brute_force_linear(x, is_image, w_t, b_t, w_i, b_i):
    """float64, per token: pick the token's weight and bias, one dot per token (the definition)."""
    img = is_image.reshape(-1)
    x64 = x.double().reshape(-1, x.shape[-1])
    w = torch.where(img[:, None, None], w_i.double()[None], w_t.double()[None])  # [M, N, K]
    zero = torch.zeros(w_t.shape[0], dtype=torch.float64, device=x.device)
    bt = b_t.double() if b_t is not None else zero
    bi = b_i.double() if b_i is not None else zero
    y = torch.einsum("mk,mnk->mn", x64, w) + torch.where(img[:, None], bi[None], bt[None])
    return y.view(*x.shape[:-1], -1)


CPU_LAYOUTS = ["mixed", "all_text", "all_image", "one_token_spans", "alternating", "tiny"]


@pytest.mark.parametrize("name", CPU_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_grouped_path_vs_brute_force(name, dtype):
    M, spans = named_layouts(8)[name]
    is_image = mask_from_runs(M, spans, CPU)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 24, 20, dtype, CPU, bias=(True, name != "mixed"))
    inputs = [x, w_t, b_t, w_i, b_i]
    y = modality_linear_grouped(x, is_image, w_t, b_t, w_i, b_i)
    in64 = [_f64(t) for t in inputs]
    y64 = brute_force_linear(in64[0], is_image, *in64[1:])
    y_lp = modality_linear_reference(x, is_image, w_t, b_t, w_i, b_i)
    assert_close_to_f64(y, y64, y_lp, dtype, "y")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    for what, a, b, c in zip(("dx", "dw_text", "db_text", "dw_image", "db_image"), grads([y], inputs, [gy]),
                             grads([y64], in64, [gy.double()]), grads([y_lp], inputs, [gy])):
        if b is None:
            assert a is None, what
            continue
        assert a is not None, f"{what}: no gradient (both weights must always get one)"
        assert_close_to_f64(a, b, c, dtype, what)


def test_cpu_default_is_grouped_and_cached_on_the_layout(monkeypatch):
    order = _Counter(ml_front.modality_order)
    monkeypatch.setattr(ml_front, "modality_order", order)
    grouped = _Counter(ml_front.modality_linear_grouped)
    monkeypatch.setattr(ml_front, "modality_linear_grouped", grouped)
    B, T = 2, 11
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, 10] = True
    layout = SpanLayout.from_image_mask(mask)
    H, Hkv, D = 2, 1, 4
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), 12, (H + 2 * Hkv) * D, torch.float32, CPU)
    cos, sin = rope_tables(T, D, CPU)
    for _ in range(2):
        y = modality_linear(x, layout, w_t, b_t, w_i, b_i)  # backend=None on CPU
        q, k, v = modality_qkv(x, layout, w_t, b_t, w_i, b_i, H, Hkv, cos, sin)
    assert grouped.calls == 4 and order.calls == 1
    torch.testing.assert_close(y, modality_linear_reference(x, mask, w_t, b_t, w_i, b_i))
    for a, b in zip((q, k, v), modality_qkv_reference(x, mask, w_t, b_t, w_i, b_i, H, Hkv, cos, sin)):
        torch.testing.assert_close(a, b)
    modality_linear(x, layout, w_t, b_t, w_i, b_i, backend="reference")  # the oracle stays selectable
    assert grouped.calls == 4


def test_layout_built_in_inference_mode(monkeypatch):
    # a layout made under torch.inference_mode (generation) has inference tensors, which have no
    # version counter: the cache must still work there, and an entry made under inference_mode is
    # not handed to autograd afterwards
    B, T = 1, 9
    with torch.inference_mode():
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[0, 2:5] = True
        layout = SpanLayout.from_image_mask(mask)
        x, w_t, b_t, w_i, b_i = (t.detach() for t in make_linear_inputs((B, T), 8, 6, torch.float32, CPU))
        y = modality_linear(x, layout, w_t, b_t, w_i, b_i)
        torch.testing.assert_close(y, modality_linear_reference(x, mask, w_t, b_t, w_i, b_i))
    layout2 = SpanLayout.from_image_mask(torch.zeros(B, T, dtype=torch.bool))
    with torch.inference_mode():
        modality_linear(x.clone(), layout2, w_t.clone(), b_t.clone(), w_i.clone(), b_i.clone())
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), 8, 6, torch.float32, CPU)
    y = modality_linear(x, layout2, w_t, b_t, w_i, b_i)
    y.sum().backward()
    assert x.grad is not None and w_i.grad is not None


def test_cpu_default_under_torch_compile_uses_the_reference():
    # the grouped path reads the token order (data-dependent shapes): compiled graphs keep the reference
    is_image, x, w_t, b_t, w_i, b_i = (t.to(CPU) if isinstance(t, torch.Tensor) else t for t in _opcheck_inputs())

    def f(x, w_t, b_t, w_i, b_i):
        return modality_linear(x, is_image, w_t, b_t, w_i, b_i).square().sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w_t, b_t, w_i, b_i)
    torch.testing.assert_close(got, f(x, w_t, b_t, w_i, b_i))


# ----------------------------------------------------------------------------- modality_qkv
def rope_tables(T, D, device=DEV, dtype=torch.float32, batch=None):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    if batch is not None:  # a per-sequence table, e.g. position ids offset by a per-batch shift
        shift = torch.arange(batch, dtype=torch.float64)[:, None, None] * 3
        emb_b = (torch.arange(T, dtype=torch.float64)[None, :, None] + shift) * inv
        emb_b = torch.cat([emb_b, emb_b], -1)
        cos, sin = emb_b.cos().to(device, dtype), emb_b.sin().to(device, dtype)
    return cos, sin


def check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, dtype, which_grads=(True, True, True)):
    inputs = [x, w_t, b_t, w_i, b_i]
    out = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
    in64 = [_f64(t) for t in inputs]
    c64 = None if cos is None else cos.double()
    s64 = None if sin is None else sin.double()
    ref64 = modality_qkv_reference(in64[0], is_image, in64[1], in64[2], in64[3], in64[4], H, Hkv, c64, s64)
    ref_lp = modality_qkv_reference(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin)
    for name, a, b, c in zip("qkv", out, ref64, ref_lp):
        assert a.shape == b.shape and a.is_contiguous(), name
        assert_close_to_f64(a, b, c, dtype, name)
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(o.shape, generator=gen).to(o.device, dtype) for o in out]
    # a loss that uses only some of q/k/v gives None output grads to the backward
    use = [i for i, w in enumerate(which_grads) if w]
    got = grads([out[i] for i in use], inputs, [g[i] for i in use])
    exp = grads([ref64[i] for i in use], in64, [g[i].double() for i in use])
    exp_lp = grads([ref_lp[i] for i in use], inputs, [g[i] for i in use])
    for name, a, b, c in zip(("dx", "dw_text", "db_text", "dw_image", "db_image"), got, exp, exp_lp):
        if b is None:
            assert a is None, name
            continue
        assert_close_to_f64(a, b, c, dtype, name)


QKV_CASES = [
    # (lead shape, H, Hkv, D, hidden, rope kind)
    ((2, TM + 3), 4, 2, 8, 24, None),
    ((2, TM + 3), 4, 2, 8, 24, "shared"),
    ((2, TM + 3), 2, 1, 12, 20, "batched"),  # D/2 = 6: masked half tiles
    ((TM * 2 + 5,), 2, 2, 32, 16, "packed"),  # several tiles per head
    ((TM + 1,), 3, 1, 6, 10, None),  # odd column count per head region
]


@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-H{c[1]}-Hkv{c[2]}-D{c[3]}-{c[5]}")
def test_qkv_fp32(case, poison):
    lead, H, Hkv, D, hidden, rope = case
    N = (H + 2 * Hkv) * D
    is_image = torch.zeros(lead, dtype=torch.bool, device=DEV)
    flat = is_image.view(-1)
    flat[3:TM + 5] = True
    flat[-2:] = True
    x, w_t, b_t, w_i, b_i = make_linear_inputs(lead, hidden, N, torch.float32, DEV)
    T = lead[-1]
    cos = sin = None
    if rope == "shared":
        cos, sin = rope_tables(T, D)
    elif rope == "batched":
        cos, sin = rope_tables(T, D, batch=lead[0])
    elif rope == "packed":
        cos, sin = rope_tables(T, D)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)


def test_qkv_packed_span_layout(poison):
    # packed documents through a SpanLayout, rotary positions restarting in each document ([N, D])
    lens = [TM + 3, 5, TM - 1]
    N_tok = sum(lens)
    is_image = torch.zeros(N_tok, dtype=torch.bool, device=DEV)
    is_image[2:TM] = True  # an image in document 0
    is_image[lens[0] + 1:lens[0] + 3] = True  # a two-token image in document 1
    cu = torch.tensor([0, lens[0], lens[0] + lens[1], N_tok], dtype=torch.int32, device=DEV)
    layout = SpanLayout.from_packed(is_image, cu)
    H, Hkv, D, hidden = 2, 1, 8, 12
    pos = torch.cat([torch.arange(n, dtype=torch.float64) for n in lens])
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = emb.cos().float().to(DEV), emb.sin().float().to(DEV)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((N_tok,), hidden, (H + 2 * Hkv) * D, torch.float32, DEV)
    q, k, v = modality_qkv(x, layout, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
    rq, rk, rv = modality_qkv_reference(x, layout.is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin)
    for a, b in ((q, rq), (k, rk), (v, rv)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    check_qkv(layout.is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)


def test_qkv_fp16_rope_partial_grads(poison):
    lead, H, Hkv, D, hidden = (2, TM + 3), 4, 2, 16, 24
    is_image = torch.zeros(lead, dtype=torch.bool, device=DEV)
    is_image[:, 2:TM] = True
    x, w_t, b_t, w_i, b_i = make_linear_inputs(lead, hidden, (H + 2 * Hkv) * D, torch.float16, DEV)
    cos, sin = rope_tables(lead[-1], D)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float16, which_grads=(True, False, True))


def test_qkv_odd_head_dim_with_rope_rejected():
    x, w_t, b_t, w_i, b_i = make_linear_inputs((4,), 8, 15, torch.float32, DEV)
    cos, sin = torch.ones(4, 3, device=DEV), torch.zeros(4, 3, device=DEV)
    with pytest.raises(ValueError, match="even head dim"):
        modality_qkv(x, torch.zeros(4, dtype=torch.bool, device=DEV), w_t, b_t, w_i, b_i, 3, 1, cos, sin, backend="triton")


# ----------------------------------------------------------------------------- custom-op checks
def _opcheck_inputs():
    M = TM + 5
    is_image = mask_from_runs(M, [(2, TM)])
    x = torch.randn(M, 16, device=DEV, requires_grad=True)
    w_t, w_i = (torch.randn(24, 16, device=DEV, requires_grad=True) for _ in range(2))
    b_t, b_i = (torch.randn(24, device=DEV, requires_grad=True) for _ in range(2))
    return is_image, x, w_t, b_t, w_i, b_i


def test_opcheck_linear():
    is_image, x, w_t, b_t, w_i, b_i = _opcheck_inputs()
    table = mlt.ml_token_order(is_image)
    torch.library.opcheck(mlt.ml_token_order, (is_image,))
    torch.library.opcheck(mlt.ml_linear, (x, table, w_t, b_t, w_i, b_i))
    torch.library.opcheck(mlt.ml_linear, (x, table, w_t, None, w_i, b_i))
    dy = torch.randn(x.shape[0], 24, device=DEV)
    torch.library.opcheck(mlt.ml_linear_dx, (dy, table, w_t.detach(), w_i.detach()))
    torch.library.opcheck(mlt.ml_linear_dw, (dy, x.detach(), table))


def test_opcheck_qkv():
    is_image, x, w_t, b_t, w_i, b_i = _opcheck_inputs()
    table = mlt.ml_token_order(is_image)
    H, Hkv, D = 2, 1, 6
    cos, sin = rope_tables(x.shape[0], D)
    torch.library.opcheck(mlt.ml_qkv, (x, table, w_t, b_t, w_i, b_i, cos, sin, H, Hkv))
    torch.library.opcheck(mlt.ml_qkv, (x, table, w_t, None, w_i, None, None, None, H, Hkv))
    dq = torch.randn(x.shape[0], H, D, device=DEV)
    dk, dv = (torch.randn(x.shape[0], Hkv, D, device=DEV) for _ in range(2))
    torch.library.opcheck(mlt.ml_qkv_grad, (dq, dk, dv, cos, sin, H, Hkv))


@pytest.mark.parametrize("compile_backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("LLAVIT_SLOW_TESTS", "0") != "1", reason="about a minute on a 2-core CPU; LLAVIT_SLOW_TESTS=1")),
])
def test_torch_compile_fullgraph(compile_backend):
    # aot_eager: traces the custom ops, their fake kernels and the autograd registration exactly
    # as inductor does; inductor itself would also build C++ for the surrounding torch ops, which
    # costs minutes on this CPU box without testing anything more of our ops (they stay opaque).
    is_image, x, w_t, b_t, w_i, b_i = _opcheck_inputs()
    H, Hkv, D = 2, 1, 6
    cos, sin = rope_tables(x.shape[0], D)

    def f(x, w_t, b_t, w_i, b_i):
        y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
        q, k, v = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
        return y.square().sum() + (q * 2).sum() + k.square().sum() + (v * 3).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    inputs = [x, w_t, b_t, w_i, b_i]
    got = compiled(*inputs)
    g_got = torch.autograd.grad(got, inputs)
    exp = f(*inputs)
    g_exp = torch.autograd.grad(exp, inputs)
    torch.testing.assert_close(got, exp)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- GPU tier (bf16)
GPU = torch.device("cuda") if HAS_CUDA else None


@requires_cuda
def test_gpu_every_config_bf16():
    # each autotune config on its own, fwd and every gradient, linear and fused QKV with RoPE
    M, spans = named_layouts(128)["mixed"]
    is_image = mask_from_runs(M, spans, GPU)
    n = max(len(kern.GEMM_CONFIGS), len(kern.DW_CONFIGS))
    for i in range(n):
        g_cfg = kern.GEMM_CONFIGS[i % len(kern.GEMM_CONFIGS)]
        d_cfg = kern.DW_CONFIGS[i % len(kern.DW_CONFIGS)]
        with use_configs([g_cfg], [d_cfg]):
            x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 192, 328, torch.bfloat16, GPU)
            check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.bfloat16)
            H, Hkv, D = 4, 2, 128
            x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 192, (H + 2 * Hkv) * D, torch.bfloat16, GPU)
            cos, sin = rope_tables(M, D, GPU)
            check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.bfloat16)


@requires_cuda
def test_gpu_dw_db_bitwise_repeatable_every_config():
    # the dW kernel once summed db from its wgmma operand buffer, which Triton 3.6 single-buffered:
    # a cp.async could overwrite it under a pending wgmma (nondeterministic dW). 20 runs per config
    # must be bitwise equal and match the float64 reference (also in bench/gpu_check.sh's test stage)
    M = 4096 + 77
    is_image = torch.zeros(M, dtype=torch.bool, device=GPU)
    for s in range(35, M, 700):
        is_image[s:s + 300] = True
    g = torch.Generator(device="cpu").manual_seed(11)
    N, K = 384, 320
    dy = torch.randn(M, N, generator=g).to(GPU, torch.bfloat16)
    x = torch.randn(M, K, generator=g).to(GPU, torch.bfloat16)
    table = mlt.ml_token_order(is_image)
    m = is_image[:, None].double()
    ref = [(dy.double() * (1 - m)).T @ x.double(), (dy.double() * m).T @ x.double(),
           (dy.double() * (1 - m)).sum(0), (dy.double() * m).sum(0)]
    for cfg in kern.DW_CONFIGS:
        with use_configs(kern.GEMM_CONFIGS[:1], [cfg]):
            first = mlt.ml_linear_dw(dy, x, table)
            for _ in range(19):
                again = mlt.ml_linear_dw(dy, x, table)
                for a, b in zip(first, again):
                    assert torch.equal(a, b), f"dW/db differ between runs with {cfg}"
        for name, got, exp in zip(("dw_text", "dw_image", "db_text", "db_image"), first, ref):
            err = (got.double() - exp).abs().max().item()
            assert err <= 2e-2 * max(exp.abs().max().item(), 1.0), f"{name} with {cfg}: max err {err:.3g}"


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_non_current_device():
    dev = torch.device("cuda", 1)
    M, spans = named_layouts(128)["mixed"]
    is_image = mask_from_runs(M, spans, dev)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 200, 328, torch.bfloat16, dev)
    assert torch.cuda.current_device() == 0
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("name", list(named_layouts(128)))
def test_gpu_linear_bf16(name):
    M, spans = named_layouts(128)[name]
    is_image = mask_from_runs(M, spans, GPU)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 200, 328, torch.bfloat16, GPU)
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.bfloat16)


@requires_cuda
def test_gpu_linear_bf16_3d_split():
    B, T = 3, 700
    is_image = torch.zeros(B, T, dtype=torch.bool, device=GPU)
    is_image[:, 35:35 + 300] = True
    is_image[2, 600:601] = True
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), 96, 72, torch.bfloat16, GPU)  # small N x K: dW splits
    assert mlt._dw_split(B * T, 72, 96, GPU) > 1
    check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("rope", [False, True])
def test_gpu_qkv_bf16(rope):
    B, T, H, Hkv, D, hidden = 2, 300, 4, 2, 128, 256
    is_image = torch.zeros(B, T, dtype=torch.bool, device=GPU)
    is_image[:, 20:20 + 150] = True
    x, w_t, b_t, w_i, b_i = make_linear_inputs((B, T), hidden, (H + 2 * Hkv) * D, torch.bfloat16, GPU)
    cos, sin = rope_tables(T, D, GPU) if rope else (None, None)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.bfloat16)


@requires_cuda
def test_gpu_no_host_sync_and_cuda_graph():
    M, spans = named_layouts(128)["mixed"]
    is_image = mask_from_runs(M, spans, GPU)
    x, w_t, b_t, w_i, b_i = make_linear_inputs((M,), 256, 256, torch.bfloat16, GPU)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i)  # autotunes outside the checks
    y.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        modality_linear(x.detach(), is_image, w_t.detach(), b_t.detach(), w_i.detach(), b_i.detach())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xs, wts, wis = x.detach(), w_t.detach(), w_i.detach()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        modality_linear(xs, is_image, wts, None, wis, None)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = modality_linear(xs, is_image, wts, None, wis, None)
    is_image.logical_not_()  # a new layout in the same buffer: the replay must follow it
    graph.replay()
    torch.cuda.synchronize()
    ref = modality_linear_reference(xs, is_image, wts, None, wis, None)
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=2e-2)


@requires_cuda
def test_gpu_float64_auto_backend_uses_reference():
    x, w_t, b_t, w_i, b_i = make_linear_inputs((5,), 8, 6, torch.float64, GPU)
    is_image = mask_from_runs(5, [(1, 2)], GPU)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i)  # backend=None: no float64 kernels, so reference
    torch.testing.assert_close(y, modality_linear_reference(x, is_image, w_t, b_t, w_i, b_i))

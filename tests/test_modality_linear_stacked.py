"""The stacked-weight routed GEMM (one 3-D TMA descriptor over [2, N, K]): interpreter tier.

When ``weight_image`` starts exactly where ``weight_text`` ends in one storage (``ModalityLinear``
allocates them so), the forward GEMM and dX read both weights through one TMA descriptor
(``routed_mm_tma_kernel``); otherwise the pointer kernel (``routed_mm_kernel``) runs. Each test
checks which kernel ran (a launch spy) and compares against the float64 reference, forward and every
gradient, with poisoned outputs. The sm_90 compile claims are in test_modality_linear_static.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llavit_kernels.nn import ModalityLinear
from llavit_kernels.ops import _modality_linear_kernels as kern
from llavit_kernels.ops import _modality_linear_triton as mlt
from llavit_kernels.ops.modality_linear import modality_linear, stacked_base
from llavit_kernels.ops.modality_linear import modality_qkv as modality_qkv_op

from test_modality_linear_triton import (
    DEV, HAS_CUDA, TM, check_linear, check_qkv, mask_from_runs, named_layouts, rope_tables,
)


# the small odd widths here take Triton's slow path on purpose (test_modality_linear_triton tests the warning)
pytestmark = pytest.mark.filterwarnings("ignore:.*slow path")


# ----------------------------------------------------------------------------- helpers
def stacked_inputs(M_shape, K, N, dtype, device=DEV, bias=(True, True), seed=1234):
    """x and the two weights as halves of one [2, N, K] tensor (leaf Parameters, as ModalityLinear)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*M_shape, K, generator=g).to(device, dtype).requires_grad_(True)
    weights = (torch.randn(2, N, K, generator=g) / K ** 0.5).to(device, dtype)
    w_t, w_i = torch.nn.Parameter(weights[0]), torch.nn.Parameter(weights[1])
    b_t = torch.randn(N, generator=g).to(device, dtype).requires_grad_(True) if bias[0] else None
    b_i = torch.randn(N, generator=g).to(device, dtype).requires_grad_(True) if bias[1] else None
    assert stacked_base(w_t, w_i) is not None
    return x, w_t, b_t, w_i, b_i


class _Spy:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(kern, "routed_mm_kernel", _Spy(kern.routed_mm_kernel, "pointer", log))
    monkeypatch.setattr(kern, "routed_mm_tma_kernel", _Spy(kern.routed_mm_tma_kernel, "tma", log))
    return log


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(mlt, "POISON_OUTPUTS", True)


# fp32 takes the stacked kernel only in the interpreter (on a GPU, 16-bit dtypes: what sm_90 compiles)
fp32_interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="fp32 keeps the pointer kernel on a GPU; "
                                           "the GPU tier is test_gpu_stacked_every_config (bf16)")


@pytest.fixture(autouse=True)
def _few_configs_on_gpu(monkeypatch):
    # on a GPU every new shape would autotune every config: one plain and one RoPE config here
    # (test_gpu_stacked_every_config runs each config on its own)
    if HAS_CUDA:
        cfgs = kern.TMA_CONFIGS
        keep = [cfgs[kern.TMA_TWO_CTA_CONFIG]] + [c for c in cfgs if c.kwargs["EPILOGUE"] == "rope"][:1]
        monkeypatch.setattr(kern.routed_mm_tma_kernel, "configs", keep)
        monkeypatch.setattr(kern.routed_mm_tma_kernel, "cache", {})


# ----------------------------------------------------------------------------- detection
def test_stacked_base_detects_exactly_stacked_halves():
    W = torch.randn(2, 8, 16)
    base = stacked_base(W[0], W[1])
    assert base is not None and base.shape == (2, 8, 16) and torch.equal(base, W)
    assert stacked_base(W[1], W[0]) is None  # image before text: a negative offset
    assert stacked_base(W[0], W[0]) is None
    assert stacked_base(torch.randn(8, 16), torch.randn(8, 16)) is None  # two storages
    big = torch.randn(3, 8, 16)
    assert stacked_base(big[0], big[2]) is None  # a gap between them
    assert stacked_base(W[0].double(), W[1].double()) is None  # copies
    Wt = torch.randn(2, 16, 8)
    assert stacked_base(Wt[0].t(), Wt[1].t()) is None  # not contiguous
    odd = torch.randn(2, 8, 5)  # rows of 20 bytes: not a TMA stride
    assert stacked_base(odd[0], odd[1]) is None
    flat = torch.randn(2 * 8 * 16 + 1)
    assert stacked_base(flat[1:129].view(8, 16), flat[129:].view(8, 16)) is None  # 4 bytes off 16-byte alignment
    assert stacked_base(torch.empty(0, 16), torch.empty(0, 16)) is None


@fp32_interpreter_only
def test_kernel_choice(launches):
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 24, 20, torch.float32)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    y.sum().backward()
    assert launches == ["tma", "tma"], launches  # forward and dX
    launches.clear()
    modality_linear(x, is_image, w_t.detach().clone(), b_t, w_i.detach().clone(), b_i, backend="triton")
    assert launches == ["pointer"], launches
    launches.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlt, "USE_STACKED_TMA", False)
        modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    assert launches == ["pointer"], launches


# ----------------------------------------------------------------------------- numerics
@fp32_interpreter_only
@pytest.mark.parametrize("name", list(named_layouts(TM)))
def test_stacked_linear_fp32_layouts(name, launches, poison):
    M, spans = named_layouts(TM)[name]
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 24, 20, torch.float32)
    check_linear(mask_from_runs(M, spans), x, w_t, b_t, w_i, b_i, torch.float32)
    assert launches.count("tma") == 2 and "pointer" not in launches, launches


@pytest.mark.skipif(HAS_CUDA, reason="hypothesis fuzzing runs in the interpreter tier")
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 2 * TM + 1)), min_size=1, max_size=5),
    st.integers(1, 9).map(lambda k: 4 * k),  # fp32 rows must be 16-byte multiples for TMA
    st.integers(1, 37),
    st.tuples(st.booleans(), st.booleans()),
)
def test_stacked_linear_fuzz(runs, K, N, bias):
    is_image = torch.cat([torch.full((n,), img, dtype=torch.bool, device=DEV) for img, n in runs])
    x, w_t, b_t, w_i, b_i = stacked_inputs((is_image.numel(),), K, N, torch.float32, bias=bias)
    assert mlt.uses_stacked_kernel(x, w_t, w_i)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlt, "POISON_OUTPUTS", True)
        check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stacked_linear_low_precision(dtype, launches, poison):
    # bf16: the interpreter computes the dot in fp32 (UPCAST), as for the pointer kernel
    M, spans = named_layouts(TM)["mixed"]
    x, w_t, b_t, w_i, b_i = stacked_inputs((2, M), 32, 24, dtype)
    is_image = torch.stack([mask_from_runs(M, spans), ~mask_from_runs(M, spans)])
    check_linear(is_image, x, w_t, b_t, w_i, b_i, dtype)
    assert launches.count("tma") == 2 and "pointer" not in launches, launches


def test_stacked_equals_pointer_kernel(poison):
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 40, 36, torch.float32)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    y2 = modality_linear(x, is_image, w_t.detach().clone(), b_t, w_i.detach().clone(), b_i, backend="triton")
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-5)


QKV_STACKED_CASES = [
    # (lead shape, H, Hkv, D, hidden, rope, kernel expected)
    ((2, TM + 3), 4, 2, 8, 24, None, "tma"),
    ((2, TM + 3), 4, 2, 8, 24, "shared", "tma"),  # two heads per 16-wide interpreter tile
    ((TM * 2 + 5,), 2, 2, 16, 16, "packed", "tma"),  # one head per tile
    ((TM + 1,), 3, 1, 6, 12, None, "tma"),  # heads straddle tiles (no RoPE: any head dim)
    ((2, TM + 3), 2, 1, 12, 20, "batched", "pointer"),  # D = 12 with RoPE: not a power of two
    ((TM + 2,), 2, 1, 32, 16, "shared", "pointer"),  # D = 32 with RoPE: wider than the tile
]


@fp32_interpreter_only
@pytest.mark.parametrize("case", QKV_STACKED_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-H{c[1]}-Hkv{c[2]}-D{c[3]}-{c[5]}-{c[6]}")
def test_stacked_qkv_fp32(case, launches, poison):
    lead, H, Hkv, D, hidden, rope, expected = case
    N = (H + 2 * Hkv) * D
    is_image = torch.zeros(lead, dtype=torch.bool, device=DEV)
    flat = is_image.view(-1)
    flat[3:TM + 5] = True
    flat[-2:] = True
    x, w_t, b_t, w_i, b_i = stacked_inputs(lead, hidden, N, torch.float32)
    T = lead[-1]
    cos = sin = None
    if rope in ("shared", "packed"):
        cos, sin = rope_tables(T, D)
    elif rope == "batched":
        cos, sin = rope_tables(T, D, batch=lead[0])
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)
    assert launches == [expected, "tma"], launches  # forward (RoPE may fall back), then dX


def test_stacked_qkv_bf16_rope(launches, poison):
    lead, H, Hkv, D, hidden = (2, TM + 3), 2, 1, 8, 32
    is_image = torch.zeros(lead, dtype=torch.bool, device=DEV)
    is_image.view(-1)[5:TM + 9] = True
    x, w_t, b_t, w_i, b_i = stacked_inputs(lead, hidden, (H + 2 * Hkv) * D, torch.bfloat16)
    cos, sin = rope_tables(lead[-1], D, dtype=torch.bfloat16)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.bfloat16)
    assert set(launches) == {"tma"}, launches


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tier runs the configs at their real tile size")
def test_gpu_tma_tile_shapes_in_interpreter(monkeypatch, launches, poison):
    # each GPU config's BLOCK_N / BLOCK_K (128 / 256 x 64) with the interpreter's BLOCK_M: the
    # descriptor's zero-filled N and K tails, the per-column q/k/v stores and whole-head RoPE tiles
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    monkeypatch.setattr(kern, "TMA_ROPE_BLOCK_N", math.gcd(*[t[0] for t in kern.TMA_TILES if t[5] == "rope"]))
    tma = kern.routed_mm_tma_kernel.kernel  # under the launch spy
    for cfg in kern.tma_gemm_configs(interpret=False):
        if cfg.num_stages != 3:
            continue  # stages do not change what the interpreter computes
        plain = triton_config(cfg)
        monkeypatch.setattr(tma, "configs", [plain])
        monkeypatch.setattr(tma, "cache", {})
        if cfg.kwargs["EPILOGUE"] == "plain":
            x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 72, 136, torch.float32)  # K tail 8, N tail 8 (or 120)
            check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.float32)
        # D = 64: two heads per 128-wide tile (a partial last tile of heads); D = 128: one head per tile
        for H, Hkv, D in ((3, 1, 64), (2, 1, 128)):
            x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 40, (H + 2 * Hkv) * D, torch.float32)
            cos, sin = rope_tables(M, D) if cfg.kwargs["EPILOGUE"] == "rope" else (None, None)
            check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)
    assert launches and set(launches) == {"tma"}, launches


def triton_config(cfg):
    import triton

    return triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=1, pre_hook=cfg.pre_hook)


# ----------------------------------------------------------------------------- the module's storage
def test_module_weights_are_stacked_and_keep_their_names():
    m = ModalityLinear(16, 8)
    assert m.stacked and list(m.state_dict()) == ["weight", "weight_image", "bias", "bias_image"]
    assert m.weight.is_leaf and m.weight_image.is_leaf
    assert m.bias.data_ptr() + 8 * 4 == m.bias_image.data_ptr()
    assert torch.equal(m.weight, m.weight_image)  # the image side starts as a copy
    assert ModalityLinear(16, 8, bias=False).stacked


def test_module_stacking_survives_conversions_copies_and_loads():
    m = ModalityLinear(16, 8)
    with torch.no_grad():
        m.weight_image.add_(1.0)
    params = (m.weight, m.weight_image)
    ref = {k: v.clone() for k, v in m.state_dict().items()}

    m2 = ModalityLinear(16, 8)
    m2.load_state_dict(ref)
    assert m2.stacked and all(torch.equal(m2.state_dict()[k], v) for k, v in ref.items())
    m3 = copy.deepcopy(m)  # Parameter.__deepcopy__ clones each one alone: re-stacked
    assert m3.stacked and torch.equal(m3.weight_image, ref["weight_image"])
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).stacked
    m.half()
    assert m.stacked and m.weight.dtype == torch.float16 and (m.weight, m.weight_image) == params  # same Parameters
    m.to(torch.float32)
    assert m.stacked and torch.equal(m.weight_image, ref["weight_image"].half().float())
    m4 = ModalityLinear(16, 8)
    m4.load_state_dict(ref, assign=True)
    assert m4.stacked and torch.equal(m4.weight, ref["weight"])
    # replacing a parameter loses the sharing (the op falls back, correctly); stack_weights_ restores it
    m.weight = torch.nn.Parameter(torch.randn(8, 16))
    assert not m.stacked
    w = m.weight
    m.stack_weights_()
    assert m.stacked and m.weight is w


def test_module_sharing_survives_an_optimizer_step():
    m = ModalityLinear(16, 8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(4, 5, 16)
    is_image = torch.rand(4, 5) < 0.5
    m(x, is_image).square().sum().backward()
    opt.step()
    assert m.stacked


@fp32_interpreter_only
def test_module_forward_takes_the_stacked_kernel(launches, poison):
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    m = ModalityLinear(24, 20).to(DEV)
    with torch.no_grad():
        m.weight_image.mul_(-0.5)
        m.bias_image.add_(1.0)
    x = torch.randn(M, 24, device=DEV, requires_grad=True)
    y = modality_linear(x, is_image, m.weight, m.bias, m.weight_image, m.bias_image, backend="triton")
    y.square().sum().backward()
    assert launches == ["tma", "tma"], launches
    ref = torch.where(is_image[:, None], x @ m.weight_image.T + m.bias_image, x @ m.weight.T + m.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_autocast_cast_keeps_the_pair_stacked():
    from llavit_kernels.nn.linear import _StackedCast

    m = ModalityLinear(16, 8)
    w, wi = _StackedCast.apply(m.weight, m.weight_image, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and stacked_base(w, wi) is not None
    (w.float().sum() + 2 * wi.float().sum()).backward()
    assert torch.equal(m.weight.grad, torch.ones_like(m.weight)) and torch.equal(m.weight_image.grad, 2 * torch.ones_like(m.weight))
    w2, wi2 = _StackedCast.apply(torch.randn(8, 16), torch.randn(8, 16), torch.bfloat16)  # not stacked in: stacked out
    assert stacked_base(w2, wi2) is not None


# ----------------------------------------------------------------------------- GPU tier
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (GPU tier)")


@requires_cuda
@pytest.mark.parametrize("index", range(len(kern.tma_gemm_configs(interpret=False))))
def test_gpu_stacked_every_config(index, monkeypatch, launches, poison):
    # bf16 at real tile sizes, each config on its own: linear (fwd + every gradient) for plain
    # configs, QKV with RoPE at head dim 128 for RoPE configs
    cfg = kern.TMA_CONFIGS[index]
    monkeypatch.setattr(kern.routed_mm_tma_kernel.kernel, "configs", [cfg])
    monkeypatch.setattr(kern.routed_mm_tma_kernel.kernel, "cache", {})
    M = 3 * 128 + 40
    is_image = mask_from_runs(M, [(5, 129), (300, 64), (M - 3, 3)])
    if cfg.kwargs["EPILOGUE"] == "plain":
        x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 256, 392, torch.bfloat16)  # N tail of 8 (or 136)
        check_linear(is_image, x, w_t, b_t, w_i, b_i, torch.bfloat16)
    H, Hkv, D = 3, 1, 128
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 192, (H + 2 * Hkv) * D, torch.bfloat16)
    cos, sin = rope_tables(M, D, dtype=torch.bfloat16) if cfg.kwargs["EPILOGUE"] == "rope" else (None, None)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.bfloat16)
    assert launches and launches[0] == "tma", launches


def test_attention_fuses_text_and_image_qkv_into_one_stacked_tensor():
    # LlavitAttention concatenates text q|k|v and image q|k|v in ONE torch.cat, so the fused
    # weights it passes to modality_qkv are stacked (the one-descriptor kernel), with gradients
    # flowing back to every projection
    from llavit_kernels.nn import LlavitAttention

    attn = LlavitAttention(32, 4, 2)
    (w_t, b_t), (w_i, b_i) = attn._fused_weights(None)
    assert stacked_base(w_t, w_i) is not None and b_t.data_ptr() + b_t.numel() * 4 == b_i.data_ptr()
    text_linears, image_linears = attn._qkv_modules()
    torch.testing.assert_close(w_t, torch.cat([lin.weight for lin in text_linears]))
    torch.testing.assert_close(w_i, torch.cat([lin.weight for lin in image_linears]))
    torch.testing.assert_close(b_i, torch.cat([lin.bias for lin in image_linears]))
    (w_t.sum() + 2 * w_i.sum()).backward()
    assert torch.equal(text_linears[1].weight.grad, torch.ones_like(text_linears[1].weight))
    assert torch.equal(image_linears[2].weight.grad, 2 * torch.ones_like(image_linears[2].weight))
    (w_t, _), (w_i, _) = attn._fused_weights(torch.float16)
    assert w_t.dtype == torch.float16 and stacked_base(w_t, w_i) is not None


@fp32_interpreter_only
def test_opcheck_stacked():
    M = TM + 5
    is_image = mask_from_runs(M, [(2, TM)])
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 16, 32, torch.float32)
    table = mlt.ml_token_order(is_image)
    torch.library.opcheck(mlt.ml_linear, (x, table, w_t, b_t, w_i, b_i))
    dy = torch.randn(M, 32, device=DEV)
    torch.library.opcheck(mlt.ml_linear_dx, (dy, table, w_t.detach(), w_i.detach()))
    cos, sin = rope_tables(M, 8)
    torch.library.opcheck(mlt.ml_qkv, (x, table, w_t, b_t, w_i, b_i, cos, sin, 2, 1))


@fp32_interpreter_only
def test_module_under_torch_compile_keeps_the_stacked_kernel(launches):
    # aot_eager: the custom op receives the parameters themselves, still the halves of one tensor
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    m = ModalityLinear(16, 32, device=DEV)
    x = torch.randn(M, 16, device=DEV, requires_grad=True)

    def step(x):
        return modality_linear(x, is_image, m.weight, m.bias, m.weight_image, m.bias_image, backend="triton")

    y = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    assert launches == ["tma", "tma"], launches
    ref = torch.where(is_image[:, None], x @ m.weight_image.T + m.bias_image, x @ m.weight.T + m.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_stacked_launches_run_under_the_device_guard(monkeypatch):
    # as test_every_launch_runs_under_the_device_guard, for the one-descriptor kernel (fwd, QKV, dX)
    import contextlib

    guards, launches = [], []
    real_guard = mlt._on_device

    @contextlib.contextmanager
    def spy_guard(t):
        guards.append(t.device)
        with real_guard(t):
            yield
        guards.pop()

    class GuardSpy(_Spy):
        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                self.log.append(guards[-1] if guards else None)
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(mlt, "_on_device", spy_guard)
    monkeypatch.setattr(kern, "routed_mm_tma_kernel", GuardSpy(kern.routed_mm_tma_kernel, "tma", launches))
    M, spans = named_layouts(TM)["mixed"]
    is_image = mask_from_runs(M, spans)
    H, Hkv, D = 2, 1, 8
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    x, w_t, b_t, w_i, b_i = stacked_inputs((M,), 16, (H + 2 * Hkv) * D, dtype)
    cos, sin = rope_tables(M, D, dtype=dtype)
    y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
    q, k, v = modality_qkv_op(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
    torch.autograd.grad(y.float().sum() + q.float().sum() + k.float().sum() + v.float().sum(), [x, w_t])
    assert len(launches) == 4 and all(d == x.device for d in launches), launches  # y, qkv, 2 x dX


@fp32_interpreter_only
@pytest.mark.parametrize("D", [8, 16])  # two heads per 16-wide interpreter tile; one head per tile
def test_stacked_qkv_rope_asymmetric_tables(D, launches, poison):
    # real rotary tables repeat their first half (cos[d] == cos[d + D/2]), which would hide a swap of
    # the halves' tables: random tables (the op is defined for any cos / sin) catch it
    lead, H, Hkv, hidden = (2, TM + 3), 2, 1, 24
    is_image = torch.zeros(lead, dtype=torch.bool, device=DEV)
    is_image.view(-1)[4:TM + 6] = True
    x, w_t, b_t, w_i, b_i = stacked_inputs(lead, hidden, (H + 2 * Hkv) * D, torch.float32)
    g = torch.Generator().manual_seed(5)
    cos, sin = (torch.randn(lead[-1], D, generator=g).to(DEV) for _ in range(2))
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)
    assert launches == ["tma", "tma"], launches

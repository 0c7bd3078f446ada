"""RoPE, fast, in the CPU tier: the reference's rotate-half against an explicit 2-D rotation of each
pair (d, d + D/2) in float64, and the fused QKV RoPE epilogue (forward) and prologue (backward) of the
Triton kernels in the interpreter, fp32, small shapes, a few seconds.

The tables here have DIFFERENT values in their two halves. Real RoPE tables repeat the same angles in
both halves (cos[d] == cos[d + D/2]), so a kernel that reads the first half's cos / sin for the
second half passes every test built on real tables, while the op's contract (``cos, sin [..., T, D]``,
``x * cos + rotate_half(x) * sin``) is broken. Before this file such mixups in the epilogue survived
the whole CPU tier, and the RoPE epilogue was exercised mainly by a 40-second interpreter test
(test_gpu_config_tile_shapes_in_interpreter).
"""

import pytest
import torch

from llavit_kernels.ops.modality_linear import apply_rotary, modality_qkv

from test_modality_linear_triton import DEV, TM, check_qkv, make_linear_inputs, mask_from_runs  # noqa: E402


def distinct_half_tables(lead, D, seed=0, device=DEV):
    """cos / sin [*lead, D] from independent angles per column (halves differ)."""
    ang = torch.rand(*lead, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6.0 - 3.0
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rotate_pairs_float64(x, cos, sin):
    """x [..., T, H, D]: each pair (x[d], x[d + D/2]) rotated by its own table entries, written out longhand."""
    x, cos, sin = x.double(), cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    h = x.shape[-1] // 2
    lo, hi = x[..., :h], x[..., h:]
    out_lo = lo * cos[..., :h] - hi * sin[..., :h]
    out_hi = hi * cos[..., h:] + lo * sin[..., h:]
    return torch.cat([out_lo, out_hi], -1)


def test_reference_rotate_half_rotates_each_pair_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, 10, generator=g)
    cos, sin = distinct_half_tables((2, 7), 10, device="cpu")
    torch.testing.assert_close(apply_rotary(x, cos, sin), rotate_pairs_float64(x, cos, sin).float(), rtol=1e-6, atol=1e-6)
    # real tables (same angles in both halves) make it a rotation: norms of every pair are kept
    ang = torch.rand(7, 5, generator=g) * 6
    cos_r, sin_r = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    y = apply_rotary(x, cos_r, sin_r)
    pair_norm = lambda t: t[..., :5] ** 2 + t[..., 5:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-5)


# (lead shape, H, Hkv, D, table shape): D=32 spans two half-tiles per head in the interpreter
# (BLOCK_N=16, so 8 columns of each half per tile); D=12 leaves a masked half tile; GQA 2:1 and 3:1.
CASES = [
    ((TM + 5,), 2, 1, 32, "shared"),
    ((2, 9), 3, 1, 12, "batched"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-H{c[1]}-Hkv{c[2]}-D{c[3]}-{c[4]}")
def test_fused_qkv_rope_epilogue_fp32_with_distinct_half_tables(case, monkeypatch):
    """modality_qkv(backend="triton") with RoPE: q, k rotated, v not, fwd and every gradient, vs float64."""
    from llavit_kernels.ops import _modality_linear_triton as mlt

    monkeypatch.setattr(mlt, "POISON_OUTPUTS", True)  # unwritten elements show as non-finite
    lead, H, Hkv, D, table = case
    M = 1
    for n in lead:
        M *= n
    is_image = mask_from_runs(M, [(2, max(3, M // 2)), (M - 1, 1)]).reshape(lead)
    x, w_t, b_t, w_i, b_i = make_linear_inputs(lead, 8, (H + 2 * Hkv) * D, torch.float32, DEV)
    cos, sin = distinct_half_tables(lead if table == "batched" else lead[-1:], D, seed=D)
    check_qkv(is_image, x, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, torch.float32)
    # and against the longhand rotation directly (independent of the reference's rotate_half)
    q, k, v = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos, sin, backend="triton")
    q0, k0, v0 = modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, backend="triton")
    torch.testing.assert_close(q.double(), rotate_pairs_float64(q0, cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), rotate_pairs_float64(k0, cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v0, rtol=0, atol=0)

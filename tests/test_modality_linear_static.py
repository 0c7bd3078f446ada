"""Static GPU tier of the modality_linear kernels: every autotune config compiles for sm_90.

Each config of every kernel is compiled for Hopper in bf16 and fp16 (the training dtypes) with the
specialisations Triton's launcher applies at run time (16-aligned pointers, widths and strides that
are multiples of 16, unit strides as constants), then checked for: no local memory (spills: LOCAL
and STACK both 0), shared memory within the H100's 227 KB, and warpgroup MMA (HGMMA) in the GEMMs.
The opt-in TMA variant of the GEMM is compiled the same way (tensor-descriptor arguments).
No GPU needed; one subprocess pool for all compiles (tests/sm90.py).
"""

from __future__ import annotations

import inspect

import pytest

from llavit_kernels.ops import _modality_linear_kernels as kern
from llavit_kernels.ops import _modality_linear_tma as tma
from sm90 import H100_SHARED_LIMIT, compile_sm90, compile_sm90_many

DTYPES = {"bf16": "*bf16", "fp16": "*fp16"}

MM_PTRS = ["a_ptr", "bt_ptr", "bi_ptr", "biast_ptr", "biasi_ptr", "table_ptr", "out_ptr", "k_out_ptr", "v_out_ptr",
           "cos_ptr", "sin_ptr"]
MM_INTS = ["M", "N", "K", "stride_am", "stride_bn", "stride_bk", "stride_om", "n_slots", "num_heads", "num_kv_heads",
           "cos_rows", "has_bias_text", "has_bias_image"]


def _mm_job(cfg, dtype, mode):
    sig = {p: DTYPES[dtype] for p in MM_PTRS}
    sig.update(table_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32")
    sig.update({i: "i32" for i in MM_INTS})
    qkv = mode in ("qkv", "qkv_rope")
    consts = dict(HEAD_DIM=128, QKV=qkv, ROPE=mode == "qkv_rope", HAS_BIAS=mode != "dx", UPCAST=False,
                  DOT_PRECISION="tf32", BLOCK_M=kern.TILE_M_GPU, EVEN_K=True, **cfg.kwargs)
    unit = "stride_bn" if mode == "dx" else "stride_bk"  # dX reads W transposed
    consts[unit] = 1
    del sig[unit]
    div = MM_PTRS + ["N", "K", "stride_am", "stride_om"] + (["stride_bk"] if mode == "dx" else ["stride_bn"])
    return dict(kernel=kern.routed_mm_kernel, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, divisible_by_16=div, _id=f"mm-{mode}-{dtype}-{cfg}")


def _dw_job(cfg, dtype, split):
    ptrs = ["dy_ptr", "x_ptr", "table_ptr", "dwt_ptr", "dwi_ptr", "dbt_ptr", "dbi_ptr"]
    sig = {p: DTYPES[dtype] for p in ptrs}
    sig.update(table_ptr="*i32", dbt_ptr="*fp32", dbi_ptr="*fp32", M="i32", N="i32", K="i32")
    if split > 1:  # split partials go to float32 workspaces; one split writes dW, db in the dtype
        sig.update(dwt_ptr="*fp32", dwi_ptr="*fp32")
    else:
        sig.update(dbt_ptr=DTYPES[dtype], dbi_ptr=DTYPES[dtype])
    consts = dict(SPLIT=split, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=kern.TILE_M_GPU, **cfg.kwargs)
    return dict(kernel=kern.routed_dw_kernel, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, divisible_by_16=ptrs + ["N", "K"], _id=f"dw-split{split}-{dtype}-{cfg}")


def _grad_job(dtype, rope):
    ptrs = ["dq_ptr", "dk_ptr", "dv_ptr", "cos_ptr", "sin_ptr", "dy_ptr"]
    sig = {p: DTYPES[dtype] for p in ptrs}
    sig.update(cos_ptr="*fp32", sin_ptr="*fp32", M="i32", num_heads="i32", num_kv_heads="i32", cos_rows="i32")
    consts = dict(HEAD_DIM=128, ROPE=rope, BLOCK_M=32, BLOCK_D=64 if rope else 128)
    return dict(kernel=kern.qkv_grad_kernel, signature=sig, constexprs=consts, num_warps=4, num_stages=1,
                divisible_by_16=ptrs, _id=f"qkv_grad-rope{rope}-{dtype}")


def _tma_job(cfg, dtype, w_is_nk):
    bn, bk, bm = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], kern.TILE_M_GPU
    el = dtype
    b_block = f"[{bn}, {bk}]" if w_is_nk else f"[{bk}, {bn}]"
    sig = dict(a_desc=f"tensordesc<{el}[{bm}, {bk}]>", bt_desc=f"tensordesc<{el}{b_block}>",
               bi_desc=f"tensordesc<{el}{b_block}>")
    ptrs = ["biast_ptr", "biasi_ptr", "table_ptr", "out_ptr"]
    sig.update({p: DTYPES[dtype] for p in ptrs})
    sig.update(table_ptr="*i32", M="i32", N="i32", K="i32", stride_om="i32", n_slots="i32", has_bias_text="i32",
               has_bias_image="i32")
    consts = dict(W_IS_NK=w_is_nk, HAS_BIAS=w_is_nk, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=bm, **cfg.kwargs)
    return dict(kernel=tma.routed_mm_tma_kernel, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, divisible_by_16=ptrs + ["N", "K", "stride_om"],
                _id=f"tma-{'fwd' if w_is_nk else 'dx'}-{dtype}-{cfg}")


def _table_jobs():
    common = dict(TILE_M=kern.TILE_M_GPU, WINDOW=kern.TABLE_WINDOW)
    return [
        dict(kernel=kern.tile_count_kernel, signature=dict(img_ptr="*u8", counts_ptr="*i32", M="i32"),
             constexprs=common, num_warps=4, num_stages=1, divisible_by_16=["img_ptr", "counts_ptr"],
             _id="tile_count"),
        dict(kernel=kern.tile_write_kernel,
             signature=dict(img_ptr="*u8", counts_ptr="*i32", table_ptr="*i32", M="i32", n_windows="i32"),
             constexprs=dict(common, WINDOWS_P2=64), num_warps=4, num_stages=1,
             divisible_by_16=["img_ptr", "counts_ptr", "table_ptr"], _id="tile_write"),
    ]


def _all_jobs():
    jobs = []
    for cfg in kern.gemm_configs(interpret=False):
        for dtype in DTYPES:
            for mode in ("fwd", "dx", "qkv_rope"):
                jobs.append(_mm_job(cfg, dtype, mode))
        jobs.append(_mm_job(cfg, "bf16", "qkv"))
    for cfg in kern.dw_configs(interpret=False):
        for dtype in DTYPES:
            jobs.append(_dw_job(cfg, dtype, 1))
        jobs.append(_dw_job(cfg, "bf16", 4))
    for dtype in DTYPES:
        for rope in (False, True):
            jobs.append(_grad_job(dtype, rope))
    jobs += _table_jobs()
    for cfg in tma.tma_configs(interpret=False):
        for dtype in DTYPES:
            jobs.append(_tma_job(cfg, dtype, True))
        jobs.append(_tma_job(cfg, "bf16", False))
    return jobs


@pytest.fixture(scope="module")
def compiled():
    # Without the launcher's 16-divisibility the loads cannot use cp.async, nothing is pipelined and
    # the register picture is not the one a real launch gets: the helper must support it.
    assert "divisible_by_16" in inspect.signature(compile_sm90).parameters, \
        "tests/sm90.py: compile_sm90 needs the divisible_by_16 argument (launch specialisation)"
    jobs = _all_jobs()
    ids = [j.pop("_id") for j in jobs]
    return list(zip(ids, jobs, compile_sm90_many(jobs)))


class _FakeTensor:
    def __init__(self, element_size):
        self._el = element_size

    def element_size(self):
        return self._el


@pytest.mark.parametrize("element_size", [2, 4])
def test_config_pruning_keeps_what_fits(monkeypatch, element_size):
    # the autotuner's early prune drops configs whose operand buffers overflow shared memory
    # (fp32 operands take twice the bytes); 16-bit operands keep every config
    monkeypatch.setattr(kern, "INTERPRET", False)
    gemm, dw = kern.gemm_configs(interpret=False), kern.dw_configs(interpret=False)
    kept_g = kern.prune_gemm_configs(gemm, {"a_ptr": _FakeTensor(element_size)}, BLOCK_M=kern.TILE_M_GPU)
    kept_d = kern.prune_dw_configs(dw, {"dy_ptr": _FakeTensor(element_size)}, BLOCK_M=kern.TILE_M_GPU)
    bm = kern.TILE_M_GPU
    for c in kept_g:
        assert c.num_stages * (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * element_size <= kern.SMEM_BUDGET
    for c in kept_d:
        assert c.num_stages * bm * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]) * element_size <= kern.SMEM_BUDGET
    if element_size == 2:
        assert kept_g == gemm and kept_d == dw
    else:
        assert kept_g and kept_d and len(kept_g) < len(gemm) and len(kept_d) < len(dw)


def test_configs_cover_the_gpu_tile():
    assert kern.TILE_M_GPU == 128
    assert len(kern.gemm_configs(interpret=False)) >= 3 and len(kern.dw_configs(interpret=False)) >= 2


def test_every_config_compiles_for_sm90_without_spills(compiled):
    bad = []
    for name, job, res in compiled:
        problems = []
        if res["local_bytes"] or res["stack_bytes"]:
            problems.append(f"spills: LOCAL={res['local_bytes']} STACK={res['stack_bytes']}")
        if res["shared_total"] > H100_SHARED_LIMIT:
            problems.append(f"shared {res['shared_total']} B > {H100_SHARED_LIMIT}")
        gemm = job["kernel"] in (kern.routed_mm_kernel, kern.routed_dw_kernel, tma.routed_mm_tma_kernel)
        if gemm and not res["hgmma"]:
            problems.append("no HGMMA in SASS")
        if problems:
            bad.append(f"{name} (regs {res['registers']}): {'; '.join(problems)}")
    assert not bad, "\n".join(bad)

"""Static GPU tier of the modality_linear kernels: every autotune config compiles for sm_90.

Each config of every kernel is compiled for Hopper in bf16 and fp16 (the training dtypes) with the
specialisations Triton's launcher applies at run time (16-aligned pointers, widths and strides that
are multiples of 16, unit strides as constants), then checked for: no local memory (spills: LOCAL
and STACK both 0), shared memory within the H100's 227 KB, warpgroup MMA (HGMMA) in the GEMMs, no
wgmma serialisation reported by ptxas (C7515), and, in the TTGIR, enough shared buffers behind
every asynchronous wgmma operand that a cp.async never refills a buffer a pending wgmma reads (the
dW/db race of Triton issue 6691), with the dW kernel prefetching at least two tiles ahead.
HGMMA shapes are printed per config. No GPU needed; one subprocess pool for all compiles
(tests/sm90.py: compile_sm90_many, wgmma_operands, refill_races).
"""

from __future__ import annotations

import inspect

import pytest

from llavit_kernels.ops import _modality_linear_kernels as kern
import sm90
from sm90 import H100_SHARED_LIMIT, compile_sm90, compile_sm90_many, refill_races, wgmma_operands

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


TMA_PTRS = ["a_ptr", "biast_ptr", "biasi_ptr", "table_ptr", "out_ptr", "k_out_ptr", "v_out_ptr", "cos_ptr", "sin_ptr"]
TMA_INTS = ["M", "N", "K", "stride_am", "stride_om", "n_slots", "num_heads", "num_kv_heads", "cos_rows",
            "has_bias_text", "has_bias_image"]


def _tma_job(cfg, dtype, mode, cos="*fp32", head_dim=128):
    """The stacked-weight kernel as a launch specialises it: the weight is one host TMA descriptor
    over [2, N, K] (``tensordesc<bf16[1, BLOCK_N, BLOCK_K]>``, the dX read ``[1, BLOCK_K, BLOCK_N]``).
    N and K are runtime ints (16-divisible at every model shape, e.g. 3584 -> 4608 and 2048 -> 2560),
    so one compile stands for every such shape."""
    bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    dt = DTYPES[dtype][1:]
    sig = {p: DTYPES[dtype] for p in TMA_PTRS}
    sig.update(table_ptr="*i32", cos_ptr=cos, sin_ptr=cos)
    sig.update({i: "i32" for i in TMA_INTS})
    sig["w_desc"] = f"tensordesc<{dt}[1, {bk}, {bn}]>" if mode == "dx" else f"tensordesc<{dt}[1, {bn}, {bk}]>"
    consts = dict(HEAD_DIM=head_dim, QKV=mode.startswith("qkv"), ROPE=mode == "qkv_rope", HAS_BIAS=mode != "dx",
                  TRANS_B=mode == "dx", UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=kern.TILE_M_GPU, EVEN_K=True,
                  **cfg.kwargs)
    return dict(kernel=kern.routed_mm_tma_kernel, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                divisible_by_16=TMA_PTRS + ["N", "K", "stride_am", "stride_om"],
                _id=f"tma-{mode}-{dtype}-d{head_dim}-{cfg}")


def _tma_jobs():
    jobs = []
    for cfg in kern.tma_gemm_configs(interpret=False):
        rope = cfg.kwargs["EPILOGUE"] == "rope"
        modes = ("qkv_rope",) if rope else ("fwd", "dx", "qkv")
        for dtype in DTYPES:
            for mode in modes:
                jobs.append(_tma_job(cfg, dtype, mode))
        # other head dims (bf16): 64 (two heads per RoPE tile, Qwen2.5-0.5B), 80 (no RoPE: any head dim)
        jobs.append(_tma_job(cfg, "bf16", "qkv_rope" if rope else "qkv", head_dim=64 if rope else 80))
    return jobs


def _dw_job(cfg, dtype, split):
    ptrs = ["dy_ptr", "x_ptr", "table_ptr", "dwt_ptr", "dwi_ptr"]
    sig = {p: DTYPES[dtype] for p in ptrs}
    sig.update(table_ptr="*i32", M="i32", N="i32", K="i32")
    if split > 1:  # split partials go to float32 workspaces; one split writes dW in the dtype
        sig.update(dwt_ptr="*fp32", dwi_ptr="*fp32")
    consts = dict(SPLIT=split, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=kern.TILE_M_GPU, **cfg.kwargs)
    return dict(kernel=kern.routed_dw_kernel, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, divisible_by_16=ptrs + ["N", "K"], _id=f"dw-split{split}-{dtype}-{cfg}")


def _db_job(dtype, split):
    ptrs = ["dy_ptr", "table_ptr", "dbt_ptr", "dbi_ptr"]
    sig = dict(dy_ptr=DTYPES[dtype], table_ptr="*i32", M="i32", N="i32")
    sig.update(dbt_ptr="*fp32" if split > 1 else DTYPES[dtype], dbi_ptr="*fp32" if split > 1 else DTYPES[dtype])
    consts = dict(SPLIT=split, BLOCK_M=kern.TILE_M_GPU, BLOCK_N=kern.DB_BLOCK_N)
    return dict(kernel=kern.routed_db_kernel, signature=sig, constexprs=consts, num_warps=kern.DB_NUM_WARPS, num_stages=3,
                divisible_by_16=ptrs, _id=f"db-split{split}-{dtype}")


def _grad_job(dtype, rope):
    ptrs = ["dq_ptr", "dk_ptr", "dv_ptr", "cos_ptr", "sin_ptr", "dy_ptr"]
    sig = {p: DTYPES[dtype] for p in ptrs}
    sig.update(cos_ptr="*fp32", sin_ptr="*fp32", M="i32", num_heads="i32", num_kv_heads="i32", cos_rows="i32")
    consts = dict(HEAD_DIM=128, ROPE=rope, BLOCK_M=32, BLOCK_D=64 if rope else 128)
    return dict(kernel=kern.qkv_grad_kernel, signature=sig, constexprs=consts, num_warps=4, num_stages=1,
                divisible_by_16=ptrs, _id=f"qkv_grad-rope{rope}-{dtype}")


def _table_jobs():
    return [
        dict(kernel=kern.order_count_kernel, signature=dict(img_ptr="*u8", counts_ptr="*i32", M="i32"),
             constexprs=dict(WINDOW=kern.TABLE_WINDOW), num_warps=4, num_stages=1,
             divisible_by_16=["img_ptr", "counts_ptr"], _id="order_count"),
        dict(kernel=kern.order_write_kernel,
             signature=dict(img_ptr="*u8", counts_ptr="*i32", order_ptr="*i32", M="i32", n_windows="i32"),
             constexprs=dict(WINDOW=kern.TABLE_WINDOW, COUNTS_CHUNK=kern.COUNTS_CHUNK, PAD=kern.ORDER_PAD), num_warps=4, num_stages=1,
             divisible_by_16=["img_ptr", "counts_ptr", "order_ptr"], _id="order_write"),
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
        if kern.dw_config_allowed(cfg, 4):
            jobs.append(_dw_job(cfg, "bf16", 4))
    for dtype in DTYPES:
        jobs.append(_db_job(dtype, 1))
    jobs.append(_db_job("bf16", 4))
    for dtype in DTYPES:
        for rope in (False, True):
            jobs.append(_grad_job(dtype, rope))
    jobs += _table_jobs()
    jobs += _tma_jobs()
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
    # (fp32 operands take twice the bytes); 16-bit operands keep every config. Buffers per operand
    # as kern.stage_buffers says (test_pipelined_buffers_match_num_stages checks it on the TTGIR).
    monkeypatch.setattr(kern, "INTERPRET", False)
    gemm, dw = kern.gemm_configs(interpret=False), kern.dw_configs(interpret=False)
    kept_g = kern.prune_gemm_configs(gemm, {"a_ptr": _FakeTensor(element_size)}, BLOCK_M=kern.TILE_M_GPU)
    kept_d = kern.prune_dw_configs(dw, {"dy_ptr": _FakeTensor(element_size)}, BLOCK_M=kern.TILE_M_GPU)
    bm = kern.TILE_M_GPU
    for c in kept_g:
        buffers = kern.stage_buffers(c.num_stages)
        assert buffers * (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * element_size <= kern.SMEM_BUDGET
    for c in kept_d:
        buffers = kern.stage_buffers(c.num_stages, indirect=True)
        assert buffers * bm * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]) * element_size <= kern.SMEM_BUDGET
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
        gemm = job["kernel"] in (kern.routed_mm_kernel, kern.routed_dw_kernel, kern.routed_mm_tma_kernel)
        if gemm and not res["hgmma"]:
            problems.append("no HGMMA in SASS")
        if problems:
            bad.append(f"{name} (regs {res['registers']}): {'; '.join(problems)}")
    assert not bad, "\n".join(bad)


def test_no_wgmma_serialisation(compiled):
    # ptxas C7515 ("wgmma.mma_async instructions are serialized"): the async pipeline silently
    # becomes a serial one (the removed TMA variant had it, from its two branch main loops)
    bad = [f"{name}: {[w for w in res['ptxas_warnings'] if sm90._WGMMA_SERIAL_RE.search(w)]}"
           for name, _, res in compiled if res["wgmma_serialized"]]
    assert not bad, "\n".join(bad)


def test_no_refill_of_a_buffer_a_pending_wgmma_reads(compiled):
    # Every shared operand of an async wgmma that a cp.async (or TMA) refills needs more buffers
    # than the wgmmas left pending by the following wait; with one buffer and one pending wgmma the
    # next copy overwrites what the pending wgmma still reads (the old dW/db kernel did this).
    bad = [f"{name}: {race}" for name, job, res in compiled for race in res["refill_races"]]
    assert not bad, "\n".join(bad)


def test_the_pruned_split_dw_config_does_serialise():
    # end to end for the C7515 capture: the config the split-dW prune drops is reported as serialised
    # (ptxas prints it as "ptxas info : (C7515) ...", not as a warning); if this fails, either the
    # capture lost that form or the prune (dw_config_allowed) no longer has a reason
    dropped = [c for c in kern.dw_configs(interpret=False) if not kern.dw_config_allowed(c, 4)]
    assert dropped
    job = _dw_job(dropped[0], "bf16", 4)
    job.pop("_id")
    res = compile_sm90_many([job])[0]
    assert res["wgmma_serialized"], res["ptxas_warnings"]
    assert any("(C7515)" in w for w in res["ptxas_warnings"]), res["ptxas_warnings"]


def test_split_dw_prune_drops_the_serialising_config(monkeypatch):
    monkeypatch.setattr(kern, "INTERPRET", False)
    dw = kern.dw_configs(interpret=False)
    kept = kern.prune_dw_configs(dw, {"dy_ptr": _FakeTensor(2)}, BLOCK_M=kern.TILE_M_GPU, SPLIT=4)
    assert kept and all(kern.dw_config_allowed(c, 4) for c in kept) and len(kept) < len(dw)
    assert kern.prune_dw_configs(dw, {"dy_ptr": _FakeTensor(2)}, BLOCK_M=kern.TILE_M_GPU, SPLIT=1) == dw


def test_pipelined_buffers_match_num_stages(compiled):
    # what the configs (and the shared-memory prune) assume about buffers per operand
    # (kern.stage_buffers), and the dW kernel prefetches at least 2 tiles ahead (3 buffers)
    bad = []
    for name, job, res in compiled:
        if job["kernel"] not in (kern.routed_mm_kernel, kern.routed_dw_kernel, kern.routed_mm_tma_kernel):
            continue
        ops = [op for op in res["wgmma_operands"] if op["copy_target"]]
        if not ops:
            bad.append(f"{name}: no pipelined (cp.async-fed) wgmma operand found in the TTGIR")
        want = kern.stage_buffers(job["num_stages"], indirect=job["kernel"] is kern.routed_dw_kernel)
        for op in ops:
            if op["buffers"] != want:
                bad.append(f"{name}: operand {op['shape']} has {op['buffers']} buffers, num_stages={job['num_stages']}")
            if job["kernel"] is kern.routed_dw_kernel and op["buffers"] < 3:
                bad.append(f"{name}: dW operand {op['shape']} prefetch depth {op['buffers'] - 1} < 2")
    assert not bad, "\n".join(bad)


def test_report_hgmma_shapes(compiled, capsys):
    # the wgmma instruction shape per config (64xNx16: a small N wastes the tensor cores); printed
    # for the notes, and every GEMM config must use an N of at least 64
    lines = []
    for name, job, res in compiled:
        if res["hgmma_shapes"]:
            lines.append(f"{name}: regs {res['registers']} HGMMA {','.join(res['hgmma_shapes'])}")
            assert all(int(s.split("x")[1]) >= 64 for s in res["hgmma_shapes"]), (name, res["hgmma_shapes"])
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert lines


RACY_TTGIR = """
      %dyt_52 = ttg.local_alloc : () -> !ttg.memdesc<1x128x128xbf16, #shared1, #smem, mutable> loc(#loc176)
      %xt_53 = ttg.local_alloc : () -> !ttg.memdesc<2x128x64xbf16, #shared2, #smem, mutable> loc(#loc177)
      %dyt_87 = ttg.memdesc_index %dyt_52[%c0_i32] : !ttg.memdesc<1x128x128xbf16, #shared1, #smem, mutable> -> !ttg.memdesc<128x128xbf16, #shared1, #smem, mutable> loc(#loc176)
        %xt_131 = ttg.memdesc_index %xt_53[%db_128] : !ttg.memdesc<2x128x64xbf16, #shared2, #smem, mutable> -> !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> loc(#loc177)
        %acc = ttng.warp_group_dot %dyt_87, %xt_131, %arg11 {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x128xbf16, #shared1, #smem, mutable> * !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> -> tensor<128x64xf32, #mma> loc(#loc188)
        %acc_132:3 = ttng.warp_group_dot_wait %acc, %dyt_87, %xt_131 {pendings = 1 : i32} : tensor<128x64xf32, #mma>, !ttg.memdesc<128x128xbf16, #shared1, #smem, mutable>, !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable> loc(#loc188)
        %dyt_163 = ttg.async_copy_global_to_local %dyt_160, %dyt_87 mask %db_162 other %cst_1 {contiguity = 8 : i32} : tensor<128x128x!tt.ptr<bf16>, #blocked> -> <128x128xbf16, #shared1, #smem, mutable> loc(#loc176)
        %xt_176 = ttg.async_copy_global_to_local %xt_172, %xt_173 mask %db_175 other %cst_2 {contiguity = 8 : i32} : tensor<128x64x!tt.ptr<bf16>, #blocked1> -> <128x64xbf16, #shared2, #smem, mutable> loc(#loc177)
"""


def test_race_detector_flags_the_old_dw_kernel():
    # lines cut from the sm_90 TTGIR of the old dW+db kernel (128x64 tile, 4 warps, 3 stages):
    # the detector behind test_no_refill_of_a_buffer_a_pending_wgmma_reads must flag its dY operand
    ops = wgmma_operands(RACY_TTGIR)
    assert ops[0] == {"dot": 0, "operand": "a", "shape": [128, 128], "buffers": 1, "pipelined": True,
                      "copy_target": True, "pendings": 1}, ops
    assert ops[1]["operand"] == "b" and ops[1]["buffers"] == 2 and ops[1]["copy_target"] is False, ops
    races = refill_races(ops)
    assert len(races) == 1 and "operand a [128, 128]" in races[0], races
    # with a second dY buffer the same dot is fine
    assert not refill_races(wgmma_operands(RACY_TTGIR.replace("1x128x128xbf16", "2x128x128xbf16")))
    # and the shared rule set (sm90_problems, used by the span-attention tier) reports it too
    res = dict(name="k", wgmma_serialized=False, ptxas_warnings=[], local_insts_in_loops=0, shared_total=0,
               smem_buffer_issues=[], refill_races=races, hgmma=True, num_warps=4, num_stages=3, registers=100,
               hgmma_shapes={})
    assert sm90.sm90_problems(res) == races


def test_ptxas_c7515_info_line_counts_as_serialisation():
    # ptxas prints C7515 as an info line with a code, not as a warning: it must be captured and flagged
    log = "\n".join([
        "ptxas info    : 0 bytes gmem",
        "ptxas info    : Compiling entry function 'routed_dw_kernel' for 'sm_90a'",
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "insufficient register resources for the wgmma pipeline in the function 'routed_dw_kernel'",
        "ptxas info    : Used 168 registers, used 1 barriers, 0 bytes cumulative stack size",
    ])
    lines = sm90.ptxas_warning_lines(log)
    assert len(lines) == 1 and lines[0].startswith("ptxas info    : (C7515)"), lines
    assert any(sm90._WGMMA_SERIAL_RE.search(w) for w in lines)
    assert not sm90.ptxas_warning_lines("ptxas info    : Used 168 registers, used 1 barriers")


# ----------------------------------------------------------------------------- stacked-weight (TMA) kernel
SM90_REGISTERS_PER_SM = 64 * 1024
SM90_SHARED_PER_SM = 228 * 1024  # of which 1 KB per resident CTA is reserved by the hardware


def _ctas_per_sm(res):
    threads = res["num_warps"] * 32
    by_regs = SM90_REGISTERS_PER_SM // (threads * res["registers"])
    by_smem = SM90_SHARED_PER_SM // (res["shared_total"] + 1024)
    return min(by_regs, by_smem)


def _tma_results(compiled, **where):
    out = [(name, job, res) for name, job, res in compiled if job["kernel"] is kern.routed_mm_tma_kernel
           and all(job["constexprs"].get(k) == v for k, v in where.items())]
    assert out, f"no stacked-kernel compile matches {where}"
    return out


def test_tma_two_ctas_per_sm(compiled):
    # issue 11, point 4: the 128 x 128 config holds two CTAs per SM (registers and shared memory)
    # for the linear output, dX and QKV without RoPE
    bn, bk, warps, stages, cap, epi = kern.TMA_TILES[kern.TMA_TWO_CTA_CONFIG]
    assert (bn, epi) == (128, "plain") and cap == 128
    rows = _tma_results(compiled, BLOCK_N=bn, EPILOGUE=epi)
    rows = [r for r in rows if r[1]["num_stages"] == stages]
    assert len(rows) == 7  # fwd, dx, qkv x bf16, fp16; qkv at head dim 80
    bad = [f"{name}: regs {res['registers']}, shared {res['shared_total']} -> {_ctas_per_sm(res)} CTA/SM"
           for name, job, res in rows if _ctas_per_sm(res) < 2]
    assert not bad, "\n".join(bad)


def test_tma_wide_tile_compiles_without_spills(compiled):
    # 128 x 256 tiles: no local memory, 64x256x16 HGMMAs (the RoPE epilogue does not fit it: not listed)
    rows = _tma_results(compiled, BLOCK_N=256)
    assert {job["constexprs"]["EPILOGUE"] for _, job, _ in rows} == {"plain"}
    for name, job, res in rows:
        assert res["local_bytes"] == 0 and res["local_insts"] == 0, (name, res["local_bytes"])
        assert any(s.startswith("64x256x16") for s in res["hgmma_shapes"]), (name, res["hgmma_shapes"])


def test_tma_weight_operand_is_a_pipelined_tma_buffer(compiled):
    # B of every async wgmma is read from a multi-buffered shared alloc that the TMA copy fills
    # (num_stages buffers, one pending wgmma): the one descriptor really feeds the MMA, no register hop
    for name, job, res in _tma_results(compiled):
        ops = {op["operand"]: op for op in res["wgmma_operands"]}
        assert set(ops) == {"a", "b"}, (name, res["wgmma_operands"])
        assert ops["b"]["copy_target"] and ops["b"]["buffers"] == job["num_stages"], (name, ops["b"])


def test_report_tma_kernel(compiled, capsys):
    lines = [f"{name}: regs {res['registers']} (cap {job['maxnreg']}), shared {res['shared_total'] // 1024} KB, "
             f"{_ctas_per_sm(res)} CTA/SM, local {res['local_bytes']} B, HGMMA {','.join(res['hgmma_shapes'])}"
             for name, job, res in _tma_results(compiled)]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert lines


def test_tma_compiles_stand_for_the_model_shapes():
    # N and K are runtime integers: the compile above (16-divisible N, K; EVEN_K) is the one a launch at
    # the 7B fused-QKV shape (3584 -> 4608) and the 3B shape (2048 -> 2560) gets, forward and dX
    # (where the reduction runs over N)
    for K, N in ((3584, 4608), (2048, 2560)):
        for cfg in kern.tma_gemm_configs(interpret=False):
            assert K % 16 == 0 and N % 16 == 0
            assert K % cfg.kwargs["BLOCK_K"] == 0 and N % cfg.kwargs["BLOCK_K"] == 0  # EVEN_K, forward and dX
            if cfg.kwargs["EPILOGUE"] == "rope":
                assert cfg.kwargs["BLOCK_N"] % 128 == 0  # whole heads of head dim 128


def test_tma_kernel_is_one_loop_without_branches(compiled):
    # the claim of issue 11, point 4, on the sm_90 TTGIR: no scf.if anywhere (the modality is a
    # descriptor coordinate, not a branch), two loops (the tile loop, the K loop), the weight tile by
    # TMA and the gathered rows by cp.async
    bad = []
    for name, job, res in _tma_results(compiled):
        ops = res["ttgir_op_counts"]
        if ops["scf.if"] or ops["scf.for"] != 2 or not ops["async_tma_copy_global_to_local"] \
                or not ops["async_copy_global_to_local"]:
            bad.append(f"{name}: {ops}")
    assert not bad, "\n".join(bad)

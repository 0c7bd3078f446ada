"""Static GPU tier: every config of every span-attention kernel compiles for sm_90 under the rules.

No GPU needed: ``tests/sm90.py`` compiles with Triton for ``GPUTarget("cuda", 90, 32)`` (in
subprocesses with ``TRITON_INTERPRET=0`` when the interpreter is on), re-runs ptxas on the PTX for
its warnings, reads registers, local memory and shared memory from the cubin and the SASS with the
wheel's ``cuobjdump``, and the async-wgmma operands' shared-memory buffers from the TTGIR.

Rules for the half-precision (bf16/fp16) configs of ``HALF_CONFIGS_SM90`` (pinned entry and candidates):
no local loads/stores (spills) inside loop bodies (spills outside the loops are cheap and allowed);
no wgmma serialisation warning from ptxas (C7515-type); at least ``num_stages`` shared-memory buffers
behind every pipelined async-wgmma operand (one buffer read by a pending wgmma while cp.async
refills it is Triton issue 6691's race); shared memory within the H100's 227 KB; HGMMA in the SASS.
fp32 configs (IEEE dots, tests only) must compile within 227 KB at every head dim; the pre-Hopper
tables, compiled for sm_80, within 99 KB (sm_86/sm_89 per-block limit).
``test_report_hgmma_shapes`` prints the HGMMA shapes, registers and buffers of every config (-s).
Cold run: a few minutes on 2 cores (Triton caches compiled kernels, later runs are fast).
"""

from __future__ import annotations

import inspect
import itertools

import pytest

from llavit_kernels.ops import _span_attention_kernels as K
from sm90 import H100_SHARED_LIMIT, compile_sm90_many, sm90_problems

DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 80, 96, 128)

# kernel kind -> (kernel, activation pointers, fp32 pointers, int32 pointers)
KERNELS = {
    "fwd": (K._span_fwd_kernel, ("Q", "K", "V", "O"), ("LSE",), ("KV_START", "KV_END")),
    "dq": (K._span_bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA"), ("KV_START", "KV_END")),
    "dkdv": (
        K._span_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA"),
        ("KV_START", "KV_END", "Q_START", "Q_END"),
    ),
}
NO_SPECIALIZE = {
    "fwd": K.FWD_DO_NOT_SPECIALIZE, "dq": K.DQ_DO_NOT_SPECIALIZE, "dkdv": K.DKDV_DO_NOT_SPECIALIZE,
    "pre": K.PRE_DO_NOT_SPECIALIZE,
}


def _python_fn(kernel):
    kernel = getattr(kernel, "fn", kernel)  # JITFunction / InterpretedFunction keep the function in .fn
    return getattr(kernel, "fn", kernel)


def _signature(kernel, act_dtype, act_ptrs, fp32_ptrs, i32_ptrs):
    sig = {}
    for name, param in inspect.signature(_python_fn(kernel)).parameters.items():
        if "constexpr" in str(param.annotation):
            continue
        if name in act_ptrs:
            sig[name] = "*" + act_dtype
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name in i32_ptrs:
            sig[name] = "*i32"
        elif name == "softmax_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _aligned(sig, kind):
    """Pointers and strides as the launcher sees them for contiguous [B, T, H, D] tensors (the
    do-not-specialize arguments never get the attribute)."""
    return [n for n, t in sig.items() if (t.startswith("*") or n.startswith("stride")) and n not in NO_SPECIALIZE[kind]]


def _block_d(head_dim):
    return max(16, 1 << (head_dim - 1).bit_length())


def make_job(kind, dtype, head_dim, config, precision="tf32"):
    kernel, acts, f32, i32 = KERNELS[kind]
    sig = _signature(kernel, dtype, acts, f32, i32)
    block_m, block_n, warps, stages = config
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), UPCAST=False, DOT_PRECISION=precision,
                      BLOCK_M=block_m, BLOCK_N=block_n)
    return dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=warps, num_stages=stages,
                divisible_by_16=_aligned(sig, kind))


def _jobs():
    jobs, ids = [], []
    for kind, dtype, head_dim in itertools.product(KERNELS, DTYPES, HEAD_DIMS):
        for config in K.HALF_CONFIGS_SM90[kind][head_dim]:
            jobs.append(make_job(kind, dtype, head_dim, config))
            ids.append(f"{kind}-{dtype}-d{head_dim}-m{config[0]}n{config[1]}w{config[2]}s{config[3]}")
    for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        sig = _signature(K._span_bwd_pre_kernel, dtype, ("O", "DO"), ("DLSE", "DELTA"), ())
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), HAS_DLSE=True, BLOCK_M=64)
        jobs.append(dict(kernel=K._span_bwd_pre_kernel, signature=sig, constexprs=constexprs, num_warps=4, num_stages=1,
                         divisible_by_16=_aligned(sig, "pre")))
        ids.append(f"pre-{dtype}-d{head_dim}")
    # fp32 (tests only; IEEE dots): every fp32 config must compile within the shared-memory limit.
    for kind, head_dim in itertools.product(KERNELS, HEAD_DIMS):
        for config in K.FP32_CONFIGS[kind][head_dim]:
            jobs.append(make_job(kind, "fp32", head_dim, config, precision="ieee"))
            ids.append(f"fp32only-{kind}-d{head_dim}-m{config[0]}n{config[1]}w{config[2]}s{config[3]}")
    # Pre-Hopper tables, compiled for sm_80 (mma.sync): they must fit the smallest shared memory of
    # the GPUs they serve (sm_86/sm_89: 99 KB per block; sm_80: 163 KB).
    for kind, head_dim in itertools.product(KERNELS, HEAD_DIMS):
        for config in K.HALF_CONFIGS_OTHER[kind][head_dim]:
            job = make_job(kind, "bf16", head_dim, config)
            job["arch"] = 80
            jobs.append(job)
            ids.append(f"sm80only-{kind}-d{head_dim}-m{config[0]}n{config[1]}w{config[2]}s{config[3]}")
    return jobs, ids


JOBS, JOB_IDS = _jobs()
SM86_SHARED_LIMIT = 99 * 1024


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(JOB_IDS, compile_sm90_many(JOBS)))


def test_config_tables_cover_every_head_dim_and_dtype():
    for table in (K.HALF_CONFIGS_SM90, K.HALF_CONFIGS_OTHER, K.FP32_CONFIGS):
        for kind in ("fwd", "dq", "dkdv"):
            assert set(table[kind]) == set(HEAD_DIMS)
            for configs in table[kind].values():
                assert configs
                for block_m, block_n, warps, stages in configs:
                    assert block_m >= 16 and block_n >= 16 and warps in (4, 8) and 1 <= stages <= 4
    if not K.INTERPRETING:
        for kind, head_dim in itertools.product(("fwd", "dq", "dkdv"), HEAD_DIMS):
            assert K.pinned_config(kind, "bf16", head_dim, 90) == K.HALF_CONFIGS_SM90[kind][head_dim][0]
            assert K.pinned_config(kind, "fp32", head_dim, 90) == K.FP32_CONFIGS[kind][head_dim][0]


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if not j.startswith(("fp32only-", "sm80only-"))])
def test_compiles_for_sm90_under_the_static_rules(compiled, job_id):
    res = compiled[job_id]
    assert 0 < res["registers"] <= 255, res
    problems = sm90_problems(res, need_hgmma=not job_id.startswith("pre-"))
    assert not problems, (
        f"{job_id}: {problems}\n{res['registers']} regs, {res['local_bytes']} B local, {res['local_insts']} STL/LDL "
        f"({res['local_insts_in_loops']} in loops), HGMMA {res['hgmma_shapes']}, warnings {res['ptxas_warnings']}"
    )


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if j.startswith("fp32only-")])
def test_fp32_ieee_configs_compile_within_shared_memory(compiled, job_id):
    # fp32 inputs (used by tests on a GPU) take IEEE fp32 dots: no wgmma; they must compile and fit.
    assert compiled[job_id]["registers"] > 0
    assert compiled[job_id]["shared_total"] <= H100_SHARED_LIMIT, compiled[job_id]["shared_total"]


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if j.startswith("sm80only-")])
def test_pre_hopper_configs_compile_within_shared_memory(compiled, job_id):
    assert compiled[job_id]["registers"] > 0
    assert compiled[job_id]["shared_total"] <= SM86_SHARED_LIMIT, compiled[job_id]["shared_total"]


def test_report_hgmma_shapes(compiled):
    """The per-config table (run with -s): registers, spills, HGMMA shapes, wgmma operand buffers."""
    lines = []
    for job_id, res in compiled.items():
        buffers = sorted({o["buffers"] for o in res["wgmma_operands"] if o["pipelined"]} - {None})
        lines.append(
            f"{job_id:34s} regs {res['registers']:3d} local {res['local_bytes']:4d} B "
            f"(in loops {res['local_insts_in_loops']}) smem {res['shared_total'] // 1024:3d} KB "
            f"buffers {buffers} HGMMA {res['hgmma_shapes']}"
        )
    print("\n" + "\n".join(lines))
    # The rework's point for dK/dV: no 64xNx16 HGMMA with N < 32 in the pinned configs.
    for head_dim in HEAD_DIMS:
        block_m, block_n, warps, stages = K.HALF_CONFIGS_SM90["dkdv"][head_dim][0]
        res = compiled[f"dkdv-bf16-d{head_dim}-m{block_m}n{block_n}w{warps}s{stages}"]
        narrow = [s for s in res["hgmma_shapes"] if int(s.split("x")[1]) < 32]
        assert not narrow, f"dkdv d{head_dim}: narrow HGMMA {res['hgmma_shapes']}"


# ----------------------------------------------------------------------------- the static tier's own parsers
def test_sm90_parsers_catch_what_they_are_for():
    # The checks must be able to fail: fed a C7515 log line, a spill inside a loop and a
    # single-buffered pipelined wgmma operand, each is reported.
    import sm90

    assert sm90._WGMMA_SERIAL_RE.search(
        "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
        "due to the presence of Extern calls in the function '_k'"
    )
    sass = "\n".join([
        "        /*0100*/                   STL [R1], R2 ;",
        "        /*0110*/                   LDL R3, [R1] ;",
        "        /*0120*/                   HGMMA.64x16x16.F32.BF16 gdesc[UR4], R24 ;",
        "        /*0130*/              @!P2 BRA 0x110 ;",
    ])
    assert sm90._local_insts_in_loops(sass) == 1  # the LDL at 0x110 is in the loop 0x110..0x130, the STL is not
    ttgir = "\n".join([
        "    %a = ttg.local_alloc %x : (tensor<64x64xbf16, #blocked>) -> !ttg.memdesc<64x64xbf16, #shared, #smem> loc(#l)",
        "    %b = ttg.local_alloc : () -> !ttg.memdesc<1x64x32xbf16, #shared, #smem, mutable> loc(#l)",
        "    %bi = ttg.memdesc_index %b[%c0] : !ttg.memdesc<1x64x32xbf16, #shared, #smem, mutable> -> "
        "!ttg.memdesc<64x32xbf16, #shared, #smem, mutable> loc(#l)",
        "    %d = ttng.warp_group_dot %a, %bi, %c {inputPrecision = 0 : i32, isAsync = true} : "
        "!ttg.memdesc<64x64xbf16, #shared, #smem> * !ttg.memdesc<64x32xbf16, #shared, #smem, mutable> -> tensor<64x32xf32, #mma>",
    ])
    ops = sm90._wgmma_operands(ttgir)
    assert [(o["operand"], o["buffers"], o["pipelined"]) for o in ops] == [("a", 1, False), ("b", 1, True)]
    res = dict(name="k", wgmma_serialized=True, ptxas_warnings=["ptxas warning : (C7515) wgmma serialized"],
               local_insts_in_loops=1, shared_total=300 * 1024, smem_buffer_issues=["b: 1 < 2"], hgmma=False,
               num_warps=4, num_stages=2, registers=100, hgmma_shapes={})
    assert len(sm90.sm90_problems(res, need_hgmma=True)) == 5
    with pytest.raises(AssertionError, match="serialised wgmma"):
        sm90.assert_sm90_ok(res)

"""Static GPU tier: every autotune config of every span-attention kernel compiles for sm_90.

No GPU needed: ``tests/sm90.py`` compiles with Triton for ``GPUTarget("cuda", 90, 32)`` (in
subprocesses with ``TRITON_INTERPRET=0`` when the interpreter is on) and reads registers, local
memory (spills) and shared memory from the cubin with the wheel's ``cuobjdump``. A config that
spills or needs more than the H100's 227 KB of shared memory per block fails here, before any GPU
time is spent. Cold run: ~2-3 minutes on 2 cores (Triton caches compiled kernels, later runs are fast).
"""

from __future__ import annotations

import inspect
import itertools

import pytest

from llavit_kernels.ops import _span_attention_kernels as K
from sm90 import H100_SHARED_LIMIT, compile_sm90_many

DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 80, 96, 128)

# kernel name -> (kernel, activation pointers, fp32 pointers, int32 pointers, config table)
KERNELS = {
    "fwd": (K._span_fwd_kernel, ("Q", "K", "V", "O"), ("LSE",), ("KV_START", "KV_END"), K.FWD_CONFIGS_GPU),
    "dq": (
        K._span_bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA"), ("KV_START", "KV_END"),
        K.BWD_DQ_CONFIGS_GPU,
    ),
    "dkdv": (
        K._span_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA"),
        ("KV_START", "KV_END", "Q_START", "Q_END"), K.BWD_DKDV_CONFIGS_GPU,
    ),
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


def _aligned(sig):
    """Pointers and strides as the launcher sees them for contiguous [B, T, H, D] tensors."""
    return [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")]


def _jobs():
    jobs, ids = [], []
    for (kname, (kernel, acts, f32, i32, table)), dtype, head_dim in itertools.product(KERNELS.items(), DTYPES, HEAD_DIMS):
        sig = _signature(kernel, dtype, acts, f32, i32)
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        for block_m, block_n, warps, stages in table[K.table_block_d(block_d)]:
            constexprs = dict(
                HEAD_DIM=head_dim, BLOCK_D=block_d,
                UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n,
            )
            jobs.append(dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=warps, num_stages=stages,
                             divisible_by_16=_aligned(sig)))
            ids.append(f"{kname}-{dtype}-d{head_dim}-m{block_m}n{block_n}w{warps}s{stages}")
    for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        sig = _signature(K._span_bwd_pre_kernel, dtype, ("O", "DO"), ("DLSE", "DELTA"), ())
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), HAS_DLSE=True, BLOCK_M=64)
        jobs.append(dict(kernel=K._span_bwd_pre_kernel, signature=sig, constexprs=constexprs, num_warps=4, num_stages=1,
                         divisible_by_16=_aligned(sig)))
        ids.append(f"pre-{dtype}-d{head_dim}")
    # fp32 (tests only; IEEE dots): the first config of each kernel must at least compile.
    for kname, (kernel, acts, f32, i32, table) in KERNELS.items():
        sig = _signature(kernel, "fp32", acts, f32, i32)
        block_m, block_n, warps, stages = table[64][0]
        constexprs = dict(HEAD_DIM=64, BLOCK_D=64, UPCAST=False, DOT_PRECISION="ieee",
                          BLOCK_M=block_m, BLOCK_N=block_n)
        jobs.append(dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=warps, num_stages=stages,
                         divisible_by_16=_aligned(sig)))
        ids.append(f"fp32only-{kname}-ieee-d64")
    return jobs, ids


JOBS, JOB_IDS = _jobs()


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(JOB_IDS, compile_sm90_many(JOBS)))


def test_gpu_config_tables_are_what_autotune_uses_on_gpu():
    # The static tier checks the GPU tables; make sure they are the tables the autotuner gets off the interpreter.
    for kind, tables in (("fwd", K.FWD_CONFIGS_GPU), ("dq", K.BWD_DQ_CONFIGS_GPU), ("dkdv", K.BWD_DKDV_CONFIGS_GPU)):
        assert set(tables) == {64, 128}
        for head_dim in HEAD_DIMS:
            block_d = 1 << (head_dim - 1).bit_length()
            table = tables[K.table_block_d(block_d)]
            assert table
            if not K.INTERPRETING:
                assert K.active_configs(kind, block_d) == table
        for table in tables.values():
            for block_m, block_n, warps, stages in table:
                assert block_m >= 16 and block_n >= 16 and warps in (4, 8) and 1 <= stages <= 4


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if not j.startswith("fp32only-")])
def test_compiles_for_sm90_without_spills(compiled, job_id):
    res = compiled[job_id]
    assert res["registers"] > 0, res
    assert res["registers"] <= 255, res
    assert not res["spilled"], (
        f"{job_id}: spills: {res['local_bytes']} B local/stack, {res['local_insts']} STL/LDL\n{res['ptxas_info']}"
    )
    assert res["shared_total"] <= H100_SHARED_LIMIT, f"{job_id}: {res['shared_total']} B shared memory > {H100_SHARED_LIMIT}"


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if j.startswith("fp32only-")])
def test_fp32_ieee_variant_compiles(compiled, job_id):
    # fp32 inputs (used by tests on a GPU) take IEEE fp32 dots: no wgmma, may use more registers;
    # it only has to compile and fit in shared memory.
    assert compiled[job_id]["registers"] > 0
    assert compiled[job_id]["shared_total"] <= H100_SHARED_LIMIT


@pytest.mark.parametrize("job_id", [j for j in JOB_IDS if not j.startswith(("pre-", "fp32only-"))])
def test_matmul_kernels_use_hopper_wgmma(compiled, job_id):
    # HGMMA in the SASS: tl.dot lowered to warpgroup MMA, not to a slow fallback.
    assert compiled[job_id]["hgmma"], f"{job_id}: no HGMMA instruction in the SASS"


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

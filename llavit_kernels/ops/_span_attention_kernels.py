"""Triton kernels of span attention (FlashAttention-2 style), driven by SpanLayout intervals.

Every query row ``m`` may attend to keys ``[kv_start[m], kv_end[m])``; every key ``n`` is seen by
queries ``[q_start[n], q_end[n])``. Intervals are intersected with the tensors (``[0, Tk)`` for keys,
``[0, Tq)`` for queries) when loaded: a layout whose intervals reach past the tensors (a hand-built
one, or ``query_chunk(validate=False)`` cutting an image) attends only to the keys that exist, and
the unmasked full-block loads never leave the tensors.

A block of queries visits only the KV blocks inside ``[min kv_start, max kv_end)``; a block is
*full* (every element allowed, no masking) when ``max kv_start <= n0`` and ``min kv_end >= n0 +
BLOCK_N``. The full blocks of a query block form one contiguous range ``[full_lo, full_hi)``; the
edge blocks ``[lo, full_lo)`` and ``[full_hi, hi)`` are walked by ONE masked loop whose block index
jumps over the full range (index remapping), so each kernel has two loops, not three: every loop
is a separately software-pipelined region with its own registers and shared-memory buffers.

Row statistics ignore rows that are out of range or empty (padding): such rows may ride along in
an unmasked block, and are neutralised instead -- the forward writes 0 and ``lse = +inf`` for
them, and ``p = exp(s - lse)`` is then exactly 0 in the backward, so their gradients are 0 too.
The dK/dV kernel's block statistics likewise ignore keys that no query sees (padding keys); they
ride along in unmasked query blocks and are neutralised at the store (dK = dV = 0).

Conventions: scores are handled in base 2; the softmax scale is folded into the exp2 argument
(``exp2(s * qk_scale - m)`` is one FMA per element, ``qk_scale = softmax_scale * log2(e)``); the
saved ``lse`` is in natural-log units, ``[B, H, Tq]`` fp32. The forward and dQ take element masks
from the per-query intervals; the dK/dV kernel takes both its query-block range and its element
masks from the per-key intervals of its own keys (held in registers: no per-row interval loads
inside its loop). For every SpanLayout the two interval sets describe the same mask
(``dense_mask_from_key_intervals``); ``KV_START``/``KV_END`` stay in the dK/dV signature unused.

Scheduling: grids are ``(B * heads, blocks)``. The hardware dispatches program ids with axis 0
fastest, so every (batch, head) gets its heaviest block first and the light blocks fill the tail
(heavy-first, longest-processing-time order): the forward and dQ take query blocks from the last
(most keys under a causal-like mask) to the first; dK/dV take key blocks from the first (seen by
most queries) to the last.

Kernels (all deterministic: no atomics; GQA heads of one KV head are summed inside one program):
    _span_fwd_kernel      grid (B*H, Tq blocks)     out, lse
    _span_bwd_pre_kernel  grid (B*H, Tq blocks)     delta = rowsum(dO * O) - dlse
    _span_bwd_dq_kernel   grid (B*H, Tq blocks)     dq
    _span_bwd_dkdv_kernel grid (B*Hkv, Tk blocks)   dk, dv (sums the query heads of its KV head)
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BIG = tl.constexpr(2147483647)  # int32 max: 'no row' sentinel in block statistics

# ----------------------------------------------------------------------------- pinned configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The FIRST entry of a list is the config every launch
# uses (pinned: no timing-based autotuning, so two processes always run the same tiles and the
# same summation order -- bitwise-identical results); the other entries are candidates kept
# correct and compiling (tests/test_span_attention_static.py compiles every entry for sm_90;
# test_gpu_every_config runs each on a GPU through FORCE_CONFIG) for re-pinning from GPU timings.
# Keys: head dim (80 and 96 run with BLOCK_D = 128 and d < HEAD_DIM masks, which cost registers,
# so they get their own lists). BLOCK_M of dK/dV is the query block walked by BLOCK_N keys.
# Choices and their sm_90 compile figures (registers, HGMMA shapes): bench/NOTES.md.
HALF_CONFIGS_SM90 = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        80: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
        96: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        80: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)],
        96: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)],
    },
    "dkdv": {
        64: [(64, 128, 8, 2), (32, 128, 8, 2)],
        80: [(32, 128, 8, 2), (16, 128, 8, 2)],
        96: [(32, 128, 8, 2), (16, 128, 8, 2)],
        128: [(32, 128, 8, 2), (16, 128, 8, 2)],
    },
}
# Pre-Hopper GPUs (sm_80/86/89: 99-163 KB shared memory, mma.sync): conservative tiles.
HALF_CONFIGS_OTHER = {
    "fwd": {d: [(64, 64, 4, 2)] for d in (64, 80, 96, 128)},
    "dq": {d: [(64, 64, 4, 2)] for d in (64, 80, 96, 128)},
    "dkdv": {d: [(32, 64, 4, 2)] for d in (64, 80, 96, 128)},
}
# fp32 inputs (tests; IEEE fp32 dots, no tensor cores): tiles twice the bytes of half tiles, so small
# ones, within the 227 KB of shared memory per block at every head dim (static test).
FP32_CONFIGS = {
    "fwd": {d: [(64, 32, 4, 2)] for d in (64, 80, 96, 128)},
    "dq": {d: [(64, 32, 4, 2)] for d in (64, 80, 96, 128)},
    "dkdv": {d: [(32, 64, 4, 2)] for d in (64, 80, 96, 128)},
}
# Under the interpreter one small config keeps tests fast; BLOCK_M != BLOCK_N on purpose so that a
# mix-up of the two block sizes cannot pass the tests.
INTERP_CONFIGS = {"fwd": [(16, 32, 4, 1)], "dq": [(16, 32, 4, 1)], "dkdv": [(32, 16, 4, 1)]}

PRE_BLOCK_M = 16 if INTERPRETING else 64

# Test hook: FORCE_CONFIG = i runs entry i (mod the list length) instead of the pinned entry 0
# (GPU-tier correctness of every candidate).
FORCE_CONFIG = None


def candidate_configs(kind: str, dtype_name: str, head_dim: int, arch: int = 90):
    """The config list of ``kind`` ("fwd", "dq", "dkdv") for a dtype ("fp16", "bf16", "fp32"), a
    head dim and a GPU arch (compute capability as 10 * major + minor, 90 for H100/H200)."""
    if INTERPRETING:
        return INTERP_CONFIGS[kind]
    if dtype_name == "fp32":
        return FP32_CONFIGS[kind][head_dim]
    table = HALF_CONFIGS_SM90 if arch >= 90 else HALF_CONFIGS_OTHER
    return table[kind][head_dim]


def pinned_config(kind: str, dtype_name: str, head_dim: int, arch: int = 90):
    """The one config a launch uses (entry 0, or FORCE_CONFIG's entry)."""
    table = candidate_configs(kind, dtype_name, head_dim, arch)
    return table[(FORCE_CONFIG or 0) % len(table)]


# Which arguments are not value-specialised. Triton specialises int arguments on "== 1" and
# "% 16 == 0" and compiles one variant per class combination; everything whose value follows the
# sequence length (Tq, Tk, the interval/lse strides Tq and H*Tq) or the batch's head counts is
# listed here, so one compiled variant serves every T (test_no_recompile_across_sequence_lengths).
# The activation strides (multiples of the head dim, i.e. of 16, for every supported head dim) keep
# their alignment specialisation: it is what lets the loads vectorise.
FWD_DO_NOT_SPECIALIZE = ["H", "Tq", "Tk", "groups", "stride_ib", "stride_lb", "stride_lh"]
PRE_DO_NOT_SPECIALIZE = ["H", "Tq", "stride_lb", "stride_lh"]
DQ_DO_NOT_SPECIALIZE = FWD_DO_NOT_SPECIALIZE
DKDV_DO_NOT_SPECIALIZE = ["HKV", "Tq", "Tk", "groups", "stride_ib", "stride_jb", "stride_lb", "stride_lh"]


# ----------------------------------------------------------------------------- block ranges
@triton.jit
def _block_ranges(starts, ends, valid, BLOCK: tl.constexpr):
    """(lo, full_lo, full_hi, n_masked): [full_lo, full_hi) is full, and the ``n_masked`` edge
    blocks are [lo, full_lo) followed by [full_hi, hi). ``starts``/``ends`` are already clamped to
    the tensor, so every full block lies inside it."""
    valid = valid & (starts < ends)
    min_start = tl.min(tl.where(valid, starts, BIG), axis=0)
    max_start = tl.max(tl.where(valid, starts, 0), axis=0)
    min_end = tl.min(tl.where(valid, ends, BIG), axis=0)
    max_end = tl.max(tl.where(valid, ends, 0), axis=0)
    hi = max_end
    lo = (tl.minimum(min_start, hi) // BLOCK) * BLOCK
    full_lo = ((max_start + BLOCK - 1) // BLOCK) * BLOCK
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = (min_end // BLOCK) * BLOCK
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    n_masked = tl.cdiv(full_lo - lo, BLOCK) + tl.cdiv(hi - full_hi, BLOCK)
    return lo, full_lo, full_hi, n_masked


@triton.jit
def _edge_block(i, lo, full_lo, full_hi, BLOCK: tl.constexpr):
    """Start of the i-th masked (edge) block: [lo, full_lo) then [full_hi, ...)."""
    n0 = lo + i * BLOCK
    return tl.where(n0 < full_lo, n0, n0 + (full_hi - full_lo))


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d, Tk, stride_kt, stride_vt, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    cols = n0 + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        col_ok = cols < Tk
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        vb = tl.load(v_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        vb = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vb = vb.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # unscaled: the scale rides in the exp2 FMA
    if MASKED:
        allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=FWD_DO_NOT_SPECIALIZE)
def _span_fwd_kernel(
    Q, K, V, O, LSE, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_ib, stride_lb, stride_lh,
    H, Tq, Tk, softmax_scale,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy-first: last query blocks see the most keys
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM

    kv_lo = tl.maximum(tl.load(KV_START + b * stride_ib + offs_m, mask=row_ok, other=0), 0)
    kv_hi = tl.minimum(tl.load(KV_END + b * stride_ib + offs_m, mask=row_ok, other=0), Tk)
    lo, full_lo, full_hi, n_masked = _block_ranges(kv_lo, kv_hi, row_ok, BLOCK_N)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked blocks stay NaN-free
    for n0 in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d,
                                  Tk, stride_kt, stride_vt, qk_scale, False, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)
    for i in range(0, n_masked):
        n0 = _edge_block(i, lo, full_lo, full_hi, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d,
                                  Tk, stride_kt, stride_vt, qk_scale, True, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)

    has_keys = (kv_lo < kv_hi) & (l_i > 0.0)
    safe_l = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) * 0.6931471805599453, float("inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=PRE_DO_NOT_SPECIALIZE)
def _span_bwd_pre_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        # d lse / d s_j = p_j, so a gradient on lse enters exactly like -delta.
        delta -= tl.load(DLSE + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d, Tk, stride_kt, stride_vt, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    cols = n0 + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
    vt_ptrs = v_base + cols[None, :] * stride_vt + offs_d[:, None]
    if MASKED:
        col_ok = cols < Tk
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=DQ_DO_NOT_SPECIALIZE)
def _span_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_ib, stride_lb, stride_lh,
    H, Tq, Tk, softmax_scale,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy-first
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    mask_md = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    kv_lo = tl.maximum(tl.load(KV_START + b * stride_ib + offs_m, mask=row_ok, other=0), 0)
    kv_hi = tl.minimum(tl.load(KV_END + b * stride_ib + offs_m, mask=row_ok, other=0), Tk)
    lo, full_lo, full_hi, n_masked = _block_ranges(kv_lo, kv_hi, row_ok, BLOCK_N)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask_md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # lse = +inf on empty rows (and here on out-of-range rows): p = 0 exactly, so dq = 0.
    lse2 = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d,
                      Tk, stride_kt, stride_vt, qk_scale, False, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)
    for i in range(0, n_masked):
        n0 = _edge_block(i, lo, full_lo, full_hi, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, n0, offs_n, offs_d,
                      Tk, stride_kt, stride_vt, qk_scale, True, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)
    dq = dq * softmax_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, key_q_lo, key_q_hi, m0, offs_m, offs_d,
    Tq, stride_qt, stride_dot, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    rows = m0 + offs_m
    q_ptrs = q_base + rows[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + rows[:, None] * stride_dot + offs_d[None, :]
    if MASKED:
        row_ok = rows < Tq
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        if EVEN_D:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        delta = tl.load(delta_base + rows)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M], unscaled
    pt = tl.math.exp2(qkt * qk_scale - lse2[None, :])
    if MASKED:
        # The mask from the program's own keys' query intervals (registers, loop-invariant): no
        # per-row interval loads in the loop. For a SpanLayout both interval sets give the same
        # mask (SpanLayout.dense_mask_from_key_intervals; tests/test_layout.py).
        allowed = (rows[None, :] >= key_q_lo[:, None]) & (rows[None, :] < key_q_hi[:, None])
        pt = tl.where(allowed, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=DKDV_DO_NOT_SPECIALIZE)
def _span_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END, Q_START, Q_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_ib, stride_jb, stride_lb, stride_lh,
    HKV, Tq, Tk, softmax_scale,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # heavy-first: the first key blocks are seen by the most queries
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Tk
    mask_nd = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_lo = tl.maximum(tl.load(Q_START + b * stride_jb + offs_n, mask=col_ok, other=0), 0)
    q_hi = tl.minimum(tl.load(Q_END + b * stride_jb + offs_n, mask=col_ok, other=0), Tq)
    lo, full_lo, full_hi, n_masked = _block_ranges(q_lo, q_hi, col_ok, BLOCK_M)

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, groups):  # the query heads of this KV head, summed here: no atomics
        h = hk * groups + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + b * stride_lb + h * stride_lh
        delta_base = DELTA + b * stride_lb + h * stride_lh
        for m0 in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_lo, q_hi,
                                m0, offs_m, offs_d, Tq, stride_qt, stride_dot, qk_scale,
                                False, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)
        for i in range(0, n_masked):
            m0 = _edge_block(i, lo, full_lo, full_hi, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_lo, q_hi,
                                m0, offs_m, offs_d, Tq, stride_qt, stride_dot, qk_scale,
                                True, EVEN_D, HEAD_DIM, UPCAST, DOT_PRECISION)
    # Keys no query sees (padding: q_start == q_end) are left out of the block statistics, so they
    # ride along in unmasked query blocks and pick up p = exp(s - lse) != 0 there; neutralise them
    # here, as the forward does for empty query rows (their true dK and dV are 0).
    key_seen = q_lo < q_hi
    dk = tl.where(key_seen[:, None], dk * softmax_scale, 0.0)
    dv = tl.where(key_seen[:, None], dv, 0.0)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)

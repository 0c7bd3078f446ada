"""Triton kernels of span attention (FlashAttention-2 style), driven by SpanLayout intervals.

Every query row ``m`` may attend to keys ``[kv_start[m], kv_end[m])``; every key ``n`` is seen by
queries ``[q_start[n], q_end[n])``. A block of queries therefore visits only the KV blocks inside
``[min kv_start, max kv_end)``, and a block is *full* (every element allowed, no masking) when
``max kv_start <= n0`` and ``min kv_end >= n0 + BLOCK_N``. The full blocks of a query block form
one contiguous range, so each kernel runs three loops: masked, unmasked, masked.

Row statistics ignore rows that are out of range or empty (padding): such rows may ride along in
an unmasked block, and are neutralised instead -- the forward writes 0 and ``lse = +inf`` for
them, and ``p = exp(s - lse)`` is then exactly 0 in the backward, so their gradients are 0 too.
The dK/dV kernel's block statistics likewise ignore keys that no query sees (padding keys); they
ride along in unmasked query blocks and are neutralised at the store (dK = dV = 0).

Conventions: scores are handled in base 2 (``qk_scale = softmax_scale * log2(e)``); the saved
``lse`` is in natural-log units, ``[B, H, Tq]`` fp32. Element masks always come from the per-query
intervals (one source of truth); the per-key intervals only choose the query blocks of dK/dV.

Kernels (all deterministic: no atomics; GQA heads of one KV head are summed inside one program):
    _span_fwd_kernel     grid (Tq blocks, B*H)      out, lse
    _span_bwd_pre_kernel grid (Tq blocks, B*H)      delta = rowsum(dO * O) - dlse
    _span_bwd_dq_kernel  grid (Tq blocks, B*H)      dq
    _span_bwd_dkdv_kernel grid (Tk blocks, B*Hkv)   dk, dv (sums the query heads of its KV head)
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BIG = tl.constexpr(2147483647)  # int32 max: 'no row' sentinel in block statistics

# ----------------------------------------------------------------------------- autotune configs
# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per padded head dim BLOCK_D (64 or 128;
# head dims 80 and 96 run with BLOCK_D = 128). Small lists: every entry is compiled for sm_90 in
# tests/test_span_attention_static.py, which rejects spills and shared memory over the H100 limit.
# What those compiles showed (registers/spills only; no GPU timings yet): 8 warps (two warpgroups)
# want the MMA's M side >= 128; the dK/dV kernel keeps two [BLOCK_N, BLOCK_D] fp32 accumulators, and
# at BLOCK_D = 128 only BLOCK_N = 128 with 8 warps and a 16-query inner block compiled without
# spilling (64x64 with 4 or 8 warps, 32x128 and 64x128 all spilled); 128x128 fwd tiles spill at
# head dims 80/96 (the d < HEAD_DIM masks cost registers).
FWD_CONFIGS_GPU = {
    64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2)],
}
BWD_DQ_CONFIGS_GPU = {
    64: [(128, 64, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 2), (128, 32, 8, 3)],
}
BWD_DKDV_CONFIGS_GPU = {  # BLOCK_M: the query block walked by one program's BLOCK_N keys
    64: [(32, 128, 8, 2), (16, 128, 8, 2)],
    128: [(16, 128, 8, 2), (16, 128, 8, 1)],
}
# Under the interpreter one small config keeps tests fast; BLOCK_M != BLOCK_N on purpose so that a
# mix-up of the two block sizes cannot pass the tests.
FWD_CONFIGS_INTERP = [(16, 32, 4, 1)]
BWD_DQ_CONFIGS_INTERP = [(16, 32, 4, 1)]
BWD_DKDV_CONFIGS_INTERP = [(32, 16, 4, 1)]

PRE_BLOCK_M = 16 if INTERPRETING else 64

_GPU_TABLES = {"fwd": FWD_CONFIGS_GPU, "dq": BWD_DQ_CONFIGS_GPU, "dkdv": BWD_DKDV_CONFIGS_GPU}
_INTERP_TABLES = {"fwd": FWD_CONFIGS_INTERP, "dq": BWD_DQ_CONFIGS_INTERP, "dkdv": BWD_DKDV_CONFIGS_INTERP}


def table_block_d(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def active_configs(kind: str, block_d: int):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) list the autotuner tries for ``kind``."""
    if INTERPRETING:
        return _INTERP_TABLES[kind]
    return _GPU_TABLES[kind][table_block_d(block_d)]


def _autotune_configs(kind: str):
    if INTERPRETING:
        tables = [_INTERP_TABLES[kind]]
    else:
        tables = list(_GPU_TABLES[kind].values())
    entries = list(dict.fromkeys(e for t in tables for e in t))  # union, order kept
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in entries]


# Test hooks, read by the config pruner at autotuning time (clear an autotuner's ``.cache`` after
# changing them): AUTOTUNE = False always takes the first config of the table (fast GPU test runs:
# one compile per kernel instead of one per config); FORCE_CONFIG = i takes entry i of the table
# (GPU-tier correctness of every config).
AUTOTUNE = True
FORCE_CONFIG = None


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        table = active_configs(kind, named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128)))
        if FORCE_CONFIG is not None:
            table = [table[FORCE_CONFIG % len(table)]]
        elif not AUTOTUNE:
            table = table[:1]
        allowed = set(table)
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return kept or configs[:1]

    return prune


_AUTOTUNE_KEY = ["BLOCK_D", "SEQ_BUCKET"]


# Sizes and counts (H, Tq, Tk, groups, ...) are marked do_not_specialize on every kernel: Triton would
# otherwise compile a variant per "== 1" / "% 16 == 0" class of each, i.e. per shape class of the
# batch. Strides keep their alignment specialisation (vectorised loads).

# ----------------------------------------------------------------------------- block ranges
@triton.jit
def _block_ranges(starts, ends, valid, BLOCK: tl.constexpr):
    """[lo, full_lo) masked, [full_lo, full_hi) full, [full_hi, hi) masked, over valid rows."""
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
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
    start, stop, Tk, stride_kt, stride_vt, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, stop, BLOCK_N):
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
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H", "Tq", "Tk", "SEQ_BUCKET", "groups"])
def _span_fwd_kernel(
    Q, K, V, O, LSE, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_ib, stride_lb, stride_lh,
    H, Tq, Tk, softmax_scale, SEQ_BUCKET,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # Longest query blocks (largest m) first: better tail balance for causal-like masks.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM

    kv_lo = tl.load(KV_START + b * stride_ib + offs_m, mask=row_ok, other=0)
    kv_hi = tl.load(KV_END + b * stride_ib + offs_m, mask=row_ok, other=0)
    lo, full_lo, full_hi, hi = _block_ranges(kv_lo, kv_hi, row_ok, BLOCK_N)

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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                               lo, full_lo, Tk, stride_kt, stride_vt, qk_scale,
                               True, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                               full_lo, full_hi, Tk, stride_kt, stride_vt, qk_scale,
                               False, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                               full_hi, hi, Tk, stride_kt, stride_vt, qk_scale,
                               True, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)

    has_keys = (kv_lo < kv_hi) & (l_i > 0.0)
    safe_l = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) * 0.6931471805599453, float("inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["H", "Tq"])
def _span_bwd_pre_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
    start, stop, Tk, stride_kt, stride_vt, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, stop, BLOCK_N):
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
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["H", "Tq", "Tk", "SEQ_BUCKET", "groups"])
def _span_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_ib, stride_lb, stride_lh,
    H, Tq, Tk, softmax_scale, SEQ_BUCKET,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // groups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    mask_md = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    kv_lo = tl.load(KV_START + b * stride_ib + offs_m, mask=row_ok, other=0)
    kv_hi = tl.load(KV_END + b * stride_ib + offs_m, mask=row_ok, other=0)
    lo, full_lo, full_hi, hi = _block_ranges(kv_lo, kv_hi, row_ok, BLOCK_N)

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
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                   lo, full_lo, Tk, stride_kt, stride_vt, qk_scale,
                   True, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                   full_lo, full_hi, Tk, stride_kt, stride_vt, qk_scale,
                   False, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kv_lo, kv_hi, offs_n, offs_d,
                   full_hi, hi, Tk, stride_kt, stride_vt, qk_scale,
                   True, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    dq = dq * softmax_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_start_base, kv_end_base, offs_n, offs_m, offs_d,
    start, stop, Tq, stride_qt, stride_dot, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    d_ok = offs_d < HEAD_DIM
    for m0 in range(start, stop, BLOCK_M):
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
        qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(qkt - lse2[None, :])
        if MASKED:
            row_ok = rows < Tq
            kv_lo = tl.load(kv_start_base + rows, mask=row_ok, other=0)
            kv_hi = tl.load(kv_end_base + rows, mask=row_ok, other=0)
            allowed = (offs_n[:, None] >= kv_lo[None, :]) & (offs_n[:, None] < kv_hi[None, :])
            pt = tl.where(allowed, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["HKV", "Tq", "Tk", "SEQ_BUCKET", "groups"])
def _span_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, KV_END, Q_START, Q_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_ib, stride_jb, stride_lb, stride_lh,
    HKV, Tq, Tk, softmax_scale, SEQ_BUCKET,
    groups, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Tk
    mask_nd = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_lo = tl.load(Q_START + b * stride_jb + offs_n, mask=col_ok, other=0)
    q_hi = tl.load(Q_END + b * stride_jb + offs_n, mask=col_ok, other=0)
    lo, full_lo, full_hi, hi = _block_ranges(q_lo, q_hi, col_ok, BLOCK_M)

    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634
    kv_start_base = KV_START + b * stride_ib
    kv_end_base = KV_END + b * stride_ib

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, groups):  # the query heads of this KV head, summed here: no atomics
        h = hk * groups + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + b * stride_lb + h * stride_lh
        delta_base = DELTA + b * stride_lb + h * stride_lh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_start_base, kv_end_base,
                             offs_n, offs_m, offs_d, lo, full_lo, Tq, stride_qt, stride_dot, qk_scale,
                             True, EVEN_D, HEAD_DIM, BLOCK_M, UPCAST, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_start_base, kv_end_base,
                             offs_n, offs_m, offs_d, full_lo, full_hi, Tq, stride_qt, stride_dot, qk_scale,
                             False, EVEN_D, HEAD_DIM, BLOCK_M, UPCAST, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kv_start_base, kv_end_base,
                             offs_n, offs_m, offs_d, full_hi, hi, Tq, stride_qt, stride_dot, qk_scale,
                             True, EVEN_D, HEAD_DIM, BLOCK_M, UPCAST, DOT_PRECISION)
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


# ----------------------------------------------------------------------------- autotuned entry points
def _tuned(kind, kernel):
    return triton.autotune(
        configs=_autotune_configs(kind), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kind)}
    )(kernel)


span_fwd_kernel = _tuned("fwd", _span_fwd_kernel)
span_bwd_dq_kernel = _tuned("dq", _span_bwd_dq_kernel)
span_bwd_dkdv_kernel = _tuned("dkdv", _span_bwd_dkdv_kernel)
span_bwd_pre_kernel = _span_bwd_pre_kernel

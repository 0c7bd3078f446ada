"""Triton kernels of the modality-routed projection (see docs/modality_linear.md).

Four kernels, all driven by one device-built token order (``build_order``, two launches):

* ``routed_mm_kernel``: ``out[m, n] = sum_k A[m, k] B_mod(m)[n, k] (+ bias_mod(m)[n])`` over tiles of
  ``TILE_M`` modality-sorted tokens: the rows are gathered by the loads and scattered by the
  stores, so only the last text tile and the last image tile can be partial, whatever the number
  of image runs. Forward (A = x, B = W) and dX (A = dY, B = W read transposed through its
  strides). ``QKV=True`` tiles the columns per head and writes q / k / v in the attention layout,
  ``ROPE=True`` also rotates q and k (rotate-half).
* ``routed_dw_kernel``: ``dW_m = dY_m^T X_m`` for both modalities, looping over the tiles of one
  modality (gathered rows, no masked double work), optionally split over tokens into a float32
  workspace that is summed afterwards in a fixed order (deterministic).
* ``routed_db_kernel``: ``db_m = sum dY_m``, a separate register reduction over dY (never from the
  dW kernel's shared-memory MMA operand: that was a data race, see routed_dw_kernel).
* ``qkv_grad_kernel``: the backward of the QKV epilogue: un-rotates dq / dk and writes the fused
  ``dY [M, (H + 2 Hkv) D]`` that the two GEMM-backward kernels read.

The order table (int32, ``M + ORDER_PAD`` entries)::

    table[0 : M]          token index at sorted position p: all text tokens, then all image tokens
    table[M]              number of text tokens n_text
    table[M+1 : M+PAD]    zeros, so that a tile's positions are loaded without a mask

Tile j covers sorted positions ``[j * TILE_M, ...)`` of the text part when ``j < cdiv(n_text,
TILE_M)``, else the matching block of the image part: at most ``cdiv(M, TILE_M) + 1`` tiles, so
the grid (``slots_for``) depends on shapes only.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Rows per tile of sorted tokens; every GEMM config uses it as BLOCK_M.
TILE_M_GPU = 128
TILE_M_INTERPRET = 16
TILE_M = TILE_M_INTERPRET if INTERPRET else TILE_M_GPU


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- token order
# The routing structure is the modality-sorted token order: every text token (in token order),
# then every image token. Cutting the SORTED positions into TILE_M-row tiles gives at most two
# partial tiles (the last text tile and the last image tile) whatever the number of image runs;
# the kernels gather their rows through the order and scatter their output rows back. A token's
# sorted position is a running count, so the order is built by two small launches (count per
# window, then write), with no host sync.
TABLE_WINDOW = 1024  # tokens per program of the order kernels
COUNTS_CHUNK = 256  # window counts read per step by order_write_kernel (a fixed constexpr, any M)
ORDER_PAD = 128  # zeros after n_text so that a whole tile of positions can be loaded unmasked (>= TILE_M)


def build_order_torch(is_image: torch.Tensor) -> torch.Tensor:
    """The order table from tensor ops only (reference for the Triton builder; no host sync)."""
    img = is_image.reshape(-1)
    order = torch.argsort(img.to(torch.int8), stable=True)
    n_text = (~img).sum().reshape(1)
    pad = torch.zeros(ORDER_PAD - 1, dtype=order.dtype, device=order.device)
    return torch.cat([order, n_text, pad]).to(torch.int32)


@triton.jit(do_not_specialize=["M"])
def order_count_kernel(img_ptr, counts_ptr, M, WINDOW: tl.constexpr):
    """counts[w] = text tokens in window w."""
    w = tl.program_id(0)
    i = w * WINDOW + tl.arange(0, WINDOW)
    img = tl.load(img_ptr + i, mask=i < M, other=1) != 0
    tl.store(counts_ptr + w, tl.sum((~img).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["M", "n_windows"])
def order_write_kernel(img_ptr, counts_ptr, order_ptr, M, n_windows,
                       WINDOW: tl.constexpr, COUNTS_CHUNK: tl.constexpr, PAD: tl.constexpr):
    """order[sorted position of token i] = i for the tokens of window w; program 0 writes n_text
    and the zero padding after it."""
    w = tl.program_id(0)
    # the per-window counts are read in fixed chunks: no constexpr depends on M, so a new batch size
    # never compiles a new kernel (e.g. inside a CUDA-graph capture)
    zero = tl.sum(tl.zeros((COUNTS_CHUNK,), dtype=tl.int32), axis=0)
    n_text = zero
    text_before = zero
    for c0 in range(0, n_windows, COUNTS_CHUNK):
        wi = c0 + tl.arange(0, COUNTS_CHUNK)
        counts = tl.load(counts_ptr + wi, mask=wi < n_windows, other=0)
        n_text += tl.sum(counts, axis=0)
        text_before += tl.sum(tl.where(wi < w, counts, 0), axis=0)
    w0 = w * WINDOW
    i = w0 + tl.arange(0, WINDOW)
    ok = i < M
    img = tl.load(img_ptr + i, mask=ok, other=0) != 0
    image_before = w0 - text_before  # every earlier token is text or image
    text_rank = text_before + tl.cumsum((~img).to(tl.int32), axis=0) - 1
    image_rank = n_text + image_before + tl.cumsum(img.to(tl.int32), axis=0) - 1
    tl.store(order_ptr + tl.where(img, image_rank, text_rank), i, mask=ok)
    if w == 0:
        tl.store(order_ptr + M, n_text)
        p = tl.arange(0, PAD)
        tl.store(order_ptr + M + p, tl.zeros_like(p), mask=p > 0)


def order_table_size(M: int) -> int:
    return M + ORDER_PAD


def build_order(is_image: torch.Tensor) -> torch.Tensor:
    """The order table of a flat ``[M]`` bool modality vector, in two launches (no host sync)::

        table[0 : M]            token index at sorted position p (text first, each group in token order)
        table[M]                number of text tokens
        table[M+1 : M+PAD]      zeros (a tile's positions load unmasked)
    """
    M = is_image.numel()
    img = is_image.reshape(-1).contiguous().view(torch.uint8)
    n_windows = max(cdiv(M, TABLE_WINDOW), 1)
    counts = torch.empty(n_windows, dtype=torch.int32, device=img.device)
    table = torch.empty(order_table_size(M), dtype=torch.int32, device=img.device)
    order_count_kernel[(n_windows,)](img, counts, M, WINDOW=TABLE_WINDOW, num_warps=4)
    order_write_kernel[(n_windows,)](img, counts, table, M, n_windows, WINDOW=TABLE_WINDOW,
                                     COUNTS_CHUNK=COUNTS_CHUNK, PAD=ORDER_PAD, num_warps=4)
    return table


def slots_for(M: int, tile_m: int = TILE_M) -> int:
    """Programs along the token axis: the sorted text and image parts hold at most cdiv(M) + 1 tiles."""
    return cdiv(M, tile_m) + 1


@triton.jit
def _tile_rows(table_ptr, M, n_text, text_tiles, j, BLOCK_M: tl.constexpr):
    """Token rows of tile j (text tiles first), the valid-row mask and whether it is an image tile."""
    is_img = j >= text_tiles
    pos0 = tl.where(is_img, n_text + (j - text_tiles) * BLOCK_M, j * BLOCK_M)
    pos_end = tl.where(is_img, M, n_text)
    pos = pos0 + tl.arange(0, BLOCK_M)
    row_ok = pos < pos_end
    # unmasked: the table is padded so that a whole tile of positions is in bounds (a masked load
    # here made ptxas serialise the dW kernel's wgmma, C7515); rows past pos_end are never used
    rows = tl.load(table_ptr + pos)
    return rows.to(tl.int64), row_ok, is_img


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ----------------------------------------------------------------------------- configs
def gemm_configs(interpret: bool = INTERPRET):
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    # 128 x 128 x 64 with 4 warps and 256-wide tiles spill on sm_90 (checked by the static tier)
    for bn, bk, warps, stages in (
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (64, 64, 4, 4),
        (128, 128, 8, 2),
    ):
        cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfgs


def dw_configs(interpret: bool = INTERPRET):
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    # num_stages=5: the dW loop's row addresses come from tile-table loads inside the loop, so
    # Triton 3.6 splits the stages between the two levels of loads and keeps (5 - 1) // 2 + 1 = 3
    # shared buffers per operand: two tiles prefetched while the MMA of a third runs (4 stages
    # would give only 2; the static tier reads the buffers from the sm_90 TTGIR)
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=5),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=5),
        # fits float32 operands too (the 16-bit tiles above need more than 227 KB in fp32)
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=5),
    ]


def stage_buffers(num_stages: int, indirect: bool = False) -> int:
    """Shared buffers per pipelined operand that Triton 3.6 allocates (checked in the sm_90 TTGIR).

    A loop whose load addresses are plain arithmetic gets ``num_stages`` buffers; one whose
    addresses come from another load in the same loop (``indirect``: the dW kernel's token order)
    shares the stages between the two levels: ``(num_stages - 1) // 2 + 1``.
    """
    return (num_stages - 1) // 2 + 1 if indirect else num_stages


def dw_config_allowed(config, split: int) -> bool:
    """The 128x128 dW tile with float32 split partials makes ptxas serialise its wgmma (C7515, static tier)."""
    return split == 1 or config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] < 128 * 128


# Shared memory per block on sm_90 is 227 KB; keep a margin for the epilogue's layout conversions.
SMEM_BUDGET = 200 * 1024


def _fits(configs, element_size, operand_elems, fallback_key, indirect=False):
    """Configs whose pipelined operand buffers fit in shared memory (or the smallest one)."""
    fitting = [c for c in configs
               if stage_buffers(c.num_stages, indirect) * operand_elems(c) * element_size <= SMEM_BUDGET]
    return fitting or [min(configs, key=fallback_key)]


def prune_gemm_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    bm = kwargs.get("BLOCK_M", TILE_M)
    el = named_args["a_ptr"].element_size()
    return _fits(configs, el, lambda c: (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"],
                 lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages)


def prune_dw_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    bm = kwargs.get("BLOCK_M", TILE_M)
    el = named_args["dy_ptr"].element_size()
    split = kwargs.get("SPLIT", named_args.get("SPLIT", 1))
    allowed = [c for c in configs if dw_config_allowed(c, split)] or configs
    return _fits(allowed, el, lambda c: bm * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]),
                 lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages, indirect=True)


GEMM_CONFIGS = gemm_configs()
DW_CONFIGS = dw_configs()


# ----------------------------------------------------------------------------- GEMM kernel
# Integers whose value changes with the batch but whose divisibility buys nothing (row masks are
# per tile anyway): not specialised, so a new token count or head layout reuses the compiled kernel.
_NO_SPECIALIZE_MM = ["M", "n_slots", "num_heads", "num_kv_heads", "cos_rows", "has_bias_text", "has_bias_image"]


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "QKV", "ROPE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE_MM)
def routed_mm_kernel(
    a_ptr, bt_ptr, bi_ptr, biast_ptr, biasi_ptr, table_ptr,
    out_ptr, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
    M, N, K, stride_am, stride_bn, stride_bk, stride_om,
    n_slots, num_heads, num_kv_heads, cos_rows,
    has_bias_text, has_bias_image,
    HEAD_DIM: tl.constexpr, QKV: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    if QKV:
        if ROPE:
            tiles_per_head: tl.constexpr = (HEAD_DIM // 2 + HALF - 1) // HALF
        else:
            tiles_per_head: tl.constexpr = (HEAD_DIM + BLOCK_N - 1) // BLOCK_N
        n_col_tiles = (num_heads + 2 * num_kv_heads) * tiles_per_head
    else:
        n_col_tiles = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M slots share a band of column tiles (L2 reuse of A and B)
    width = GROUP_M * n_col_tiles
    group_id = pid // width
    first_slot = group_id * GROUP_M
    group_size = tl.minimum(n_slots - first_slot, GROUP_M)
    slot = first_slot + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    n_text = tl.load(table_ptr + M)
    text_tiles = tl.cdiv(n_text, BLOCK_M)
    n_tiles = text_tiles + tl.cdiv(M - n_text, BLOCK_M)

    jj = tl.arange(0, BLOCK_N)
    if QKV:
        head = pid_n // tiles_per_head
        sub = pid_n % tiles_per_head
        if ROPE:
            # the tile holds columns [c0, c0 + HALF) of the head's first half and their rotate-half
            # partners [c0 + D/2, ...), so the rotation is elementwise in the epilogue
            d_in_half = sub * HALF + (jj % HALF)
            col_ok = d_in_half < HEAD_DIM // 2
            d_idx = d_in_half + (jj // HALF) * (HEAD_DIM // 2)
        else:
            d_idx = sub * BLOCK_N + jj
            col_ok = d_idx < HEAD_DIM
        cols = head * HEAD_DIM + d_idx
    else:
        head = 0
        cols = pid_n * BLOCK_N + jj
        col_ok = cols < N
    rk = tl.arange(0, BLOCK_K)

    for j in range(slot, n_tiles, n_slots):  # at most one tile per slot (slots_for)
        rows64, row_ok, is_img = _tile_rows(table_ptr, M, n_text, text_tiles, j, BLOCK_M)
        b_ptr = tl.where(is_img, bi_ptr, bt_ptr)
        a_ptrs = a_ptr + rows64[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + rk[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + rk) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong: do it in fp32 there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk

        if HAS_BIAS:
            bias_ptr = tl.where(is_img, biasi_ptr, biast_ptr)
            has_bias = tl.where(is_img, has_bias_image, has_bias_text) != 0
            bias = tl.load(bias_ptr + cols, mask=col_ok & has_bias, other=0.0)
            acc += bias.to(tl.float32)[None, :]

        out_dtype = out_ptr.dtype.element_ty
        if QKV:
            # head-major destinations: q [M, H*D], k and v [M, Hkv*D] (row-major = [..., T, heads, D])
            in_k = head >= num_heads
            in_v = head >= num_heads + num_kv_heads
            dst = tl.where(in_v, v_out_ptr, tl.where(in_k, k_out_ptr, out_ptr))
            dst_head = tl.where(in_v, head - num_heads - num_kv_heads, tl.where(in_k, head - num_heads, head))
            dst_stride = tl.where(in_k, num_kv_heads, num_heads) * HEAD_DIM
            if ROPE:
                lo = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
                y_lo = lo[0]
                y_hi = lo[1]
                rh = tl.arange(0, HALF)
                d_lo = sub * HALF + rh
                h_ok = d_lo < HEAD_DIM // 2
                rotate = head < num_heads + num_kv_heads
                trow = (rows64 % cos_rows) * HEAD_DIM
                m2 = row_ok[:, None] & h_ok[None, :]
                mr = m2 & rotate
                # v heads: cos = 1, sin = 0 through the masked loads' defaults
                c_lo = tl.load(cos_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=1.0).to(tl.float32)
                c_hi = tl.load(cos_ptr + trow[:, None] + (d_lo + HEAD_DIM // 2)[None, :], mask=mr, other=1.0).to(tl.float32)
                s_lo = tl.load(sin_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=0.0).to(tl.float32)
                s_hi = tl.load(sin_ptr + trow[:, None] + (d_lo + HEAD_DIM // 2)[None, :], mask=mr, other=0.0).to(tl.float32)
                o_lo = y_lo * c_lo - y_hi * s_lo
                o_hi = y_hi * c_hi + y_lo * s_hi
                base = dst + rows64[:, None] * dst_stride + dst_head * HEAD_DIM
                tl.store(base + d_lo[None, :], o_lo.to(out_dtype), mask=m2)
                tl.store(base + (d_lo + HEAD_DIM // 2)[None, :], o_hi.to(out_dtype), mask=m2)
            else:
                ptrs = dst + rows64[:, None] * dst_stride + (dst_head * HEAD_DIM + d_idx)[None, :]
                tl.store(ptrs, acc.to(out_dtype), mask=row_ok[:, None] & col_ok[None, :])
        else:
            ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :]
            tl.store(ptrs, acc.to(out_dtype), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------- stacked-weight (TMA) GEMM kernel
# When the two weights are the two halves of ONE [2, N, K] tensor (ModalityLinear allocates them so),
# B comes through one 3-D TMA descriptor over that tensor: block [1, BLOCK_N, BLOCK_K] at
# [modality, n0, k0] (forward) or [1, BLOCK_K, BLOCK_N] at [modality, k0, n0] (dX, W read transposed).
# The modality is an integer from the tile index: no pointer select, no branch, one K loop, so the
# wgmma stays asynchronous (the removed two-descriptor variant had two branch loops and ptxas
# serialised its wgmma, C7515). The descriptor's bounds zero-fill the N and K tails per dimension,
# so a tail never reads the other modality's rows. A rows are still gathered through the token
# order by cp.async (a TMA gather is Blackwell-only).
def _set_tma_block(nargs):
    """Autotune pre-hook: the host descriptor's block shape follows the config."""
    bn, bk = nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["w_desc"].block_shape = [1, bk, bn] if nargs["TRANS_B"] else [1, bn, bk]


# (BLOCK_N, BLOCK_K, warps, stages, register cap or None, epilogue): "plain" configs serve the
# linear output, dX and QKV without RoPE; "rope" configs serve QKV with RoPE. Figures from the
# static tier (bf16, sm_90; tests/test_modality_linear_static.py asserts the two-CTA, no-spill,
# no-C7515 and HGMMA claims and prints the figures):
#   128 x 128 x 64, 8 warps, 3 stages, capped at 128 registers: no spills, 97 KB shared, so TWO
#     CTAs share an SM (2 x 256 threads x 128 registers = the 64K register file), and one CTA's
#     prologue / epilogue runs beside the other's main loop. Uncapped, ptxas takes 165-192 (one CTA).
#   128 x 256 x 64, 8 warps, 3 stages: the cuBLAS-like tile (HGMMA 64x256x16), 145 KB, one CTA.
#   128 x 128 x 64, 4 stages: one CTA with a deeper pipeline.
#   RoPE: the rotation needs cos / sin tiles beside the accumulator: uncapped 190-193 registers at
#     128 wide with one head per tile (255 with two heads of 64), one CTA; capped at 128 it spills (56 B with fp32 tables, 8 B with
#     bf16 ones), and 256 wide spills in any case.
TMA_TILES = (
    (128, 64, 8, 3, 128, "plain"),
    (256, 64, 8, 3, None, "plain"),
    (128, 64, 8, 4, None, "plain"),
    (128, 64, 8, 3, None, "rope"),
    (128, 64, 8, 4, None, "rope"),
)
TMA_TWO_CTA_CONFIG = 0  # the TMA_TILES entry sized for two CTAs per SM


def tma_gemm_configs(interpret: bool = INTERPRET):
    if interpret:
        # one config for every epilogue (the autotuner would time even a single pruned config)
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "EPILOGUE": "any"}, num_warps=4,
                              num_stages=1, pre_hook=_set_tma_block)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE": epi}, num_warps=warps,
                          num_stages=stages, maxnreg=cap, pre_hook=_set_tma_block)
            for bn, bk, warps, stages, cap, epi in TMA_TILES]


def prune_tma_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    rope = bool(kwargs.get("ROPE", named_args.get("ROPE", False)))
    want = "rope" if rope else "plain"
    configs = [c for c in configs if c.kwargs["EPILOGUE"] == want]
    bm = kwargs.get("BLOCK_M", TILE_M)
    el = named_args["a_ptr"].element_size()
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 1))
    # the RoPE epilogue needs whole heads per tile (the launcher checked TMA_ROPE_BLOCK_N)
    configs = [c for c in configs if not rope or c.kwargs["BLOCK_N"] % head_dim == 0] or configs
    return _fits(configs, el, lambda c: (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"],
                 lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages)


TMA_CONFIGS = tma_gemm_configs()
# every BLOCK_N a RoPE launch may run is a multiple of this: the head dim must divide it
TMA_ROPE_BLOCK_N = math.gcd(*[c.kwargs["BLOCK_N"] for c in TMA_CONFIGS if c.kwargs["EPILOGUE"] in ("rope", "any")])


@triton.autotune(configs=TMA_CONFIGS, key=["N", "K", "QKV", "ROPE", "HAS_BIAS", "TRANS_B"],
                 prune_configs_by={"early_config_prune": prune_tma_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE_MM)
def routed_mm_tma_kernel(
    a_ptr, w_desc, biast_ptr, biasi_ptr, table_ptr,
    out_ptr, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
    M, N, K, stride_am, stride_om,
    n_slots, num_heads, num_kv_heads, cos_rows,
    has_bias_text, has_bias_image,
    HEAD_DIM: tl.constexpr, QKV: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    TRANS_B: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``out = A_gathered @ W[modality]^T (+ bias)`` with W one ``[2, N_w, K_w]`` TMA descriptor.

    Forward: A = x, out [M, N_w] (``QKV``: q / k / v in the attention layout, ``ROPE``: rotated;
    RoPE needs ``BLOCK_N % HEAD_DIM == 0``, whole heads per tile). dX (``TRANS_B``): A = dY,
    out [M, K_w] = dY @ W[modality]. Here ``N`` is the output width and ``K`` the reduction length.
    """
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_col_tiles
    group_id = pid // width
    first_slot = group_id * GROUP_M
    group_size = tl.minimum(n_slots - first_slot, GROUP_M)
    slot = first_slot + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    n_text = tl.load(table_ptr + M)
    text_tiles = tl.cdiv(n_text, BLOCK_M)
    n_tiles = text_tiles + tl.cdiv(M - n_text, BLOCK_M)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rk = tl.arange(0, BLOCK_K)

    for j in range(slot, n_tiles, n_slots):  # at most one tile per slot (slots_for)
        rows64, row_ok, is_img = _tile_rows(table_ptr, M, n_text, text_tiles, j, BLOCK_M)
        modality = is_img.to(tl.int32)  # the descriptor's first coordinate: no pointer select
        a_ptrs = a_ptr + rows64[:, None] * stride_am + rk[None, :]
        if HAS_BIAS:
            # the accumulator starts at the bias (uncapped sm_90 compile, 128 x 128: 165 registers this
            # way, 174 with the bias added after the K loop, 125 without a bias)
            bias_ptr = tl.where(is_img, biasi_ptr, biast_ptr)
            has_bias = tl.where(is_img, has_bias_image, has_bias_text) != 0
            bias = tl.load(bias_ptr + cols, mask=col_ok & has_bias, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + bias.to(tl.float32)[None, :]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            if TRANS_B:
                b = tl.reshape(w_desc.load([modality, k0, n0]), (BLOCK_K, BLOCK_N))
            else:
                b = tl.reshape(w_desc.load([modality, n0, k0]), (BLOCK_N, BLOCK_K)).T
            if UPCAST:  # the interpreter's bf16 dot is wrong: do it in fp32 there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K

        out_dtype = out_ptr.dtype.element_ty
        if QKV:
            if ROPE:
                # whole heads per tile: [BLOCK_M, heads, 2, D/2] -> the first and second halves of
                # every head, so the rotate-half partner of each column is in registers
                HALF_D: tl.constexpr = HEAD_DIM // 2
                HALF: tl.constexpr = BLOCK_N // 2
                # 32-bit offsets into the cos / sin tables (token indices and table sizes fit in int32;
                # the 64-bit modulo and offsets cost registers)
                trow = (rows64.to(tl.int32) % cos_rows) * HEAD_DIM
                if BLOCK_N == HEAD_DIM:
                    # one head per tile: one destination (q, k or v) for the whole tile, one store per half
                    parts = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
                    y_lo = parts[0]
                    y_hi = parts[1]
                    head = n0 // HEAD_DIM
                    d_lo = tl.arange(0, HALF)
                    in_k = head >= num_heads
                    in_v = head >= num_heads + num_kv_heads
                    dst = tl.where(in_v, v_out_ptr, tl.where(in_k, k_out_ptr, out_ptr))
                    dst_head = tl.where(in_v, head - num_heads - num_kv_heads, tl.where(in_k, head - num_heads, head))
                    dst_stride = tl.where(in_k, num_kv_heads, num_heads) * HEAD_DIM
                    m2 = row_ok[:, None]  # every column of the tile is in the head
                    mr = m2 & (head < num_heads + num_kv_heads)
                    c_lo = tl.load(cos_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=1.0).to(tl.float32)
                    s_lo = tl.load(sin_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=0.0).to(tl.float32)
                    base = dst + rows64[:, None] * dst_stride + dst_head * HEAD_DIM + d_lo[None, :]
                    tl.store(base, (y_lo * c_lo - y_hi * s_lo).to(out_dtype), mask=m2)
                    c_hi = tl.load(cos_ptr + trow[:, None] + (d_lo + HALF_D)[None, :], mask=mr, other=1.0).to(tl.float32)
                    s_hi = tl.load(sin_ptr + trow[:, None] + (d_lo + HALF_D)[None, :], mask=mr, other=0.0).to(tl.float32)
                    tl.store(base + HALF_D, (y_hi * c_hi + y_lo * s_hi).to(out_dtype), mask=m2)
                else:
                    parts = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, BLOCK_N // HEAD_DIM, 2, HALF_D)),
                                                (0, 1, 3, 2)))
                    y_lo = tl.reshape(parts[0], (BLOCK_M, HALF))
                    y_hi = tl.reshape(parts[1], (BLOCK_M, HALF))
                    i = tl.arange(0, HALF)
                    head = n0 // HEAD_DIM + i // HALF_D
                    d_lo = i % HALF_D
                    h_ok = head < num_heads + 2 * num_kv_heads
                    rotate = (head < num_heads + num_kv_heads)[None, :]
                    mr = row_ok[:, None] & h_ok[None, :] & rotate
                    # v heads: cos = 1, sin = 0 through the masked loads' defaults. One half at a time
                    # (fewer cos/sin tiles live at once)
                    c_lo = tl.load(cos_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=1.0).to(tl.float32)
                    s_lo = tl.load(sin_ptr + trow[:, None] + d_lo[None, :], mask=mr, other=0.0).to(tl.float32)
                    o_lo = y_lo * c_lo - y_hi * s_lo
                    _store_heads(out_ptr, k_out_ptr, v_out_ptr, rows64, row_ok, head, d_lo, o_lo.to(out_dtype), h_ok,
                                 num_heads, num_kv_heads, HEAD_DIM)
                    c_hi = tl.load(cos_ptr + trow[:, None] + (d_lo + HALF_D)[None, :], mask=mr, other=1.0).to(tl.float32)
                    s_hi = tl.load(sin_ptr + trow[:, None] + (d_lo + HALF_D)[None, :], mask=mr, other=0.0).to(tl.float32)
                    o_hi = y_hi * c_hi + y_lo * s_hi
                    _store_heads(out_ptr, k_out_ptr, v_out_ptr, rows64, row_ok, head, d_lo + HALF_D, o_hi.to(out_dtype),
                                 h_ok, num_heads, num_kv_heads, HEAD_DIM)
            else:
                _store_heads(out_ptr, k_out_ptr, v_out_ptr, rows64, row_ok, cols // HEAD_DIM, cols % HEAD_DIM,
                             acc.to(out_dtype), col_ok, num_heads, num_kv_heads, HEAD_DIM)
        else:
            ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :]
            tl.store(ptrs, acc.to(out_dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _store_heads(q_ptr, k_ptr, v_ptr, rows64, row_ok, head, d, val, col_ok, num_heads, num_kv_heads,
                 HEAD_DIM: tl.constexpr):
    """Columns of (head, d) to q [M, H*D], k or v [M, Hkv*D]: three masked stores with scalar bases
    (no per-column 64-bit pointer select: a tile may straddle q | k | v for any head count)."""
    m = row_ok[:, None] & col_ok[None, :]
    in_k = head >= num_heads
    in_v = head >= num_heads + num_kv_heads
    c = head * HEAD_DIM + d  # column in the fused q | k | v
    kv_stride = num_kv_heads * HEAD_DIM
    tl.store(q_ptr + rows64[:, None] * (num_heads * HEAD_DIM) + c[None, :], val, mask=m & (~in_k)[None, :])
    tl.store(k_ptr + rows64[:, None] * kv_stride + (c - num_heads * HEAD_DIM)[None, :], val,
             mask=m & (in_k & ~in_v)[None, :])
    tl.store(v_ptr + rows64[:, None] * kv_stride + (c - (num_heads + num_kv_heads) * HEAD_DIM)[None, :], val,
             mask=m & in_v[None, :])


# ----------------------------------------------------------------------------- dW kernel
# dW only: the bias gradient is NOT summed here from the dY tile. That tile is a wgmma operand held
# in shared memory; reading it into registers for a sum made Triton 3.6 keep it in ONE buffer that
# the next cp.async overwrote while a wgmma still read it (a data race, Triton issue 6691). The
# static tier checks every async-wgmma operand's buffer count (tests/test_modality_linear_static.py).
@triton.autotune(configs=DW_CONFIGS, key=["N", "K", "SPLIT"],
                 prune_configs_by={"early_config_prune": prune_dw_configs})
@triton.jit(do_not_specialize=["M"])
def routed_dw_kernel(
    dy_ptr, x_ptr, table_ptr, dwt_ptr, dwi_ptr,
    M, N, K,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW_m = dY_m^T X_m`` over the tiles of modality m (program axis 1: modality x split)."""
    pid = tl.program_id(0)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    pid_n = pid // n_k_tiles
    pid_k = pid % n_k_tiles
    pid1 = tl.program_id(1)
    modality = pid1 // SPLIT  # 0 text, 1 image
    split = pid1 % SPLIT
    n_text = tl.load(table_ptr + M)
    text_tiles = tl.cdiv(n_text, BLOCK_M)
    n_tiles = text_tiles + tl.cdiv(M - n_text, BLOCK_M)
    lo = tl.where(modality == 1, text_tiles, 0)
    hi = tl.where(modality == 1, n_tiles, text_tiles)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(lo + split, hi, SPLIT):
        rows64, row_ok, _ = _tile_rows(table_ptr, M, n_text, text_tiles, j, BLOCK_M)
        dyt = tl.load(dy_ptr + rows64[None, :] * N + cols_n[:, None], mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * K + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=DOT_PRECISION)
    dw_ptr = tl.where(modality == 1, dwi_ptr, dwt_ptr) + split.to(tl.int64) * N * K
    out = dw_ptr + cols_n.to(tl.int64)[:, None] * K + cols_k[None, :]
    tl.store(out, acc.to(dwt_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- db kernel
DB_BLOCK_N = 128  # columns per program of the bias-gradient reduction (registers only, no MMA)
DB_BLOCK_N_INTERPRET = 16
DB_NUM_WARPS = 8  # 128 x 128 dY tile: 64 elements per thread (4 warps spilled in fp16, static tier)


@triton.jit(do_not_specialize=["M", "N"])
def routed_db_kernel(dy_ptr, table_ptr, dbt_ptr, dbi_ptr, M, N,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``db_m = sum over the tiles of modality m of dY`` (its own pass over dY: see routed_dw_kernel)."""
    pid_n = tl.program_id(0)
    pid1 = tl.program_id(1)
    modality = pid1 // SPLIT
    split = pid1 % SPLIT
    n_text = tl.load(table_ptr + M)
    text_tiles = tl.cdiv(n_text, BLOCK_M)
    n_tiles = text_tiles + tl.cdiv(M - n_text, BLOCK_M)
    lo = tl.where(modality == 1, text_tiles, 0)
    hi = tl.where(modality == 1, n_tiles, text_tiles)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(lo + split, hi, SPLIT):
        rows64, row_ok, _ = _tile_rows(table_ptr, M, n_text, text_tiles, j, BLOCK_M)
        tile = tl.load(dy_ptr + rows64[:, None] * N + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        db += tl.sum(tile.to(tl.float32), axis=0)
    db_ptr = tl.where(modality == 1, dbi_ptr, dbt_ptr) + split * N
    tl.store(db_ptr + cols, db.to(dbt_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- QKV backward prologue
@triton.jit(do_not_specialize=["M", "num_heads", "num_kv_heads", "cos_rows"])
def qkv_grad_kernel(
    dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dy_ptr,
    M, num_heads, num_kv_heads, cos_rows,
    HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dY[:, head] = un-rotated dq / dk (transpose of the rotation: y_lo = o_lo c_lo + o_hi s_hi, ...)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    in_k = head >= num_heads
    in_v = head >= num_heads + num_kv_heads
    src = tl.where(in_v, dv_ptr, tl.where(in_k, dk_ptr, dq_ptr))
    src_head = tl.where(in_v, head - num_heads - num_kv_heads, tl.where(in_k, head - num_heads, head))
    src_stride = tl.where(in_k, num_kv_heads, num_heads) * HEAD_DIM
    n_total = (num_heads + 2 * num_kv_heads) * HEAD_DIM
    src_base = src + rows64[:, None] * src_stride + src_head * HEAD_DIM
    dst_base = dy_ptr + rows64[:, None] * n_total + head * HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    out_dtype = dy_ptr.dtype.element_ty
    if ROPE:
        HALF_D: tl.constexpr = HEAD_DIM // 2
        d_ok = d < HALF_D
        m2 = row_ok[:, None] & d_ok[None, :]
        mr = m2 & (head < num_heads + num_kv_heads)
        trow = (rows64 % cos_rows) * HEAD_DIM
        g_lo = tl.load(src_base + d[None, :], mask=m2, other=0.0).to(tl.float32)
        g_hi = tl.load(src_base + (d + HALF_D)[None, :], mask=m2, other=0.0).to(tl.float32)
        c_lo = tl.load(cos_ptr + trow[:, None] + d[None, :], mask=mr, other=1.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + trow[:, None] + (d + HALF_D)[None, :], mask=mr, other=1.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + trow[:, None] + d[None, :], mask=mr, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + trow[:, None] + (d + HALF_D)[None, :], mask=mr, other=0.0).to(tl.float32)
        tl.store(dst_base + d[None, :], (g_lo * c_lo + g_hi * s_hi).to(out_dtype), mask=m2)
        tl.store(dst_base + (d + HALF_D)[None, :], (g_hi * c_hi - g_lo * s_lo).to(out_dtype), mask=m2)
    else:
        m2 = row_ok[:, None] & (d < HEAD_DIM)[None, :]
        g = tl.load(src_base + d[None, :], mask=m2, other=0.0)
        tl.store(dst_base + d[None, :], g.to(out_dtype), mask=m2)

"""Opt-in TMA variant of the routed GEMM (forward and dX of ``modality_linear``).

Same tile table, grid and epilogue as ``routed_mm_kernel``; the main loop loads A and the weight
tile through Hopper's tensor-memory accelerator (host-side ``TensorDescriptor``s) instead of
pointer loads + cp.async. A tile's rows past its ``row_end`` are loaded too (they are the next
tile's tokens, or zeros past ``M``), multiplied with this tile's weight and never stored, so no row
mask is needed in the main loop; TMA zero-fills the K and N tails.

It is OFF by default (``USE_TMA = False``): it passes the interpreter and sm_90 compile tiers, but
no GPU has timed it yet. ``bench/bench_modality_linear.py`` times it next to the default kernel
(provider ``triton_tma``) so the first GPU run can decide which one becomes the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._modality_linear_kernels import INTERPRET, SMEM_BUDGET, TILE_M, cdiv, slots_for

USE_TMA = False


def _set_block_shapes(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    b_block = [bn, bk] if nargs["W_IS_NK"] else [bk, bn]
    nargs["bt_desc"].block_shape = b_block
    nargs["bi_desc"].block_shape = b_block


def tma_configs(interpret: bool = INTERPRET):
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1,
                              pre_hook=_set_block_shapes)]
    # the text and image main loops each get their own stage buffers (see routed_mm_tma_kernel), so
    # shared memory is 2 x stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes: these fit 227 KB in 16 bit
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
        for bn, bk, w, s in ((128, 64, 8, 3), (128, 64, 8, 2), (256, 64, 8, 2), (64, 64, 4, 4))
    ]


def prune_tma_configs(configs, named_args, **kwargs):
    if INTERPRET:
        return configs
    bm = kwargs.get("BLOCK_M", TILE_M)
    el = named_args["out_ptr"].element_size()
    fits = [c for c in configs
            if 2 * c.num_stages * (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * el <= SMEM_BUDGET]
    return fits or [min(configs, key=lambda c: c.num_stages * (bm + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"])]


TMA_CONFIGS = tma_configs()


@triton.jit
def _tma_k_loop(a_desc, b_desc, row_start, n0, K, W_IS_NK: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([row_start, k0])
        if W_IS_NK:  # forward: W [N, K], the tile is read K-major and transposed for the MMA
            b = b_desc.load([n0, k0]).T
        else:  # dX: W [K_red, N] read as is
            b = b_desc.load([k0, n0])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=TMA_CONFIGS, key=["N", "K", "W_IS_NK", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune_tma_configs})
@triton.jit(do_not_specialize=["M", "n_slots", "has_bias_text", "has_bias_image"])
def routed_mm_tma_kernel(
    a_desc, bt_desc, bi_desc, biast_ptr, biasi_ptr, table_ptr, out_ptr,
    M, N, K, stride_om, n_slots, has_bias_text, has_bias_image,
    W_IS_NK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_col_tiles
    group_id = pid // width
    first_slot = group_id * GROUP_M
    group_size = tl.minimum(n_slots - first_slot, GROUP_M)
    slot = first_slot + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    n0 = pid_n * BLOCK_N

    n_text = tl.load(table_ptr + 2 * M + 2)
    n_tiles = tl.load(table_ptr + 2 * M + 3)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rm = tl.arange(0, BLOCK_M)
    for j in range(slot, n_tiles, n_slots):
        row_start = tl.load(table_ptr + j)
        row_end = tl.load(table_ptr + M + 1 + j)
        is_img = j >= n_text
        # one main loop per weight: a descriptor cannot be selected at run time, and a conditional
        # load inside one loop defeats the TMA pipeliner (checked on the sm_90 compile)
        if is_img:
            acc = _tma_k_loop(a_desc, bi_desc, row_start, n0, K, W_IS_NK, UPCAST, DOT_PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _tma_k_loop(a_desc, bt_desc, row_start, n0, K, W_IS_NK, UPCAST, DOT_PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            bias_ptr = tl.where(is_img, biasi_ptr, biast_ptr)
            has_bias = tl.where(is_img, has_bias_image, has_bias_text) != 0
            bias = tl.load(bias_ptr + cols, mask=col_ok & has_bias, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        rows = row_start + rm
        ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None] & col_ok[None, :])


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, and a unit last stride."""
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def launch_mm_tma(a, w_t, w_i, b_t, b_i, table, out, *, transpose_b: bool, upcast: bool, precision: str):
    """``out = A @ W_m^T (+ b_m)`` (forward) or ``out = A @ W_m`` (dX, ``transpose_b``) through TMA."""
    M = a.shape[0]
    if transpose_b:
        N, Kr = w_t.shape[1], w_t.shape[0]
    else:
        N, Kr = w_t.shape[0], w_t.shape[1]
    n_slots = slots_for(M)
    dummy_block = [16, 16]  # replaced by the config's pre-hook before every launch
    a_desc = TensorDescriptor.from_tensor(a, dummy_block)
    bt_desc = TensorDescriptor.from_tensor(w_t, dummy_block)
    bi_desc = TensorDescriptor.from_tensor(w_i, dummy_block)

    def grid(meta):
        return (n_slots * cdiv(N, meta["BLOCK_N"]),)

    routed_mm_tma_kernel[grid](
        a_desc, bt_desc, bi_desc, b_t if b_t is not None else w_t, b_i if b_i is not None else w_t, table, out,
        M, N, Kr, out.stride(0), n_slots, int(b_t is not None), int(b_i is not None),
        W_IS_NK=not transpose_b, HAS_BIAS=b_t is not None or b_i is not None, UPCAST=upcast,
        DOT_PRECISION=precision, BLOCK_M=TILE_M,
    )

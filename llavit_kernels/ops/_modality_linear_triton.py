"""Triton backend of ``modality_linear`` / ``modality_qkv``: custom ops, fake kernels and autograd.

Ops (namespace ``llavit``), all functional (fresh outputs, no input mutation)::

    ml_token_order(is_image)                                 -> int32 table   (no grad)
    ml_linear(x2d, table, w_t, b_t, w_i, b_i)                -> y [M, N]      (autograd)
    ml_qkv(x2d, table, w_t, b_t, w_i, b_i, cos, sin, H, Hkv) -> q, k, v       (autograd)
    ml_linear_dx(dy, table, w_t, w_i)                        -> dx [M, K]
    ml_linear_dw(dy, x2d, table)                             -> dw_t, dw_i, db_t, db_i
    ml_qkv_grad(dq, dk, dv, cos, sin, H, Hkv)                -> dy [M, N]

Grids and workspaces depend on shapes only, so the ops trace under ``torch.compile(fullgraph=True)``
and replay under CUDA graphs (after the autotuner has run once outside the capture).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import List, Optional, Tuple

import torch

from . import _modality_linear_kernels as K_
from ._modality_linear_kernels import _next_pow2, cdiv
from .modality_linear import TRITON_DTYPES as _TRITON_DTYPES  # one source of truth
from .modality_linear import stacked_base

__all__ = ["modality_linear_triton", "modality_qkv_triton"]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products (as F.linear without TF32); 16-bit inputs ignore the flag
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return K_.INTERPRET and dtype == torch.bfloat16


def _dw_split(M: int, N: int, K: int, device: torch.device) -> int:
    """Token splits of the dW reduction so that the grid fills the GPU (shape-only choice)."""
    if K_.INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = 2 * cdiv(N, 128) * cdiv(K, 128)
    want = cdiv(2 * sms, programs)
    return max(1, min(want, cdiv(M, K_.TILE_M) // 4, 16))


def _db_split(M: int, N: int, device: torch.device) -> int:
    """Token splits of the bias-gradient reduction (a pure bandwidth pass): ~2 programs per SM."""
    if K_.INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = 2 * cdiv(N, K_.DB_BLOCK_N)
    return max(1, min(cdiv(2 * sms, programs), cdiv(M, K_.TILE_M) // 2, 32))


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one (a model split over GPUs by ``device_map``)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# Triton's launcher marks a pointer "16-byte aligned" and an integer "divisible by 16" per call; only
# then can the kernels' row loads be vectorised (16-byte cp.async). Otherwise the same kernel runs
# with scalar loads: correct but several times slower. Said once per process and cause.
_SLOW_PATH_WARNED: set = set()


def _warn_if_slow_path(op: str, **operands) -> None:
    reasons = []
    for name, t in operands.items():
        if t is None:
            continue
        if t.data_ptr() % 16:
            reasons.append(f"{name} is not 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16})")
        if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) % 16:
            reasons.append(f"{name} has a row stride of {t.stride(0)} elements, not a multiple of 16")
    if not reasons or (op, tuple(reasons)) in _SLOW_PATH_WARNED:
        return
    _SLOW_PATH_WARNED.add((op, tuple(reasons)))
    warnings.warn(
        f"{op} (Triton): {'; '.join(reasons)}, so the routed GEMM takes Triton's slow path (scalar loads "
        "instead of 16-byte cp.async). Pad in_features / out_features to multiples of 16 and pass "
        "aligned tensors for full speed. (Warned once per cause.)", stacklevel=3)


# ----------------------------------------------------------------------------- stacked weights
# The stacked-weight kernel (routed_mm_tma_kernel) reads both weights through ONE 3-D TMA descriptor
# over [2, N, K]; it runs when the two weights ARE that tensor's halves (ModalityLinear allocates
# them so). Tests and benchmarks set this to False to run the pointer kernel (routed_mm_kernel) on
# the same inputs.
USE_STACKED_TMA = True


def _tma_capable(device: torch.device, dtype: torch.dtype) -> bool:
    """sm_90+ in 16-bit dtypes: what the static tier compiled (fp32, a test dtype that cannot use
    wgmma with exact products, keeps the pointer kernel on a GPU; the interpreter runs it too)."""
    if K_.INTERPRET:
        return True
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_qkv_ok(qkv) -> bool:
    """The stacked kernel's RoPE epilogue holds whole heads per tile: the head dim must be a power
    of two dividing every config's BLOCK_N (without RoPE any head dim works)."""
    if qkv is None or qkv[2] is None:
        return True
    head_dim = qkv[6]
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and K_.TMA_ROPE_BLOCK_N % head_dim == 0


def uses_stacked_kernel(a: torch.Tensor, w_t: torch.Tensor, w_i: torch.Tensor, qkv=None) -> bool:
    """Whether a GEMM on these operands takes the one-descriptor kernel (tests and docs ask this)."""
    return (USE_STACKED_TMA and a.dtype == w_t.dtype and _tma_capable(a.device, a.dtype)
            and stacked_base(w_t, w_i) is not None and _tma_qkv_ok(qkv))


# ----------------------------------------------------------------------------- launchers
def _launch_mm(a, w_t, w_i, b_t, b_i, table, out, *, transpose_b: bool, qkv=None):
    """out = A @ B_mod^T (+ bias); B given as [N_b, K_b] weights read directly or transposed."""
    # the kernels read bias[n] at bias_ptr + n: a strided 1-D view (e.g. a column of a stacked
    # [N, 2] bias) must be compacted first (a no-op for the usual contiguous parameter)
    b_t = b_t.contiguous() if b_t is not None else None
    b_i = b_i.contiguous() if b_i is not None else None
    _warn_if_slow_path("modality_qkv" if qkv is not None else "modality_linear",
                       **({"dy": a} if transpose_b else {"x": a}), weight_text=w_t, weight_image=w_i,
                       out=out if qkv is None else None)
    if uses_stacked_kernel(a, w_t, w_i, qkv):
        return _launch_mm_stacked(a, stacked_base(w_t, w_i), b_t, b_i, table, out, transpose_b=transpose_b, qkv=qkv)
    M = a.shape[0]
    if transpose_b:  # dX = dY @ W: the output width is W's column count
        N, Kr = w_t.shape[1], w_t.shape[0]
        stride_bn, stride_bk = 1, w_t.stride(0)
    else:
        N, Kr = w_t.shape[0], w_t.shape[1]
        stride_bn, stride_bk = w_t.stride(0), 1
    n_slots = K_.slots_for(M)
    has_bias = b_t is not None or b_i is not None
    dummy = w_t
    if qkv is None:
        k_out = v_out = out
        cos = sin = dummy
        head_dim, num_heads, num_kv_heads, cos_rows, rope = 1, 1, 1, 1, False
        qkv_mode = False
        stride_om = out.stride(0)
    else:
        k_out, v_out, cos, sin, num_heads, num_kv_heads, head_dim, cos_rows = qkv
        rope = cos is not None
        if not rope:
            cos = sin = dummy
            cos_rows = 1
        qkv_mode = True
        stride_om = 0

    def grid(meta):  # must match the kernel's n_col_tiles / tiles_per_head
        if qkv_mode:
            bn = meta["BLOCK_N"]
            per_head = cdiv(head_dim // 2, bn // 2) if rope else cdiv(head_dim, bn)
            col_tiles = (num_heads + 2 * num_kv_heads) * per_head
        else:
            col_tiles = cdiv(N, meta["BLOCK_N"])
        return (n_slots * col_tiles,)

    with _on_device(a):
        K_.routed_mm_kernel[grid](
            a, w_t, w_i, b_t if b_t is not None else dummy, b_i if b_i is not None else dummy, table,
            out, k_out, v_out, cos, sin,
            M, N, Kr, a.stride(0), stride_bn, stride_bk, stride_om,
            n_slots, num_heads, num_kv_heads, cos_rows,
            int(b_t is not None), int(b_i is not None),
            HEAD_DIM=head_dim, QKV=qkv_mode, ROPE=rope, HAS_BIAS=has_bias, UPCAST=_upcast(a.dtype),
            DOT_PRECISION=_dot_precision(a.dtype), BLOCK_M=K_.TILE_M,
        )


def _launch_mm_stacked(a, w_stack, b_t, b_i, table, out, *, transpose_b: bool, qkv=None):
    """The one-descriptor kernel: B = w_stack [2, N_w, K_w] behind one 3-D TMA descriptor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M = a.shape[0]
    _, n_w, k_w = w_stack.shape
    N, Kr = (k_w, n_w) if transpose_b else (n_w, k_w)
    n_slots = K_.slots_for(M)
    has_bias = b_t is not None or b_i is not None
    dummy = a
    # block shape set per config by the autotuner's pre-hook (_set_tma_block)
    desc = TensorDescriptor(w_stack, list(w_stack.shape), list(w_stack.stride()), [1, 16, 16])
    if qkv is None:
        k_out = v_out = out
        cos = sin = dummy
        head_dim, num_heads, num_kv_heads, cos_rows, rope, qkv_mode = 1, 1, 1, 1, False, False
        stride_om = out.stride(0)
    else:
        k_out, v_out, cos, sin, num_heads, num_kv_heads, head_dim, cos_rows = qkv
        rope = cos is not None
        if not rope:
            cos = sin = dummy
            cos_rows = 1
        qkv_mode = True
        stride_om = 0

    def grid(meta):  # must match the kernel's n_col_tiles
        return (n_slots * cdiv(N, meta["BLOCK_N"]),)

    with _on_device(a):
        K_.routed_mm_tma_kernel[grid](
            a, desc, b_t if b_t is not None else dummy, b_i if b_i is not None else dummy, table,
            out, k_out, v_out, cos, sin,
            M, N, Kr, a.stride(0), stride_om,
            n_slots, num_heads, num_kv_heads, cos_rows,
            int(b_t is not None), int(b_i is not None),
            HEAD_DIM=head_dim, QKV=qkv_mode, ROPE=rope, HAS_BIAS=has_bias, TRANS_B=transpose_b,
            UPCAST=_upcast(a.dtype), DOT_PRECISION=_dot_precision(a.dtype), BLOCK_M=K_.TILE_M,
        )


# Tests set this to fill every buffer the kernels must overwrite with NaN, so that an element a
# kernel forgets to write shows up instead of passing with whatever memory held.
POISON_OUTPUTS = False


def _new(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    out = like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _empty_like_rows(x2d: torch.Tensor, n: int) -> torch.Tensor:
    return _new(x2d, (x2d.shape[0], n))


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("llavit::ml_token_order", mutates_args=())
def ml_token_order(is_image: torch.Tensor) -> torch.Tensor:
    if is_image.numel() == 0:
        return torch.zeros(K_.order_table_size(0), dtype=torch.int32, device=is_image.device)
    with _on_device(is_image):
        return K_.build_order(is_image.reshape(-1))


@ml_token_order.register_fake
def _(is_image):
    return is_image.new_empty((K_.order_table_size(is_image.numel()),), dtype=torch.int32)


@torch.library.custom_op("llavit::ml_linear", mutates_args=())
def ml_linear(x: torch.Tensor, table: torch.Tensor, w_t: torch.Tensor, b_t: Optional[torch.Tensor],
              w_i: torch.Tensor, b_i: Optional[torch.Tensor]) -> torch.Tensor:
    out = _empty_like_rows(x, w_t.shape[0])
    if x.shape[0] == 0 or out.shape[1] == 0:
        return out.zero_()
    _launch_mm(x.contiguous(), w_t.contiguous(), w_i.contiguous(), b_t, b_i, table, out, transpose_b=False)
    return out


@ml_linear.register_fake
def _(x, table, w_t, b_t, w_i, b_i):
    return x.new_empty((x.shape[0], w_t.shape[0]))


@torch.library.custom_op("llavit::ml_linear_dx", mutates_args=())
def ml_linear_dx(dy: torch.Tensor, table: torch.Tensor, w_t: torch.Tensor, w_i: torch.Tensor) -> torch.Tensor:
    dx = _new(dy, (dy.shape[0], w_t.shape[1]))
    if dy.shape[0] == 0 or dx.shape[1] == 0:
        return dx.zero_()
    if dy.shape[1] == 0:
        return dx.zero_()
    _launch_mm(dy.contiguous(), w_t.contiguous(), w_i.contiguous(), None, None, table, dx, transpose_b=True)
    return dx


@ml_linear_dx.register_fake
def _(dy, table, w_t, w_i):
    return dy.new_empty((dy.shape[0], w_t.shape[1]))


@torch.library.custom_op("llavit::ml_linear_dw", mutates_args=())
def ml_linear_dw(dy: torch.Tensor, x: torch.Tensor, table: torch.Tensor) -> List[torch.Tensor]:
    M, N = dy.shape
    Kd = x.shape[1]
    dtype = dy.dtype
    if M == 0 or N == 0 or Kd == 0:
        z = dy.new_zeros((N, Kd))
        zb = dy.new_zeros((N,))
        return [z, z.clone(), zb, zb.clone()]
    dy = dy.contiguous()
    x = x.contiguous()
    split = _dw_split(M, N, Kd, dy.device)
    if split == 1:
        dw_t = _new(dy, (N, Kd))
        dw_i = _new(dy, (N, Kd))
    else:
        dw_t = _new(dy, (split, N, Kd), torch.float32)
        dw_i = _new(dy, (split, N, Kd), torch.float32)
    db_split = _db_split(M, N, dy.device)
    # one split: the kernels write the final dW / db in the weights' dtype; else float32 partials
    db_t = _new(dy, (N,)) if db_split == 1 else _new(dy, (db_split, N), torch.float32)
    db_i = _new(dy, (N,)) if db_split == 1 else _new(dy, (db_split, N), torch.float32)

    def grid(meta):
        return (cdiv(N, meta["BLOCK_N"]) * cdiv(Kd, meta["BLOCK_K"]), 2 * split)

    with _on_device(dy):
        K_.routed_dw_kernel[grid](
            dy, x, table, dw_t, dw_i, M, N, Kd,
            SPLIT=split, UPCAST=_upcast(dtype), DOT_PRECISION=_dot_precision(dtype), BLOCK_M=K_.TILE_M,
        )
        block_n = K_.DB_BLOCK_N_INTERPRET if K_.INTERPRET else K_.DB_BLOCK_N
        K_.routed_db_kernel[(cdiv(N, block_n), 2 * db_split)](
            dy, table, db_t, db_i, M, N, SPLIT=db_split, BLOCK_M=K_.TILE_M, BLOCK_N=block_n, num_warps=K_.DB_NUM_WARPS,
        )
    if split > 1:  # fixed-order sum over the splits: deterministic
        dw_t, dw_i = dw_t.sum(0).to(dtype), dw_i.sum(0).to(dtype)
    if db_split > 1:
        db_t, db_i = db_t.sum(0).to(dtype), db_i.sum(0).to(dtype)
    return [dw_t, dw_i, db_t, db_i]


@ml_linear_dw.register_fake
def _(dy, x, table):
    N, Kd = dy.shape[1], x.shape[1]
    return [dy.new_empty((N, Kd)), dy.new_empty((N, Kd)), dy.new_empty((N,)), dy.new_empty((N,))]


@torch.library.custom_op("llavit::ml_qkv", mutates_args=())
def ml_qkv(x: torch.Tensor, table: torch.Tensor, w_t: torch.Tensor, b_t: Optional[torch.Tensor],
           w_i: torch.Tensor, b_i: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
           num_heads: int, num_kv_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M = x.shape[0]
    head_dim = w_t.shape[0] // (num_heads + 2 * num_kv_heads)
    q = _new(x, (M, num_heads, head_dim))
    k = _new(x, (M, num_kv_heads, head_dim))
    v = _new(x, (M, num_kv_heads, head_dim))
    if M == 0 or head_dim == 0:
        return q.zero_(), k.zero_(), v.zero_()
    cos_rows = 1
    if cos is not None:
        cos = cos.reshape(-1, head_dim).contiguous()
        sin = sin.reshape(-1, head_dim).contiguous()
        cos_rows = cos.shape[0]
    _launch_mm(x.contiguous(), w_t.contiguous(), w_i.contiguous(), b_t, b_i, table, q, transpose_b=False,
               qkv=(k, v, cos, sin, num_heads, num_kv_heads, head_dim, cos_rows))
    return q, k, v


@ml_qkv.register_fake
def _(x, table, w_t, b_t, w_i, b_i, cos, sin, num_heads, num_kv_heads):
    M = x.shape[0]
    head_dim = w_t.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.new_empty((M, num_heads, head_dim)), x.new_empty((M, num_kv_heads, head_dim)),
            x.new_empty((M, num_kv_heads, head_dim)))


@torch.library.custom_op("llavit::ml_qkv_grad", mutates_args=())
def ml_qkv_grad(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: Optional[torch.Tensor],
                sin: Optional[torch.Tensor], num_heads: int, num_kv_heads: int) -> torch.Tensor:
    M, _, head_dim = dq.shape
    n_total = (num_heads + 2 * num_kv_heads) * head_dim
    dy = _new(dq, (M, n_total))
    if M == 0 or head_dim == 0:
        return dy.zero_()
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    rope = cos is not None
    if rope:
        cos = cos.reshape(-1, head_dim).contiguous()
        sin = sin.reshape(-1, head_dim).contiguous()
        cos_rows = cos.shape[0]
        block_d = max(_next_pow2(head_dim // 2), 1)
    else:
        cos = sin = dq
        cos_rows = 1
        block_d = _next_pow2(head_dim)
    block_m = 16 if K_.INTERPRET else 32
    grid = (cdiv(M, block_m), num_heads + 2 * num_kv_heads)
    with _on_device(dq):
        K_.qkv_grad_kernel[grid](dq, dk, dv, cos, sin, dy, M, num_heads, num_kv_heads, cos_rows,
                                 HEAD_DIM=head_dim, ROPE=rope, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return dy


@ml_qkv_grad.register_fake
def _(dq, dk, dv, cos, sin, num_heads, num_kv_heads):
    head_dim = dq.shape[2]
    return dq.new_empty((dq.shape[0], (num_heads + 2 * num_kv_heads) * head_dim))


# ----------------------------------------------------------------------------- autograd
def _linear_backward_core(ctx, dy):
    x, table, w_t, w_i = ctx.saved_tensors
    need_x, _, need_wt, need_bt, need_wi, need_bi = ctx.needs_input_grad[:6]
    dx = dw_t = db_t = dw_i = db_i = None
    if need_x:
        dx = ml_linear_dx(dy, table, w_t, w_i)
    if need_wt or need_bt or need_wi or need_bi:
        dw_t_, dw_i_, db_t_, db_i_ = ml_linear_dw(dy, x, table)
        dw_t = dw_t_ if need_wt else None
        dw_i = dw_i_ if need_wi else None
        db_t = db_t_ if (need_bt and ctx.has_bt) else None
        db_i = db_i_ if (need_bi and ctx.has_bi) else None
    return dx, dw_t, db_t, dw_i, db_i


def _linear_setup(ctx, inputs, output):
    x, table, w_t, b_t, w_i, b_i = inputs
    ctx.save_for_backward(x, table, w_t, w_i)
    ctx.has_bt = b_t is not None
    ctx.has_bi = b_i is not None


def _linear_backward(ctx, dy):
    dx, dw_t, db_t, dw_i, db_i = _linear_backward_core(ctx, dy)
    return dx, None, dw_t, db_t, dw_i, db_i


ml_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _qkv_setup(ctx, inputs, output):
    x, table, w_t, b_t, w_i, b_i, cos, sin, num_heads, num_kv_heads = inputs
    ctx.save_for_backward(x, table, w_t, w_i, cos, sin)
    ctx.has_bt = b_t is not None
    ctx.has_bi = b_i is not None
    ctx.heads = (num_heads, num_kv_heads)


def _qkv_backward(ctx, dq, dk, dv):
    x, table, w_t, w_i, cos, sin = ctx.saved_tensors
    num_heads, num_kv_heads = ctx.heads
    dq = dq if dq is not None else torch.zeros((x.shape[0], num_heads, w_t.shape[0] // (num_heads + 2 * num_kv_heads)),
                                               dtype=x.dtype, device=x.device)
    head_dim = dq.shape[-1]
    if dk is None:
        dk = x.new_zeros((x.shape[0], num_kv_heads, head_dim))
    if dv is None:
        dv = x.new_zeros((x.shape[0], num_kv_heads, head_dim))
    dy = ml_qkv_grad(dq, dk, dv, cos, sin, num_heads, num_kv_heads)

    class _Ctx:  # reuse the linear backward with the saved tensors of this op
        saved_tensors = (x, table, w_t, w_i)
        needs_input_grad = ctx.needs_input_grad[:6]
        has_bt = ctx.has_bt
        has_bi = ctx.has_bi

    dx, dw_t, db_t, dw_i, db_i = _linear_backward_core(_Ctx, dy)
    return dx, None, dw_t, db_t, dw_i, db_i, None, None, None, None


ml_qkv.register_autograd(_qkv_backward, setup_context=_qkv_setup)


# ----------------------------------------------------------------------------- entry points
def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"x: backend='triton' of {op} supports float16, bfloat16 and float32, got "
            f"{str(x.dtype).replace('torch.', '')} (use backend='reference')"
        )


def routing_table(is_image: torch.Tensor) -> torch.Tensor:
    """The token order of a layout's ``is_image`` (one per batch: the front door caches it on the layout)."""
    return ml_token_order(is_image.reshape(-1))


def modality_linear_triton(x, is_image, weight_text, bias_text, weight_image, bias_image, table=None):
    _check_dtype(x, "modality_linear")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if table is None:
        table = routing_table(is_image)
    y = ml_linear(x2d, table, weight_text, bias_text, weight_image, bias_image)
    return y.view(*lead, weight_text.shape[0])


def modality_qkv_triton(x, is_image, weight_text, bias_text, weight_image, bias_image,
                        num_heads, num_kv_heads, cos=None, sin=None, table=None):
    _check_dtype(x, "modality_qkv")
    lead = x.shape[:-1]
    head_dim = weight_text.shape[0] // (num_heads + 2 * num_kv_heads)
    if cos is not None:
        if head_dim % 2 != 0:
            raise ValueError(f"cos, sin: rotary embeddings need an even head dim, got {head_dim}")
        # [T, D] tables broadcast over the batch: the kernel indexes them by token % T
        cos = cos.detach()
        sin = sin.detach()
    x2d = x.reshape(-1, x.shape[-1])
    if table is None:
        table = routing_table(is_image)
    q, k, v = ml_qkv(x2d, table, weight_text, bias_text, weight_image, bias_image, cos, sin,
                     num_heads, num_kv_heads)
    return (q.view(*lead, num_heads, head_dim), k.view(*lead, num_kv_heads, head_dim),
            v.view(*lead, num_kv_heads, head_dim))

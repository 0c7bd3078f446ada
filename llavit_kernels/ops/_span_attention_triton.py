"""Triton span attention: custom ops (``llavit::span_attention_fwd`` / ``_bwd``) and autograd.

The ops are registered with ``torch.library.custom_op`` and ``register_fake`` and tied together with
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through forward and backward and
CUDA-graph capture works: grid sizes come from shapes only; the launch path never reads tensor
values (no ``.item()``, ``.tolist()``, ``nonzero()``). Kernels live in ``_span_attention_kernels``.

Every launch uses the config pinned per (GPU arch, dtype, head dim) in ``_span_attention_kernels``
(no timing-based autotuning: two processes run the same tiles, so results are bitwise equal), runs
on the tensors' device (not the current one), and compiles once per such key: nothing is
specialised on the sequence length. The first call per key compiles; warm up once before capturing
a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
import triton

from ..layout import SpanLayout
from . import _span_attention_kernels as K
from ._span_attention_op import lse_shape as _lse_shape
from ._span_attention_op import register_fake_and_autograd

__all__ = [
    "span_attention_triton",
    "span_attention_triton_with_lse",
    "span_attention_fwd",
    "span_attention_bwd",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "check_triton_inputs",
]

from .span_attention import TRITON_DTYPES as SUPPORTED_DTYPES  # noqa: E402  (one source of truth)
from .span_attention import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS  # noqa: E402


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor) -> None:
    """Checks specific to the Triton kernels (the reference accepts any head dim and dtype)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"q: backend='triton' supports dtypes float16, bfloat16 and float32, got {str(q.dtype).replace('torch.', '')}"
            " (use backend='reference' for other dtypes)"
        )
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"q: backend='triton' supports head dims {SUPPORTED_HEAD_DIMS}, got {head_dim} "
            "(use backend='reference' for other head dims)"
        )


# ----------------------------------------------------------------------------- launch helpers
# Tests set this to True: outputs are then allocated full of NaN instead of uninitialised, so an
# element a kernel forgets to write shows up as NaN.
POISON_OUTPUTS = False


def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _as4d(t: torch.Tensor) -> torch.Tensor:
    """Packed [N, H, D] is batch 1 of [B, T, H, D]: the intervals keep documents apart."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _as2d(t: torch.Tensor) -> torch.Tensor:
    return (t.unsqueeze(0) if t.dim() == 1 else t).contiguous()


def _lse_as3d(lse: torch.Tensor) -> torch.Tensor:
    return lse.unsqueeze(0) if lse.dim() == 2 else lse


_INT32_LIMIT = 2**31


def _check_row_offsets_fit_int32(**tensors: torch.Tensor) -> None:
    """The kernels widen only the batch offset to int64; offsets inside one batch row (token x
    stride + head x stride + d) are int32 products. Raise instead of wrapping around (shape-only,
    no sync). Padded S2 (8192 x 28 x 128) uses 1.4% of the range; packed 7B-shaped inputs reach it
    at ~599k tokens."""
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        reach = sum((t.shape[i] - 1) * abs(t.stride(i)) for i in range(1, t.dim()))
        if reach >= _INT32_LIMIT:
            raise ValueError(
                f"{name}: backend='triton' needs offsets within one batch row below 2**31 elements "
                f"(tokens x heads x head dim), got shape {tuple(t.shape)} with strides {t.stride()} "
                "(split the packed batch into rows, or use backend='reference')"
            )


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=None)
def _arch(device_type: str, index: Optional[int]) -> int:
    """Compute capability as 10 * major + minor (90 for H100/H200); 90 off CUDA (the interpreter
    ignores configs' arch-specific parts)."""
    if device_type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _launch_guard(device: torch.device):
    """Kernels launch on the current CUDA device and stream; make that the tensors' device (a model
    split over GPUs calls us with tensors that are not on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(kernel, grid, args, config=None, **constexprs):
    """One kernel launch; ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) or None."""
    if config is not None:
        block_m, block_n, warps, stages = config
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    kernel[grid](*args, **constexprs)


def _meta(q: torch.Tensor, k: torch.Tensor):
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    groups = q.shape[-2] // k.shape[-2]
    upcast = K.INTERPRETING and q.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 tests want true fp32 dots
    return dict(groups=groups, HEAD_DIM=head_dim, BLOCK_D=block_d, UPCAST=upcast, DOT_PRECISION=precision)


def _config(kind: str, q: torch.Tensor):
    """The pinned (BLOCK_M, BLOCK_N, num_warps, num_stages) for this kernel, dtype, head dim, GPU."""
    arch = _arch(q.device.type, q.device.index)
    return K.pinned_config(kind, _DTYPE_NAMES[q.dtype], q.shape[-1], arch)


def _forward_impl(q, k, v, kv_start, kv_end, softmax_scale):
    with _launch_guard(q.device):
        return _forward_launch(q, k, v, kv_start, kv_end, softmax_scale)


def _forward_launch(q, k, v, kv_start, kv_end, softmax_scale):
    out = _new_output(q.shape, q.dtype, q.device)
    lse = _new_output(_lse_shape(q), torch.float32, q.device)
    q4, k4, v4, o4 = (_last_dim_contiguous(_as4d(t)) for t in (q, k, v, out))
    kv_start2, kv_end2 = _as2d(kv_start), _as2d(kv_end)
    lse3 = _lse_as3d(lse)
    batch, tq, heads, _ = q4.shape
    tk = k4.shape[1]
    if q4.numel() == 0:
        return out, lse
    _check_row_offsets_fit_int32(q=q4, k=k4, v=v4, out=o4)
    config = _config("fwd", q)
    _launch(
        K._span_fwd_kernel, (batch * heads, triton.cdiv(tq, config[0])),
        (
            q4, k4, v4, o4, lse3, kv_start2, kv_end2,
            q4.stride(0), q4.stride(1), q4.stride(2),
            k4.stride(0), k4.stride(1), k4.stride(2),
            v4.stride(0), v4.stride(1), v4.stride(2),
            o4.stride(0), o4.stride(1), o4.stride(2),
            kv_start2.stride(0), lse3.stride(0), lse3.stride(1),
            heads, tq, tk, float(softmax_scale),
        ),
        config, **_meta(q, k),
    )
    return out, lse


def _backward_impl(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale):
    with _launch_guard(q.device):
        return _backward_launch(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale)


def _backward_launch(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale):
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = (
        _last_dim_contiguous(_as4d(t)) for t in (q, k, v, out, grad_out, dq, dk, dv)
    )
    kv_start2, kv_end2, q_start2, q_end2 = (_as2d(t) for t in (kv_start, kv_end, q_start, q_end))
    _check_row_offsets_fit_int32(q=q4, k=k4, v=v4, out=o4, grad_out=do4, dq=dq4, dk=dk4, dv=dv4)
    lse3 = _lse_as3d(lse).contiguous()
    batch, tq, heads, _ = q4.shape
    tk, kv_heads = k4.shape[1], k4.shape[2]
    meta = _meta(q, k)

    delta = _new_output(lse3.shape, torch.float32, lse3.device)
    dlse3 = _lse_as3d(grad_lse).contiguous() if grad_lse is not None else delta  # dummy pointer when absent
    _launch(
        K._span_bwd_pre_kernel, (batch * heads, triton.cdiv(tq, K.PRE_BLOCK_M)),
        (
            o4, do4, dlse3, delta,
            o4.stride(0), o4.stride(1), o4.stride(2),
            do4.stride(0), do4.stride(1), do4.stride(2),
            lse3.stride(0), lse3.stride(1),
            heads, tq,
        ),
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], HAS_DLSE=grad_lse is not None, BLOCK_M=K.PRE_BLOCK_M,
    )
    config = _config("dq", q)
    _launch(
        K._span_bwd_dq_kernel, (batch * heads, triton.cdiv(tq, config[0])),
        (
            q4, k4, v4, do4, lse3, delta, dq4, kv_start2, kv_end2,
            q4.stride(0), q4.stride(1), q4.stride(2),
            k4.stride(0), k4.stride(1), k4.stride(2),
            v4.stride(0), v4.stride(1), v4.stride(2),
            do4.stride(0), do4.stride(1), do4.stride(2),
            dq4.stride(0), dq4.stride(1), dq4.stride(2),
            kv_start2.stride(0), lse3.stride(0), lse3.stride(1),
            heads, tq, tk, float(softmax_scale),
        ),
        config, **meta,
    )
    config = _config("dkdv", q)
    _launch(
        K._span_bwd_dkdv_kernel, (batch * kv_heads, triton.cdiv(tk, config[1])),
        (
            q4, k4, v4, do4, lse3, delta, dk4, dv4, kv_start2, kv_end2, q_start2, q_end2,
            q4.stride(0), q4.stride(1), q4.stride(2),
            k4.stride(0), k4.stride(1), k4.stride(2),
            v4.stride(0), v4.stride(1), v4.stride(2),
            do4.stride(0), do4.stride(1), do4.stride(2),
            dk4.stride(0), dk4.stride(1), dk4.stride(2),
            dv4.stride(0), dv4.stride(1), dv4.stride(2),
            kv_start2.stride(0), q_start2.stride(0), lse3.stride(0), lse3.stride(1),
            kv_heads, tq, tk, float(softmax_scale),
        ),
        config, **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("llavit::span_attention_fwd", mutates_args=())
def span_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    q_start: torch.Tensor,
    q_end: torch.Tensor,
    softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). ``q_start``/``q_end`` are unused here but saved for the backward.

    lse is fp32 in natural-log units, ``[B, H, Tq]`` (padded) or ``[H, N]`` (packed), ``+inf`` on
    query rows without keys (whose output is 0).
    """
    return _forward_impl(q, k, v, kv_start, kv_end, softmax_scale)


@torch.library.custom_op("llavit::span_attention_bwd", mutates_args=())
def span_attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    q_start: torch.Tensor,
    q_end: torch.Tensor,
    softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); deterministic (no atomics). ``grad_lse`` may be None."""
    return _backward_impl(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale)


# Fake kernels and the autograd formula are shared with the C++ backend (one definition).
register_fake_and_autograd("llavit::span_attention_fwd", "llavit::span_attention_bwd", span_attention_bwd)


# ----------------------------------------------------------------------------- public (private-module) API
def span_attention_triton_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SpanLayout, softmax_scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp (see ``span_attention_fwd``); inputs validated by ``span_attention``."""
    check_triton_inputs(q, k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return span_attention_fwd(q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, scale)


def span_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SpanLayout, softmax_scale: Optional[float] = None
) -> torch.Tensor:
    return span_attention_triton_with_lse(q, k, v, layout, softmax_scale)[0]

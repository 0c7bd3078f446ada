"""Backend-neutral pieces of the span-attention custom ops: shapes, fake kernels and autograd.

A backend registers a forward op ``(q, k, v, kv_start, kv_end, q_start, q_end, softmax_scale) ->
(out, lse)`` and a backward op ``(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end,
q_start, q_end, softmax_scale) -> (dq, dk, dv)`` with the same contract (see
``_span_attention_triton.span_attention_fwd``), and ties them together with
:func:`register_fake_and_autograd`. No torch.compile-unfriendly code here: shapes only.
"""

from __future__ import annotations

import torch

__all__ = ["FWD_SCHEMA", "BWD_SCHEMA", "lse_shape", "register_fake_and_autograd"]

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_end, Tensor q_start, Tensor q_end, "
    "float softmax_scale) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor kv_start, Tensor kv_end, Tensor q_start, Tensor q_end, float softmax_scale) "
    "-> (Tensor, Tensor, Tensor)"
)


def lse_shape(q: torch.Tensor):
    """[B, H, Tq] for padded q [B, Tq, H, D]; [H, N] for packed q [N, H, D]."""
    if q.dim() == 3:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def register_fake_and_autograd(fwd_name: str, bwd_name: str, bwd_op) -> None:
    """Fake kernels for both ops and the autograd formula of the forward (its backward op)."""

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(q, k, v, kv_start, kv_end, q_start, q_end, softmax_scale):
        return q.new_empty(q.shape), q.new_empty(lse_shape(q), dtype=torch.float32)

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, kv_start, kv_end, q_start, q_end, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end, q_start, q_end)
        ctx.softmax_scale = softmax_scale

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kv_start, kv_end, q_start, q_end = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd(fwd_name, _backward, setup_context=_setup_context)

"""span_attention: attention that is bidirectional inside each image span and causal elsewhere.

The mask comes from a :class:`~llavit_kernels.layout.SpanLayout` (one key interval per query). The
reference here is pure torch, runs on any device and is the ground truth the Triton kernels are
tested against.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .._checks import check_tensor
from ..layout import SpanLayout
from ._backend import BACKENDS, resolve_backend

__all__ = ["span_attention", "span_attention_reference"]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the Triton kernels cover; backend=None sends anything else to the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (64, 80, 96, 128)


def _validate(q, k, v, layout, softmax_scale):
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout: expected a SpanLayout, got {type(layout).__name__}")
    packed = layout.packed
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=ATTENTION_DTYPES, ndims=(ndim,), device=layout.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    if tuple(q.shape[:-2]) != layout.token_shape:
        what = "(N,) of the packed layout" if packed else "(B, Tq) of the layout"
        raise ValueError(f"q: expected leading dims {layout.token_shape} {what}, got shape {tuple(q.shape)}")
    key_shape = (layout.num_keys,) if packed else (layout.batch_size, layout.num_keys)
    if tuple(k.shape[:-2]) != key_shape:
        raise ValueError(f"k: expected leading dims {key_shape} (the layout's keys), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    heads, dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if k.shape[-1] != dim:
        raise ValueError(f"k: expected head dim {dim} (that of q), got {k.shape[-1]}")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"k: expected a number of KV heads that divides the {heads} query heads, got {kv_heads}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a positive float or None, got {softmax_scale!r}")


def span_attention_reference(q, k, v, layout: SpanLayout, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Dense-mask attention in pure torch (fp32 math for half inputs). O(T^2) memory."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = layout.dense_mask()
    if layout.packed:  # treat packed [N, H, D] as one batch row; the mask keeps documents apart
        q, k, v, mask = q[None], k[None], v[None], mask[None]
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    groups = q.shape[-2] // k.shape[-2]
    qh = q.transpose(1, 2).to(compute_dtype)  # [B, H, Tq, D]
    kh = k.transpose(1, 2).to(compute_dtype).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).to(compute_dtype).repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    mask = mask[:, None]  # [B, 1, Tq, Tk]
    has_key = mask.any(dim=-1, keepdim=True)
    # Rows without any key (padding) get finite scores so softmax and its gradient stay NaN-free.
    scores = torch.where(mask, scores, torch.where(has_key, float("-inf"), 0.0))
    probs = torch.softmax(scores, dim=-1) * has_key
    out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)
    return out[0] if layout.packed else out


_warned_fallback = set()


def _warn_fallback(q: torch.Tensor) -> None:
    key = (q.dtype, q.shape[-1])
    if key not in _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback.add(key)
        warnings.warn(
            f"span_attention: no Triton kernel for dtype {q.dtype} / head dim {q.shape[-1]}; using the reference "
            "(dense O(T^2) mask). Triton covers float16/bfloat16/float32 and head dims 64, 80, 96, 128.",
            stacklevel=3,
        )


# backend=None on CPU: (dtype, gradients needed) -> "cpp" (csrc/, when it builds) or "composed". The one
# place this choice is made, from same-run comparisons (batch 1, two 576-token images, 1 thread, time /
# causal SDPA; bench/results/cpu-20261202/):
# * final_0.5B / final_7B (the C++ block products on oneDNN's micro-kernels, T 1024-8192): cpp
#   0.48-0.61x in fp32 and 0.28-0.62x in bf16, forward and forward+backward, vs composed 1.01-1.22x.
# * cpu-default-choice* (before that, cpp on at::mm_out): fp16 cpp 0.68x fwd / 0.14x fwd+bwd vs composed
#   0.83x / 0.17x; bf16 forward cpp 1.01-1.32x vs composed 1.14-1.41x, but bf16 fwd+bwd composed
#   1.12-1.51x vs cpp 1.32-1.83x, with 3-4x less memory for composed. That is still the C++ kernel's
#   bf16 path where the bf16 micro-kernel does not run (no AVX-512), hence CPU_DEFAULT_BF16_CONVERTED.
CPU_DEFAULT = {
    (torch.float32, False): "cpp", (torch.float32, True): "cpp",
    (torch.float16, False): "cpp", (torch.float16, True): "cpp",
    (torch.bfloat16, False): "cpp", (torch.bfloat16, True): "cpp",
}
CPU_DEFAULT_BF16_CONVERTED = {(torch.bfloat16, True): "composed"}


def _cpu_default_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The engine ``backend=None`` runs on CPU (the C++ kernel falls back to composed if it cannot build)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = (q.dtype, needs_grad)
    if key in CPU_DEFAULT_BF16_CONVERTED:
        from . import _span_attention_cpp as cpp

        if not cpp.bf16_block_products():
            return CPU_DEFAULT_BF16_CONVERTED[key]
    return CPU_DEFAULT.get(key, "composed")  # float64: composed (cpu_flash covers it)


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SpanLayout,
    softmax_scale: Optional[float] = None,
    backend: Optional[str] = None,
    causal_engine: Optional[str] = None,
) -> torch.Tensor:
    """Attention under the LLaViT mask of ``layout``.

    Args:
        q: ``[B, Tq, H, D]`` (padded layout) or ``[N, H, D]`` (packed layout).
        k, v: ``[B, Tk, Hkv, D]`` or ``[N, Hkv, D]``; ``Hkv`` divides ``H`` (GQA / MQA); query head
            ``h`` reads KV head ``h // (H // Hkv)``.
        layout: the :class:`SpanLayout` of the batch (``Tk`` is ``layout.num_keys``).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``None`` (Triton on CUDA, with the reference for what the kernels do not cover:
            float64, head dims other than 64, 80, 96, 128; on CPU what ``CPU_DEFAULT`` says: the
            C++ kernel, except composed for float64, and for bf16 with gradients where the C++ kernel
            converts bf16 blocks to fp32 (CPUs without AVX-512)), ``"reference"``, ``"triton"`` (raises for
            inputs the kernels do not cover; see docs/span_attention.md), ``"composed"`` (a causal
            attention engine plus the image-span completion, merged by log-sum-exp; CPU and CUDA) or
            ``"cpp"`` (the C++ CPU kernel of csrc/, built on first use; fp32/fp16/bf16, any head dim;
            if it cannot be built or ``LLAVIT_NO_CPP=1``, warns once and uses the composed path).
        causal_engine: ``backend="composed"`` only: force its causal engine (``"cpu_flash"``,
            ``"flash_attn"``, ``"cudnn"``, ``"torch_flash"``); ``None`` picks the first that covers
            the call (see ``ops/_causal_engines.py``).

    Returns:
        a tensor of q's shape and dtype; query rows with no key (padding) are 0.
    """
    _validate(q, k, v, layout, softmax_scale)
    chosen = resolve_backend(backend, q.device, "span_attention", allowed=BACKENDS)
    if chosen == "cpu_default":  # a causal engine asked for means the composed path
        chosen = "composed" if causal_engine is not None else _cpu_default_backend(q, k, v)
    if causal_engine is not None and chosen != "composed":
        raise ValueError(f"causal_engine: only used by backend='composed', got backend={backend!r}")
    if chosen == "cpp":
        from . import _span_attention_cpp as cpp

        cpp.check_cpp_inputs(q)  # raises for float64
        if cpp.cpp_available():
            return cpp.span_attention_cpp(q, k, v, layout, softmax_scale)
        cpp.warn_unavailable()
        chosen = "composed"
    if chosen == "composed":
        from ._span_attention_composed import covers, span_attention_composed

        if backend in (None, "cpp") and covers(q, k, layout) is not None:
            return span_attention_reference(q, k, v, layout, softmax_scale)
        # Raises ValueError naming the reason when forced on a case it does not cover.
        return span_attention_composed(q, k, v, layout, softmax_scale, causal_engine)
    uncovered = q.dtype not in TRITON_DTYPES or q.shape[-1] not in TRITON_HEAD_DIMS
    if chosen == "reference" or (backend is None and uncovered):
        if chosen == "triton":  # backend=None on CUDA for an input the kernels do not cover
            _warn_fallback(q)
        return span_attention_reference(q, k, v, layout, softmax_scale)
    from ._span_attention_triton import span_attention_triton

    # Raises TypeError for float64 and ValueError for head dims outside (64, 80, 96, 128).
    return span_attention_triton(q, k, v, layout, softmax_scale)

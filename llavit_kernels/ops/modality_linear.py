"""modality_linear and modality_qkv: projections that pick text or image weights per token.

``y[t] = x[t] @ W_m(t)^T + b_m(t)`` with ``m(t)`` the token's modality (text or image). The
references here are pure torch, run on any device, and are the ground truth for the Triton kernels.

Paths: ``backend="triton"`` (CUDA, or the interpreter), ``backend="reference"`` (both GEMMs over
all tokens + ``torch.where``: the oracle), and, for ``backend=None`` off CUDA, the CPU path: one
GEMM per modality over its gathered rows (half the reference's FLOPs; it reads the token order,
a host-side fact that is free on CPU). The routing structure each path needs (the Triton tile
table, the CPU path's token order) is built once per batch and cached on the SpanLayout, so every
projection of every layer reuses it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ..layout import SpanLayout
from ._backend import resolve_backend

__all__ = [
    "modality_linear",
    "modality_linear_reference",
    "modality_linear_grouped",
    "modality_qkv",
    "modality_qkv_reference",
    "apply_rotary",
]

LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the kernels' dtypes (float64: reference)


def stacked_base(weight_text: torch.Tensor, weight_image: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``[2, N, K]`` view of the storage the two weights share when ``weight_image`` starts exactly
    where ``weight_text`` ends (both contiguous, 16-byte aligned start and rows: a TMA descriptor's
    rules), else None. Pointer arithmetic only (no sync). ``ModalityLinear`` allocates its weights
    so; the Triton backend then reads both through one TMA descriptor (docs/modality_linear.md)."""
    w_t, w_i = weight_text, weight_image
    if (w_t.dim() != 2 or w_t.shape != w_i.shape or w_t.dtype != w_i.dtype or w_t.device != w_i.device
            or not w_t.is_contiguous() or not w_i.is_contiguous() or w_t.numel() == 0):
        return None
    n, k = w_t.shape
    el = w_t.element_size()
    if w_i.data_ptr() - w_t.data_ptr() != n * k * el or w_t.data_ptr() % 16 or (k * el) % 16:
        return None
    if w_t.untyped_storage().data_ptr() != w_i.untyped_storage().data_ptr():
        return None
    return w_t.as_strided((2, n, k), (n * k, k, 1))


def _pick_backend(backend, x, op_name):
    """resolve_backend, except that the automatic choice keeps float64 on the reference and runs
    the per-modality GEMMs (``"grouped"``) on CPU (not under torch.compile: data-dependent shapes)."""
    chosen = resolve_backend(backend, x.device, op_name)
    if backend is None and chosen == "triton" and x.dtype not in TRITON_DTYPES:
        return "reference"
    if backend is None and chosen == "reference" and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return "grouped"
    return chosen


def _cacheable(is_image: torch.Tensor) -> bool:
    # Not while tracing (torch.compile) or capturing a CUDA graph: a capture must record the build
    # so that a replay follows a layout refilled in place, and a value made during a capture holds
    # nothing until replay.
    if torch.compiler.is_compiling():
        return False
    return not (is_image.is_cuda and torch.cuda.is_current_stream_capturing())


def _routing(layout, is_image: torch.Tensor, key: tuple, build):
    """``build()``, cached on the SpanLayout when there is one: once per batch, shared by all layers."""
    if isinstance(layout, SpanLayout) and _cacheable(is_image):
        # the version counter makes an in-place change of is_image rebuild instead of going stale
        # (inference tensors have none: such a layout is taken as immutable); a value made under
        # inference_mode cannot be saved for autograd later: its own entry
        version = -1 if is_image.is_inference() else is_image._version
        return layout.derived(key + (is_image.device, version, torch.is_inference_mode_enabled()), build)
    return build()


def modality_order(is_image: torch.Tensor):
    """Token order of the CPU path: (text rows, image rows, inverse) as int64 index vectors.

    ``torch.cat([text rows, image rows])`` sorts the flattened tokens by modality (stable);
    ``inverse`` maps the sorted rows back. Reads values (``nonzero``): a host sync on a GPU.
    """
    flat = is_image.reshape(-1)
    text_rows = (~flat).nonzero().squeeze(1)
    image_rows = flat.nonzero().squeeze(1)
    inverse = torch.empty(flat.numel(), dtype=torch.int64, device=flat.device)
    inverse[torch.cat([text_rows, image_rows])] = torch.arange(flat.numel(), device=flat.device)
    return text_rows, image_rows, inverse


def _mm_into(out, a, b_t, bias):
    """``out = a @ b_t (+ bias)`` written in place (``out`` a contiguous row slice)."""
    if bias is None:
        torch.mm(a, b_t, out=out)
    else:
        torch.addmm(bias, a, b_t, out=out)


class _GroupedLinear(torch.autograd.Function):
    """The CPU path as one autograd node: gathers, one GEMM per modality into a sorted buffer, and
    a backward made of gathers too (the rows are a permutation, so no scatter-add and no zero fill
    as index_select's generic backward would do)."""

    @staticmethod
    def forward(ctx, x2d, text_rows, image_rows, inverse, w_t, b_t, w_i, b_i):
        n_text = text_rows.numel()
        xs_t = x2d.index_select(0, text_rows)
        xs_i = x2d.index_select(0, image_rows)
        y_sorted = x2d.new_empty((x2d.shape[0], w_t.shape[0]))
        _mm_into(y_sorted[:n_text], xs_t, w_t.t(), b_t)
        _mm_into(y_sorted[n_text:], xs_i, w_i.t(), b_i)
        ctx.save_for_backward(xs_t, xs_i, text_rows, image_rows, inverse, w_t, w_i)
        ctx.has_bias = (b_t is not None, b_i is not None)
        return y_sorted.index_select(0, inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xs_t, xs_i, text_rows, image_rows, inverse, w_t, w_i = ctx.saved_tensors
        need_x, _, _, _, need_wt, need_bt, need_wi, need_bi = ctx.needs_input_grad
        n_text = text_rows.numel()
        gy_sorted = gy.index_select(0, torch.cat([text_rows, image_rows]))
        g_t, g_i = gy_sorted[:n_text], gy_sorted[n_text:]
        dx = dw_t = db_t = dw_i = db_i = None
        if need_x:
            dx_sorted = gy.new_empty((gy.shape[0], w_t.shape[1]))
            torch.mm(g_t, w_t, out=dx_sorted[:n_text])
            torch.mm(g_i, w_i, out=dx_sorted[n_text:])
            dx = dx_sorted.index_select(0, inverse)
        if need_wt:
            dw_t = g_t.t() @ xs_t
        if need_wi:
            dw_i = g_i.t() @ xs_i
        if need_bt and ctx.has_bias[0]:
            db_t = g_t.sum(0)
        if need_bi and ctx.has_bias[1]:
            db_i = g_i.sum(0)
        return dx, None, None, None, dw_t, db_t, dw_i, db_i


def modality_linear_grouped(x, is_image, weight_text, bias_text, weight_image, bias_image, order=None):
    """One GEMM per modality over its gathered rows, then the rows put back in token order.

    Same result and gradients as the reference (each GEMM runs even when its modality is empty, so
    both weights always get a gradient, zeros when unused) at half its FLOPs. No double backward.
    """
    text_rows, image_rows, inverse = order if order is not None else modality_order(is_image)
    x2d = x.reshape(-1, x.shape[-1])
    y = _GroupedLinear.apply(x2d, text_rows, image_rows, inverse, weight_text, bias_text, weight_image, bias_image)
    return y.view(*x.shape[:-1], weight_text.shape[0])


def _image_mask(layout: Union[SpanLayout, torch.Tensor]) -> torch.Tensor:
    if isinstance(layout, SpanLayout):
        return layout.is_image
    if isinstance(layout, torch.Tensor) and layout.dtype == torch.bool:
        return layout
    got = f"a {layout.dtype} tensor" if isinstance(layout, torch.Tensor) else type(layout).__name__
    raise TypeError(f"layout: expected a SpanLayout or a bool is_image tensor, got {got}")


def _validate_linear(x, is_image, weight_text, bias_text, weight_image, bias_image):
    check_tensor("x", x, dtypes=LINEAR_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor of shape [..., in_features], got shape {tuple(x.shape)}")
    if is_image.device != x.device:
        raise ValueError(f"layout: expected its tensors on {x.device} (the device of x), got {is_image.device}")
    if tuple(is_image.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"x: expected leading dims {tuple(is_image.shape)} (the layout's tokens), got shape {tuple(x.shape)}"
        )
    in_features = x.shape[-1]
    check_tensor("weight_text", weight_text, dtypes=(x.dtype,), ndims=(2,), device=x.device)
    check_tensor("weight_image", weight_image, dtypes=(x.dtype,), ndims=(2,), device=x.device)
    if weight_text.shape[1] != in_features:
        raise ValueError(
            f"weight_text: expected shape [out_features, {in_features}] (nn.Linear convention), got {tuple(weight_text.shape)}"
        )
    if weight_image.shape != weight_text.shape:
        raise ValueError(
            f"weight_image: expected the shape of weight_text {tuple(weight_text.shape)}, got {tuple(weight_image.shape)}"
        )
    out_features = weight_text.shape[0]
    for name, b in (("bias_text", bias_text), ("bias_image", bias_image)):
        if b is not None:
            check_tensor(name, b, dtypes=(x.dtype,), ndims=(1,), device=x.device)
            if b.shape[0] != out_features:
                raise ValueError(f"{name}: expected shape [{out_features}], got {tuple(b.shape)}")


def modality_linear_reference(x, is_image, weight_text, bias_text, weight_image, bias_image):
    """Both projections then a per-token select (twice the FLOPs; the ground truth)."""
    y_text = F.linear(x, weight_text, bias_text)
    y_image = F.linear(x, weight_image, bias_image)
    return torch.where(is_image[..., None], y_image, y_text)


def modality_linear(
    x: torch.Tensor,
    layout: Union[SpanLayout, torch.Tensor],
    weight_text: torch.Tensor,
    bias_text: Optional[torch.Tensor],
    weight_image: torch.Tensor,
    bias_image: Optional[torch.Tensor],
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear layer whose weight and bias are chosen per token by modality.

    Args:
        x: ``[..., in_features]`` whose leading dims equal the layout's token shape.
        layout: a :class:`SpanLayout` or a bool ``is_image`` tensor of x's leading shape.
        weight_text, weight_image: ``[out_features, in_features]`` (``nn.Linear`` convention).
        bias_text, bias_image: ``[out_features]`` or None.
        backend: ``None`` (Triton on CUDA; on CPU one GEMM per modality, or the reference under
            torch.compile), ``"reference"`` (both GEMMs + select: the oracle) or ``"triton"``.
    """
    is_image = _image_mask(layout)
    _validate_linear(x, is_image, weight_text, bias_text, weight_image, bias_image)
    chosen = _pick_backend(backend, x, "modality_linear")
    if chosen == "reference":
        return modality_linear_reference(x, is_image, weight_text, bias_text, weight_image, bias_image)
    if chosen == "grouped":
        order = _routing(layout, is_image, ("modality_order",), lambda: modality_order(is_image))
        return modality_linear_grouped(x, is_image, weight_text, bias_text, weight_image, bias_image, order)
    from ._modality_linear_triton import modality_linear_triton, routing_table

    table = _routing(layout, is_image, ("ml_token_order",), lambda: routing_table(is_image))
    return modality_linear_triton(x, is_image, weight_text, bias_text, weight_image, bias_image, table=table)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face rotate-half RoPE on ``x [..., T, H, D]`` with ``cos, sin`` of shape ``[..., T, D]``."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def _validate_qkv(x, is_image, weight_text, weight_image, num_heads, num_kv_heads, cos, sin):
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
    out_features = weight_text.shape[0]
    heads_total = num_heads + 2 * num_kv_heads
    if out_features % heads_total != 0:
        raise ValueError(
            f"weight_text: expected out_features divisible by num_heads + 2 * num_kv_heads = {heads_total} "
            f"(rows q | k | v), got {out_features}"
        )
    head_dim = out_features // heads_total
    if (cos is None) != (sin is None):
        raise ValueError("cos, sin: expected both or neither, got only one")
    if cos is not None:
        if head_dim % 2 != 0:
            raise ValueError(f"cos, sin: rotary embeddings need an even head dim, got head dim {head_dim}")
        lead = tuple(x.shape[:-1])
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(name, t, dtypes=LINEAR_DTYPES, device=x.device)
            if t.shape[-1] != head_dim or tuple(t.shape[:-1]) not in (lead, lead[-1:]):
                raise ValueError(
                    f"{name}: expected shape {lead + (head_dim,)} or {lead[-1:] + (head_dim,)}, got {tuple(t.shape)}"
                )
    return head_dim


def modality_qkv_reference(x, is_image, weight_text, bias_text, weight_image, bias_image,
                           num_heads, num_kv_heads, cos=None, sin=None):
    y = modality_linear_reference(x, is_image, weight_text, bias_text, weight_image, bias_image)
    return _split_heads(y, x.shape[:-1], weight_text, num_heads, num_kv_heads, cos, sin)


def _split_heads(y, lead, weight_text, num_heads, num_kv_heads, cos, sin):
    head_dim = weight_text.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = y.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(*lead, num_heads, head_dim)
    k = k.reshape(*lead, num_kv_heads, head_dim)
    v = v.reshape(*lead, num_kv_heads, head_dim)
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q.contiguous(), k.contiguous(), v.contiguous()


def modality_qkv(
    x: torch.Tensor,
    layout: Union[SpanLayout, torch.Tensor],
    weight_text: torch.Tensor,
    bias_text: Optional[torch.Tensor],
    weight_image: torch.Tensor,
    bias_image: Optional[torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused modality-routed QKV projection, returned in the attention layout.

    Args:
        x: hidden states ``[..., T, hidden]`` (``[B, T, hidden]`` or packed ``[N, hidden]``).
        weight_text, weight_image: fused ``[(H + 2 * Hkv) * D, hidden]`` weights, rows ordered
            q | k | v (``torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])``).
        bias_text, bias_image: ``[(H + 2 * Hkv) * D]`` or None.
        cos, sin: optional rotary tables ``[..., T, D]`` or ``[T, D]`` (Hugging Face rotate-half
            convention), applied to q and k.

    Returns:
        ``q [..., T, H, D]``, ``k [..., T, Hkv, D]``, ``v [..., T, Hkv, D]``, contiguous.
    """
    is_image = _image_mask(layout)
    _validate_linear(x, is_image, weight_text, bias_text, weight_image, bias_image)
    _validate_qkv(x, is_image, weight_text, weight_image, num_heads, num_kv_heads, cos, sin)
    chosen = _pick_backend(backend, x, "modality_qkv")
    if chosen == "reference":
        return modality_qkv_reference(x, is_image, weight_text, bias_text, weight_image, bias_image,
                                      num_heads, num_kv_heads, cos, sin)
    if chosen == "grouped":
        order = _routing(layout, is_image, ("modality_order",), lambda: modality_order(is_image))
        y = modality_linear_grouped(x, is_image, weight_text, bias_text, weight_image, bias_image, order)
        return _split_heads(y, x.shape[:-1], weight_text, num_heads, num_kv_heads, cos, sin)
    from ._modality_linear_triton import modality_qkv_triton, routing_table

    table = _routing(layout, is_image, ("ml_token_order",), lambda: routing_table(is_image))
    return modality_qkv_triton(x, is_image, weight_text, bias_text, weight_image, bias_image,
                               num_heads, num_kv_heads, cos, sin, table=table)

"""ModalityLinear: an nn.Linear with a second (image) weight set, picked per token."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..layout import SpanLayout
from ..ops import modality_linear
from ..ops.modality_linear import stacked_base

__all__ = ["ModalityLinear"]


class _StackedCast(torch.autograd.Function):
    """Both weights cast to ``dtype`` as two halves of ONE new ``[2, N, K]`` tensor (autocast), so
    the cast pair stays stacked for the one-descriptor kernel; one copy when the inputs are stacked."""

    @staticmethod
    def forward(ctx, weight, weight_image, dtype):
        ctx.dtypes = (weight.dtype, weight_image.dtype)
        base = stacked_base(weight, weight_image)
        out = base.to(dtype) if base is not None else torch.stack([weight.to(dtype), weight_image.to(dtype)])
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad, grad_image):
        return (None if grad is None else grad.to(ctx.dtypes[0]),
                None if grad_image is None else grad_image.to(ctx.dtypes[1]), None)


def _restack_after_load(module, incompatible_keys) -> None:
    module.stack_weights_()  # a no-op after an in-place load; re-stacks after load_state_dict(assign=True)


class ModalityLinear(nn.Module):
    """``y[t] = x[t] @ W_m(t)^T + b_m(t)`` with ``m(t)`` the modality of token ``t``.

    Parameters keep ``nn.Linear``'s names for the text side (``weight``, ``bias``), so a text
    checkpoint loads by name; the image side is ``weight_image`` / ``bias_image``.

    ``weight`` and ``weight_image`` (and the biases) are the two halves of ONE ``[2, out, in]``
    tensor, so the Triton backend reads both weights through one TMA descriptor (``stacked``).
    In-place updates (optimizers, ``load_state_dict``, ``copy_``) keep that; ``.to()`` / ``.half()`` /
    ``.cuda()``, ``copy.deepcopy``, unpickling and ``load_state_dict(assign=True)`` re-stack after
    converting. It is lost when a parameter is replaced (``module.weight = nn.Parameter(...)``) or
    flattened by a wrapper (FSDP): the op then takes the two-pointer kernel (correct, slower);
    ``stack_weights_()`` restores it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        weights = torch.empty(2, out_features, in_features, **factory)
        self.weight = nn.Parameter(weights[0])
        self.weight_image = nn.Parameter(weights[1])
        if bias:
            biases = torch.empty(2, out_features, **factory)
            self.bias = nn.Parameter(biases[0])
            self.bias_image = nn.Parameter(biases[1])
        else:
            self.register_parameter("bias", None)
            self.register_parameter("bias_image", None)
        self.reset_parameters()
        self.register_load_state_dict_post_hook(_restack_after_load)

    @property
    def stacked(self) -> bool:
        """Whether ``weight`` and ``weight_image`` are the halves of one ``[2, out, in]`` tensor."""
        return stacked_base(self.weight, self.weight_image) is not None

    @torch.no_grad()
    def stack_weights_(self) -> "ModalityLinear":
        """Make ``weight`` / ``weight_image`` (and the biases) the halves of one new tensor again
        (one copy; the Parameter objects, hence optimizer state, stay the same)."""
        pairs = [("weight", "weight_image")] + ([("bias", "bias_image")] if self.bias is not None else [])
        for text, image in pairs:
            t, i = getattr(self, text, None), getattr(self, image, None)
            if not isinstance(t, torch.Tensor) or not isinstance(i, torch.Tensor):
                continue
            if t.shape != i.shape or t.dtype != i.dtype or t.device != i.device or t.is_meta:
                continue
            if t.dim() == 2 and stacked_base(t, i) is not None:
                continue
            both = torch.stack([t.data, i.data])
            t.data, i.data = both[0], both[1]
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() convert each parameter alone (two new storages): re-stack after
        was_stacked = self.stacked
        out = super()._apply(fn, recurse)
        if was_stacked:
            self.stack_weights_()
        return out

    def __setstate__(self, state):
        # copy.deepcopy clones each parameter alone; unpickling keeps shared storage already
        super().__setstate__(state)
        self.stack_weights_()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the text weights; the image weights start as copies."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.init_image_from_text()

    @torch.no_grad()
    def init_image_from_text(self) -> None:
        self.weight_image.copy_(self.weight)
        if self.bias is not None:
            self.bias_image.copy_(self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "ModalityLinear":
        """A ModalityLinear whose text and image weights are both copies of ``linear``'s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.init_image_from_text()
        return module

    def forward(self, x: torch.Tensor, layout: Union[SpanLayout, torch.Tensor]) -> torch.Tensor:
        """``x [..., in_features]``; ``layout`` a SpanLayout or a bool ``is_image`` of x's leading shape."""
        weight, bias, weight_image, bias_image = self.weight, self.bias, self.weight_image, self.bias_image
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            weight, weight_image = _StackedCast.apply(weight, weight_image, dtype)
            bias = None if bias is None else bias.to(dtype)
            bias_image = None if bias_image is None else bias_image.to(dtype)
        return modality_linear(x, layout, weight, bias, weight_image, bias_image)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

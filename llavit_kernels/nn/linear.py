"""ModalityLinear: an nn.Linear with a second (image) weight set, picked per token."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..layout import SpanLayout
from ..ops import modality_linear

__all__ = ["ModalityLinear"]


class ModalityLinear(nn.Module):
    """``y[t] = x[t] @ W_m(t)^T + b_m(t)`` with ``m(t)`` the modality of token ``t``.

    Parameters keep ``nn.Linear``'s names for the text side (``weight``, ``bias``), so a text
    checkpoint loads by name; the image side is ``weight_image`` / ``bias_image``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.weight_image = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
            self.bias_image = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
            self.register_parameter("bias_image", None)
        self.reset_parameters()

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
            weight, weight_image = weight.to(dtype), weight_image.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            bias_image = None if bias_image is None else bias_image.to(dtype)
        return modality_linear(x, layout, weight, bias, weight_image, bias_image)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

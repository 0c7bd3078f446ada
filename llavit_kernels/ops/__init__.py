"""Ops: each with a pure-torch reference (the ground truth) and a Triton implementation."""

from .modality_linear import apply_rotary, modality_linear, modality_qkv
from .span_attention import span_attention

__all__ = ["span_attention", "modality_linear", "modality_qkv", "apply_rotary"]

"""llavit-kernels: LLaViT-style visual processing inside an LLM at the speed of causal attention."""

from .layout import SpanLayout
from .ops import apply_rotary, modality_linear, modality_qkv, span_attention
from .nn import LlavitAttention, LlavitKVCache, ModalityLinear

__version__ = "0.1.0"

__all__ = ["SpanLayout", "span_attention", "modality_linear", "modality_qkv", "apply_rotary", "__version__",
           "ModalityLinear", "LlavitAttention", "LlavitKVCache"]

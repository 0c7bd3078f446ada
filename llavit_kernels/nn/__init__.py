"""Drop-in modules owning parameters: ModalityLinear and LlavitAttention."""

from .attention import LlavitAttention, LlavitKVCache, causal_mask_layout
from .linear import ModalityLinear

__all__ = ["ModalityLinear", "LlavitAttention", "LlavitKVCache", "causal_mask_layout"]

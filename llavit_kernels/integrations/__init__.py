"""Converting Hugging Face models in place (Qwen2, Llama, LLaVA). Importing this needs transformers."""

from . import transformers as _hf
from .transformers import (
    HFLlavitAttention,
    LlavitLayoutSource,
    apply_llavit,
    apply_llavit_mask,
    llavit_attention_forward,
    llavit_state_dict,
    load_llavit_weights,
    register_llavit_attention,
)

__all__ = [name for name in _hf.__all__ if name != "LAYOUT_KWARG"]

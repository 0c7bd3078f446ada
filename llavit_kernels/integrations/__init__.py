"""Converting Hugging Face models in place (Qwen2, Llama, LLaVA). Importing this needs transformers."""

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

__all__ = [
    "apply_llavit",
    "apply_llavit_mask",
    "load_llavit_weights",
    "llavit_state_dict",
    "register_llavit_attention",
    "llavit_attention_forward",
    "HFLlavitAttention",
    "LlavitLayoutSource",
]

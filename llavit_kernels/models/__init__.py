"""The thin LLaViT model (CLIP vision tower + projector + Qwen2-style decoder with LlavitAttention)."""

from .llavit import (
    LlavitConfig,
    LlavitForConditionalGeneration,
    Qwen2Decoder,
    TextConfig,
    default_feature_layers,
    load_hf_qwen2_state_dict,
)

__all__ = [
    "LlavitConfig", "LlavitForConditionalGeneration", "Qwen2Decoder", "TextConfig",
    "default_feature_layers", "load_hf_qwen2_state_dict",
]

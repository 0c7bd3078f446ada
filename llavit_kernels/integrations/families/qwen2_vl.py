"""Qwen2-VL and Qwen2.5-VL: a Qwen2-style text model with multimodal RoPE (3-D position ids: time,
height, width of each visual token). The text attention has plain q/k/v/o with biases; the model's
rotary embedding turns the 3-D positions into the usual ``cos, sin`` tables (transformers 5; in 4.x
the tables come as ``[3, B, T, D]`` and the converted attention merges them by ``mrope_section``).
Image and video placeholder tokens (``image_token_id``, ``video_token_id``) are visual tokens."""

import functools
import inspect

from . import MultimodalFamily, TextFamily


def _mrope_section(config):
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and params.get("mrope_section") is not None:
            return list(params["mrope_section"])
    return None


@functools.lru_cache(maxsize=None)
def _returns_cache(cls) -> bool:
    """transformers 4.x: this attention returns ``(output, weights, cache)`` and the decoder layer
    unpacks three values; transformers 5 returns two."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # pragma: no cover - no source available
        return False
    return "return attn_output, attn_weights, past_key_value" in source


def _convert(module, **switches):
    from ..transformers import HFLlavitAttention

    new = HFLlavitAttention.from_attention(module, **switches)
    new.mrope_section = _mrope_section(module.config)
    new.returns_cache = _returns_cache(type(module))
    return new


def _attention():
    classes = []
    try:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention

        classes.append(Qwen2VLAttention)
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention

        classes.append(Qwen2_5_VLAttention)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


FAMILIES = (
    TextFamily("Qwen2-VL / Qwen2.5-VL text", ("qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl"),
               ("Qwen2VLTextModel", "Qwen2_5_VLTextModel"), _attention, _convert),
)
MULTIMODAL = (
    MultimodalFamily("Qwen2-VL", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")),
    MultimodalFamily("Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")),
)

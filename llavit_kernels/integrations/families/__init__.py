"""One small adapter per model family: which transformers classes it covers, where their attention
modules are and what each becomes. ``apply_llavit`` asks this registry; anything not listed is
refused with the list of what is supported (:func:`supported_text`).

A text family (:class:`TextFamily`) converts decoder attention modules; a multimodal family
(:class:`MultimodalFamily`) is a wrapper (vision tower + projector + a text model of a supported
text family) whose forward takes ``input_ids`` holding the image placeholder token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

__all__ = ["TextFamily", "MultimodalFamily", "TEXT_FAMILIES", "MULTIMODAL_FAMILIES", "text_family_of_config",
           "supported_text", "supported_multimodal"]


@dataclass(frozen=True)
class TextFamily:
    name: str  # as shown in messages and the README table
    model_types: Tuple[str, ...]  # config.model_type of the text model
    model_classes: Tuple[str, ...]  # top-level transformers classes converted directly
    attention_classes: Callable[[], tuple]  # the stock attention classes (imported lazily)
    convert: Callable  # (stock attention module, **switches) -> HFLlavitAttention


@dataclass(frozen=True)
class MultimodalFamily:
    name: str
    model_classes: Tuple[str, ...]
    image_token_attrs: Tuple[str, ...] = ("image_token_id", "image_token_index")


def _text_families():
    from . import llama, phi3, qwen2_vl, qwen3

    return llama.FAMILIES + qwen3.FAMILIES + phi3.FAMILIES + qwen2_vl.FAMILIES


def _multimodal_families():
    from . import idefics3, internvl, llava, mistral3, qwen2_vl

    return llava.FAMILIES + qwen2_vl.MULTIMODAL + idefics3.FAMILIES + internvl.FAMILIES + mistral3.FAMILIES



def text_family_of_config(config) -> Optional[TextFamily]:
    model_type = getattr(config, "model_type", None)
    return next((f for f in TEXT_FAMILIES if model_type in f.model_types), None)


def supported_text() -> str:
    return ", ".join(f"{f.name} ({f.model_classes[0]})" for f in TEXT_FAMILIES)


def supported_multimodal() -> str:
    return ", ".join(f"{f.name} ({f.model_classes[0]})" for f in MULTIMODAL_FAMILIES)


def check_sliding_window(window, config, family: str) -> None:
    """A sliding window shorter than the model's context changes the mask: refused. One at least as
    long as ``max_position_embeddings`` never binds (Phi-3.5-mini: 262144 > 131072) and is ignored."""
    if window is None:
        return
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or window < limit:
        raise NotImplementedError(
            f"model: {family} with sliding-window attention (sliding_window={window}, max_position_embeddings="
            f"{limit}) is not supported: LLaViT span attention has no sliding window; use a config with "
            "sliding_window=None"
        )


# the registry (after the helpers above, which the family modules import)
TEXT_FAMILIES = _text_families()
MULTIMODAL_FAMILIES = _multimodal_families()

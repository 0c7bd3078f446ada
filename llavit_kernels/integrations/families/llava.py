"""LLaVA (1.5), LLaVA-NeXT and LLaVA-OneVision: a vision tower + projector + a text model of a
supported text family. The image placeholder id is ``config.image_token_id`` (``image_token_index``
in older configs); ``input_ids`` keep it while the embeddings of those tokens are replaced by image
features. LLaVA-NeXT's / OneVision's tiles of one image are one contiguous run of image tokens (one
bidirectional span); OneVision's ``video_token_id`` tokens are visual too."""

from . import MultimodalFamily

FAMILIES = (
    MultimodalFamily("LLaVA", ("LlavaForConditionalGeneration", "LlavaModel")),
    MultimodalFamily("LLaVA-NeXT", ("LlavaNextForConditionalGeneration", "LlavaNextModel")),
    MultimodalFamily("LLaVA-OneVision", ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")),
)

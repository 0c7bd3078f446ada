"""LLaVA (1.5): CLIP tower + projector + a text model of a supported text family. The image
placeholder id is ``config.image_token_id`` (``image_token_index`` in older configs); ``input_ids``
keep it while the embeddings of those tokens are replaced by image features."""

from . import MultimodalFamily

FAMILIES = (MultimodalFamily("LLaVA", ("LlavaForConditionalGeneration", "LlavaModel")),)

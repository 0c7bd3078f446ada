"""Idefics3 and SmolVLM (Llama text model). Each image tile's tokens form one run of
``image_token_id`` between text tokens (``<fake_token_around_image>``, ``<row_x_col_y>``), so every
tile is its own bidirectional span and tiles see each other causally."""

from . import MultimodalFamily

FAMILIES = (
    MultimodalFamily("Idefics3", ("Idefics3ForConditionalGeneration", "Idefics3Model")),
    MultimodalFamily("SmolVLM", ("SmolVLMForConditionalGeneration", "SmolVLMModel")),
)

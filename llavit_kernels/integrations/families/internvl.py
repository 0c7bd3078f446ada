"""InternVL (transformers' InternVLForConditionalGeneration; Qwen2 or Llama text model)."""

from . import MultimodalFamily

FAMILIES = (MultimodalFamily("InternVL", ("InternVLForConditionalGeneration", "InternVLModel")),)

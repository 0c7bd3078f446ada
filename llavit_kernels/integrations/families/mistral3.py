"""Mistral 3 (Mistral-Small-3.1 vision; Mistral text model, refused if it uses a sliding window)."""

from . import MultimodalFamily

FAMILIES = (MultimodalFamily("Mistral3", ("Mistral3ForConditionalGeneration", "Mistral3Model")),)

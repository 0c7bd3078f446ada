"""Data: LLaVA JSON and caption formats, CLIP preprocessing, chat-template tokenisation, packing, synthetic set."""

from .datasets import (
    BadSample, SafeDataset, SampleProcessor, clip_preprocess, collate_packed, collate_padded,
    load_caption_json, load_llava_json,
)
from .synthetic import WORDS as SYNTHETIC_WORDS
from .synthetic import synthetic_samples
from .tokenizer import IGNORE_INDEX, IMAGE_TOKEN, WordTokenizer, encode_chat, load_tokenizer

__all__ = [
    "BadSample", "SafeDataset", "SampleProcessor", "clip_preprocess", "collate_packed", "collate_padded",
    "load_caption_json", "load_llava_json", "SYNTHETIC_WORDS", "synthetic_samples", "IGNORE_INDEX",
    "IMAGE_TOKEN", "WordTokenizer", "encode_chat", "load_tokenizer",
]

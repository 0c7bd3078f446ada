"""Tokenisation: a tiny offline word-level tokenizer, and chat-template encoding with answer-only labels.

``encode_chat`` works with any tokenizer that has ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)`` and ``encode(text, add_special_tokens=False)``: a Hugging Face
``AutoTokenizer`` loaded from a local path, or :class:`WordTokenizer`.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence, Tuple

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


class WordTokenizer:
    """Whitespace word tokenizer with a fixed vocabulary and a minimal chat template.

    Template: ``<user> {text} <assistant> {answer} <eos>`` per turn (no system prompt).
    """

    specials = ["<pad>", "<unk>", "<eos>", IMAGE_TOKEN, "<user>", "<assistant>"]

    def __init__(self, words: Sequence[str]):
        vocab = list(self.specials) + [w for w in words if w not in self.specials]
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.inv = vocab

    pad_token_id = property(lambda self: self.vocab["<pad>"])
    eos_token_id = property(lambda self: self.vocab["<eos>"])
    unk_token_id = property(lambda self: self.vocab["<unk>"])
    image_token_id = property(lambda self: self.vocab[IMAGE_TOKEN])

    def __len__(self):
        return len(self.inv)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return [self.vocab.get(w, self.unk_token_id) for w in text.replace("\n", " ").split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        words = [self.inv[int(i)] for i in ids]
        if skip_special_tokens:
            words = [w for w in words if w not in self.specials]
        return " ".join(words)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False):
        parts = []
        for m in messages:
            if m["role"] == "user":
                parts.append(f"<user> {m['content']}")
            elif m["role"] == "assistant":
                parts.append(f"<assistant> {m['content']} <eos>")
            else:  # system prompts are prepended as plain text
                parts.append(m["content"])
        if add_generation_prompt:
            parts.append("<assistant>")
        text = " ".join(parts)
        return self.encode(text) if tokenize else text

    def save_pretrained(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "word_tokenizer.json"), "w") as f:
            json.dump({"vocab": self.inv}, f)

    @classmethod
    def from_pretrained(cls, directory: str) -> "WordTokenizer":
        with open(os.path.join(directory, "word_tokenizer.json")) as f:
            vocab = json.load(f)["vocab"]
        return cls(vocab[len(cls.specials):])


def load_tokenizer(path: str):
    """WordTokenizer if ``path`` holds one, else ``AutoTokenizer.from_pretrained(path)`` (local only)."""
    if os.path.exists(os.path.join(path, "word_tokenizer.json")):
        return WordTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if hasattr(tokenizer, "convert_tokens_to_ids") else tokenizer.image_token_id


def to_messages(conversations) -> List[dict]:
    """LLaVA ``[{"from": "human"|"gpt", "value": ...}]`` -> chat messages ``[{"role", "content"}]``."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for turn in conversations:
        role = roles.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"conversation turn with unknown speaker {turn.get('from', turn.get('role'))!r}")
        out.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return out


def encode_chat(tokenizer, messages: List[dict]) -> Tuple[List[int], List[bool]]:
    """Token ids of the whole conversation and a per-token flag: True on assistant answer tokens.

    Each assistant turn's tokens are found by rendering the template for the prefix before it (with
    the generation prompt) and after it; the answer tokens (including the end-of-turn token) are
    the difference. Raises if the template is not prefix-consistent at the token level.
    """
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    is_answer = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.encode(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False)
        upto = tokenizer.encode(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False), add_special_tokens=False)
        if full[: len(upto)] != upto or upto[: len(before)] != before:
            raise ValueError("chat template is not prefix-consistent at the token level; cannot locate answer tokens")
        for t in range(len(before), len(upto)):
            is_answer[t] = True
    return full, is_answer

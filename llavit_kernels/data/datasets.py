"""Datasets and collators: LLaVA JSON, caption JSON(L), the synthetic set; padding and packing.

A processed sample is ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values":
FloatTensor[n_images, 3, S, S]}`` where ``labels[t]`` is the target for position t (the NEXT token
when it is an answer token, else -100): labels are pre-shifted, so padded and packed batches give
the same loss. Each ``<image>`` in the text becomes ``num_image_tokens`` image-token ids.

Bad samples (missing or unreadable image file, ``<image>`` count not matching the images, longer
than ``max_length``, no answer tokens) raise :class:`BadSample`; :class:`SafeDataset` turns that
into a logged, counted skip (``on_bad="skip"``) or a clear error (``on_bad="error"``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .tokenizer import IGNORE_INDEX, IMAGE_TOKEN, encode_chat, image_token_id, to_messages

log = logging.getLogger("llavit.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_PROMPT = "describe the image ."


class BadSample(ValueError):
    pass


# ------------------------------------------------------------------------------------ images
IMAGE_ASPECTS = ("pad", "crop")


def clip_preprocess(image, size: int, aspect: str = "pad") -> torch.Tensor:
    """CLIP preprocessing -> ``[3, size, size]`` float, normalised with the CLIP mean/std.

    ``aspect="pad"`` (the default, LLaVA-1.5's ``image_aspect_ratio pad``): pad the image to a square
    with the CLIP mean colour, centred, then resize to ``size`` (bicubic), so nothing is cut off.
    ``aspect="crop"``: resize the shortest edge to ``size`` (bicubic) and centre-crop (CLIP's own).
    ``image``: a PIL image, or a uint8 ``[3, H, W]`` tensor.
    """
    from PIL import Image

    if aspect not in IMAGE_ASPECTS:
        raise ValueError(f"aspect: expected one of {IMAGE_ASPECTS}, got {aspect!r}")
    if isinstance(image, torch.Tensor):
        if tuple(image.shape[-2:]) != (size, size):
            image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        else:
            x = image.float() / 255.0
            return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    image = image.convert("RGB")
    w, h = image.size
    if aspect == "pad" and w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in CLIP_MEAN))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image, w, h = square, side, side
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return clip_preprocess(t, size)


# ------------------------------------------------------------------------------------ raw records
def load_llava_json(path: str) -> List[dict]:
    """LLaVA format: a JSON list of ``{"image": rel_path (optional), "conversations": [...]}``."""
    with open(path) as f:
        records = json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def load_caption_json(path: str) -> List[dict]:
    """Caption format (PixMo-Cap style): JSON list or JSONL of ``{"image" | "image_path": p, "caption": str}``.

    Converted to one-turn conversations ``<image>\\n{CAPTION_PROMPT}`` -> caption.
    """
    records = load_llava_json(path)
    out = []
    for r in records:
        image = r.get("image", r.get("image_path"))
        out.append({"id": r.get("id"), "image": image, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": r.get("caption", "")},
        ]})
    return out


# ------------------------------------------------------------------------------------ processing
class SampleProcessor:
    """Turns a raw record into model inputs (see the module docstring)."""

    def __init__(self, tokenizer, image_size: int, num_image_tokens: int, max_length: int,
                 image_root: Optional[str] = None, image_aspect: str = "pad"):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect: expected one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        self.image_aspect = image_aspect
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_root = image_root
        self.image_token_id = image_token_id(tokenizer)

    def load_images(self, record) -> List[torch.Tensor]:
        image = record.get("image")
        if image is None:
            return []
        images = image if isinstance(image, list) else [image]
        out = []
        for im in images:
            if isinstance(im, torch.Tensor):
                out.append(clip_preprocess(im, self.image_size, self.image_aspect))
                continue
            path = im if self.image_root is None or os.path.isabs(im) else os.path.join(self.image_root, im)
            if not os.path.isfile(path):
                raise BadSample(f"missing image file {path}")
            try:
                from PIL import Image

                with Image.open(path) as pil:
                    out.append(clip_preprocess(pil, self.image_size, self.image_aspect))
            except Exception as e:  # unreadable / truncated file
                raise BadSample(f"unreadable image file {path}: {e}") from e
        return out

    def __call__(self, record) -> dict:
        conversations = record.get("conversations")
        if not conversations:
            raise BadSample("no conversations")
        try:
            messages = to_messages(conversations)
        except (ValueError, TypeError, AttributeError) as e:  # a malformed record, not a pipeline error
            raise BadSample(f"malformed conversations: {e}") from e
        if not all(isinstance(m["content"], str) for m in messages):
            raise BadSample("malformed conversations: a turn's value is not a string")
        n_tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        n_images = 0 if record.get("image") is None else (len(record["image"]) if isinstance(record["image"], list) else 1)
        if n_tags != n_images:
            raise BadSample(f"{n_tags} '{IMAGE_TOKEN}' tag(s) in the text but {n_images} image(s)")
        ids, is_answer = encode_chat(self.tokenizer, messages)
        expanded_len = len(ids) + n_images * (self.num_image_tokens - 1)
        if expanded_len > self.max_length:
            raise BadSample(f"{expanded_len} tokens (with image tokens) > max_length {self.max_length}")
        if not any(is_answer):
            raise BadSample("no answer tokens to train on")
        pixel_values = self.load_images(record)
        input_ids, targets = [], []
        for t, tok in enumerate(ids):
            if tok == self.image_token_id:
                input_ids.extend([tok] * self.num_image_tokens)
                targets.extend([False] * self.num_image_tokens)
            else:
                input_ids.append(tok)
                targets.append(is_answer[t])
        input_ids_t = torch.tensor(input_ids, dtype=torch.long)
        # labels[t] = input_ids[t+1] where token t+1 is an answer token (next-token prediction, pre-shifted)
        labels = torch.full_like(input_ids_t, IGNORE_INDEX)
        nxt = torch.tensor(targets[1:] + [False])
        labels[:-1] = torch.where(nxt[:-1], input_ids_t[1:], IGNORE_INDEX)
        pv = torch.stack(pixel_values) if pixel_values else torch.zeros(0, 3, self.image_size, self.image_size)
        return {"input_ids": input_ids_t, "labels": labels, "pixel_values": pv}


class SafeDataset(Dataset):
    """Processes records lazily; bad ones are logged and counted (``on_bad="skip"``) or raise."""

    def __init__(self, records: Sequence[dict], processor: SampleProcessor, on_bad: str = "skip"):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad: expected 'skip' or 'error', got {on_bad!r}")
        self.records = records
        self.processor = processor
        self.on_bad = on_bad
        self.skipped: Counter = Counter()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return self.processor(self.records[i])
        except BadSample as e:
            if self.on_bad == "error":
                raise BadSample(f"sample {i} (id={self.records[i].get('id')!r}): {e}") from e
            self.skipped[_reason(e)] += 1
            log.warning("skipping sample %d (id=%r): %s [skipped so far: %d]", i, self.records[i].get("id"), e,
                        sum(self.skipped.values()))
            return None


def _reason(e: Exception) -> str:
    msg = str(e)
    if "missing image" in msg:
        return "missing_image"
    if "unreadable" in msg:
        return "unreadable_image"
    if "tag(s)" in msg:
        return "image_tag_mismatch"
    if "max_length" in msg:
        return "too_long"
    return "other"


# ------------------------------------------------------------------------------------ collators
def collate_padded(samples: List[Optional[dict]], pad_token_id: int, padding_side: str = "right") -> Optional[dict]:
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, sl], labels[b, sl], mask[b, sl] = s["input_ids"], s["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples])}


def collate_packed(samples: List[Optional[dict]]) -> Optional[dict]:
    """One packed row: ``input_ids [N]``, ``position_ids [N]`` restarting per sample, ``cu_seqlens [B+1]``."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return {
        "input_ids": torch.cat([s["input_ids"] for s in samples]),
        "labels": torch.cat([s["labels"] for s in samples]),
        "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()]),
        "cu_seqlens": cu,
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
    }


def num_target_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())

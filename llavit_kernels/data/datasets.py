"""Datasets and collators: LLaVA JSON, caption JSON(L), the synthetic set; padding and packing.

A processed sample is ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values":
FloatTensor[n_images, 3, S, S]}`` where ``labels[t]`` is the target for position t (the NEXT token
when it is an answer token, else -100): labels are pre-shifted, so padded and packed batches give
the same loss. Each ``<image>`` in the text becomes ``num_image_tokens`` image-token ids.

Bad samples (missing or unreadable image file, ``<image>`` count not matching the images, longer
than ``max_length``, no answer tokens) raise :class:`BadSample`; :class:`SafeDataset` turns that
into a logged, counted skip (``on_bad="skip"``) or a clear error (``on_bad="error"``).
Every per-record failure is one of these: a line of a JSONL file that is not UTF-8, not JSON or
not an object, a field of the wrong type, an empty answer or caption, an image that cannot be
decoded. Each names the file and line it came from (records carry ``"_source": "file:line"``).
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
    """One unusable record; ``reason`` is the short key it is counted under."""

    def __init__(self, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.reason = reason


def _pil_to_rgb(image):
    """RGB for any PIL mode; 16-bit and 32-bit integer modes are scaled (``convert`` would clip them to 255)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        import numpy as np

        a = np.asarray(image).astype(np.float64)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if image.mode == "F":  # float images: taken as values in [0, 1]
        import numpy as np

        a = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return image.convert("RGB")


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
    image = _pil_to_rgb(image)
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
def _bad_record(path: str, where: str, reason: str, message: str, on_bad: str) -> dict:
    if on_bad == "error":
        raise BadSample(f"{path}:{where}: {message}", reason)
    log.warning("%s:%s: %s (skipped)", path, where, message)
    return {"_bad": reason, "_error": message, "_source": f"{path}:{where}"}


def _json_list_items(text: str, path: str):
    """(line, value) of each element of a top-level JSON list, with line numbers (``json.load`` has none)."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    def fail(e: json.JSONDecodeError):
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None

    i = 0
    while i < len(text) and text[i] in ws:
        i += 1
    if i >= len(text) or text[i] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            fail(e)
        raise ValueError(f"{path}: expected a JSON list of samples (or one JSON object per line in a .jsonl "
                         f"file), got {type(value).__name__}")
    i += 1
    items = []
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == "]" and not items:
            return items
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e)
        items.append((line_of(i), value))
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            rest = text[i + 1:].strip()
            if rest:
                raise ValueError(f"{path}: invalid JSON at line {line_of(i + 1 + text[i + 1:].index(rest[0]))}: "
                                 "extra data after the closing ']'")
            return items
        raise ValueError(f"{path}: invalid JSON at line {line_of(i)}: expected ',' or ']' after a list element")


def load_llava_json(path: str, on_bad: str = "error") -> List[dict]:
    """LLaVA format: a JSON list, or JSONL (one object per line), of ``{"image": rel_path (optional), "conversations": [...]}``.

    Every record gets ``"_source": "file:line"``. A JSONL line that is not UTF-8, not JSON or not an
    object raises :class:`BadSample` naming file and line (``on_bad="error"``), or becomes a
    placeholder record that :class:`SafeDataset` counts as a skip (``on_bad="skip"``). A ``.json``
    file must be valid as a whole (UTF-8, JSON, a list); its elements that are not objects are
    treated like bad lines.
    """
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad: expected 'skip' or 'error', got {on_bad!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the data file ({e.strerror or e})") from e
    records: List[dict] = []
    if path.endswith(".json"):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None
        for line, value in _json_list_items(text, path):
            if isinstance(value, dict):
                records.append(dict(value, _source=f"{path}:{line}"))
            else:
                records.append(_bad_record(path, str(line), "not_an_object",
                                           f"a sample must be a JSON object, got {type(value).__name__}", on_bad))
        return records
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
            raw_line = raw_line[3:]
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append(_bad_record(path, str(lineno), "not_utf8", f"not UTF-8 (byte {e.start}: {e.reason})", on_bad))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(_bad_record(path, str(lineno), "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}",
                                       on_bad))
            continue
        if not isinstance(value, dict):
            records.append(_bad_record(path, str(lineno), "not_an_object",
                                       f"a sample must be a JSON object, got {type(value).__name__}", on_bad))
            continue
        records.append(dict(value, _source=f"{path}:{lineno}"))
    return records


def load_caption_json(path: str, on_bad: str = "error") -> List[dict]:
    """Caption format (PixMo-Cap style): JSON list or JSONL of ``{"image" | "image_path": p, "caption": str}``.

    Converted to one-turn conversations ``<image>\\n{CAPTION_PROMPT}`` -> caption. A missing, empty
    or non-string caption is left to :class:`SampleProcessor`, which rejects it (an empty answer
    would train the model to emit only the end of turn).
    """
    out = []
    for r in load_llava_json(path, on_bad):
        if "_bad" in r:
            out.append(r)
            continue
        image = r.get("image", r.get("image_path"))
        out.append({"id": r.get("id"), "image": image, "_source": r.get("_source"), "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": r.get("caption")},
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
        if not isinstance(record, dict):
            raise BadSample(f"a sample must be a JSON object, got {type(record).__name__}", "not_an_object")
        if "_bad" in record:  # a line the loader could not read (kept so that it is counted here)
            raise BadSample(record.get("_error", "unreadable record"), record["_bad"])
        conversations = record.get("conversations")
        if not conversations:
            raise BadSample("no conversations", "malformed")
        if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
            raise BadSample("malformed conversations: expected a list of {'from', 'value'} objects, got "
                            f"{type(conversations).__name__}", "malformed")
        image = record.get("image")
        if image is not None:
            items = image if isinstance(image, list) else [image]
            if not items or not all(isinstance(im, (str, torch.Tensor)) for im in items):
                raise BadSample(f"'image' must be a path string or a list of them, got {_type_name(image)}", "malformed")
        try:
            messages = to_messages(conversations)
        except (ValueError, TypeError, AttributeError) as e:  # a malformed record, not a pipeline error
            raise BadSample(f"malformed conversations: {e}", "malformed") from e
        for k, m in enumerate(messages):
            if m["role"] == "assistant" and m["content"] is None:
                raise BadSample(f"empty answer in turn {k} (a missing 'value' / caption)", "empty_answer")
            if not isinstance(m["content"], str):
                raise BadSample(f"malformed conversations: turn {k}'s value is {_type_name(m['content'])}, not a "
                                "string", "malformed")
            if m["role"] == "assistant" and not m["content"].strip():
                raise BadSample(f"empty answer in turn {k} (a missing or empty 'value' / caption)", "empty_answer")
        n_tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        n_images = 0 if record.get("image") is None else (len(record["image"]) if isinstance(record["image"], list) else 1)
        if n_tags != n_images:
            raise BadSample(f"{n_tags} '{IMAGE_TOKEN}' tag(s) in the text but {n_images} image(s)")
        ids, is_answer = encode_chat(self.tokenizer, messages)
        expanded_len = len(ids) + n_images * (self.num_image_tokens - 1)
        if expanded_len > self.max_length:
            raise BadSample(f"{expanded_len} tokens (with image tokens) > max_length {self.max_length}")
        if not any(is_answer):
            raise BadSample("no answer tokens to train on", "empty_answer")
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


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def describe_record(records, i) -> str:
    """``sample i (id=..., file:line)`` for messages."""
    r = records[i]
    if not isinstance(r, dict):
        return f"sample {i}"
    src = f", {r['_source']}" if r.get("_source") else ""
    return f"sample {i} (id={r.get('id')!r}{src})"


class SafeDataset(Dataset):
    """Processes records lazily; bad ones are logged and counted (``on_bad="skip"``) or raise.

    ``load(i)`` returns ``(sample or None, reason or None)``, so a caller in another process (a
    DataLoader worker) can carry the reason back; ``__getitem__`` returns the sample or None.
    ``skipped`` counts the skips seen in THIS process only; the trainer sums the reasons it gets
    back over workers and ranks.
    """

    def __init__(self, records: Sequence[dict], processor: SampleProcessor, on_bad: str = "skip"):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad: expected 'skip' or 'error', got {on_bad!r}")
        self.records = records
        self.processor = processor
        self.on_bad = on_bad
        self.skipped: Counter = Counter()

    def __len__(self):
        return len(self.records)

    def load(self, i):
        try:
            try:
                return self.processor(self.records[i]), None
            except BadSample:
                raise
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, UnicodeError) as e:
                # a record shaped in a way the checks above did not foresee: still one bad record
                raise BadSample(f"malformed record ({type(e).__name__}: {e})", "malformed") from e
        except BadSample as e:
            if self.on_bad == "error":
                raise BadSample(f"{describe_record(self.records, i)}: {e}", _reason(e)) from e
            reason = _reason(e)
            self.skipped[reason] += 1
            log.warning("skipping %s: %s [skipped so far in this process: %d]", describe_record(self.records, i), e,
                        sum(self.skipped.values()))
            return None, reason

    def __getitem__(self, i):
        return self.load(i)[0]


def _reason(e: Exception) -> str:
    if getattr(e, "reason", None):
        return e.reason
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

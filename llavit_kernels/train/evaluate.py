"""Evaluation: greedy-generation accuracy on the synthetic held-out questions, plus sample generations."""

from __future__ import annotations

from collections import defaultdict
from typing import List

import torch

from ..data.datasets import clip_preprocess
from ..data.tokenizer import IMAGE_TOKEN, image_token_id, to_messages


def build_prompt_ids(tokenizer, conversations, num_image_tokens: int) -> List[int]:
    """Token ids of the conversation up to (not including) the last assistant answer, image tokens expanded."""
    messages = to_messages(conversations)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    img = image_token_id(tokenizer)
    out = []
    for t in ids:
        out.extend([t] * num_image_tokens if t == img else [t])
    return out


@torch.no_grad()
def evaluate_synthetic(model, tokenizer, samples, batch_size: int = 64, max_new_tokens: int = 4,
                       num_examples: int = 8, device=None) -> dict:
    """Exact-match accuracy of the greedy answer, overall and per question kind.

    Samples without an ``image`` (text-only questions) are answered by the language model alone.
    """
    device = device or next(model.parameters()).device
    cfg = model.config
    was_training = model.training
    model.eval()
    image_size = int(cfg.vision["image_size"])
    correct, total = defaultdict(int), defaultdict(int)
    examples = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        prompts = [build_prompt_ids(tokenizer, s["conversations"], cfg.num_image_tokens) for s in chunk]
        T = max(map(len, prompts))
        ids = torch.full((len(chunk), T), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding for generation
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        with_image = [s.get("image") is not None for s in chunk]
        if any(with_image) and not all(with_image):
            raise ValueError("samples: a batch mixes samples with and without an image; evaluate them separately")
        pixels = torch.stack([clip_preprocess(s["image"], image_size) for s in chunk]).to(device) if all(with_image) else None
        new = model.generate(ids.to(device), pixels, mask.to(device), max_new_tokens=max_new_tokens)
        for b, s in enumerate(chunk):
            toks = new[b].tolist()
            if cfg.eos_token_id in toks:
                toks = toks[: toks.index(cfg.eos_token_id)]
            pred = tokenizer.decode(toks, skip_special_tokens=True).strip()
            ok = pred == s["answer"].strip()
            correct[s["kind"]] += ok
            total[s["kind"]] += 1
            if len(examples) < num_examples:
                q = s["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
                examples.append({"question": q, "answer": s["answer"], "prediction": pred, "correct": ok})
    model.train(was_training)
    n = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / max(1, n),
        "per_kind": {k: correct[k] / total[k] for k in sorted(total)},
        "count_per_kind": {k: total[k] for k in sorted(total)},
        "n": n,
        "examples": examples,
    }

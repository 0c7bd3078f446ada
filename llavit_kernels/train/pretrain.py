"""Pre-training of the miniature's parts, built in the run because no weights can be downloaded:
what the paper starts from (a CLIP tower and a text-trained LLM), at toy scale.

* :func:`pretrain_vision`: a tiny CLIP-architecture ViT trained on a GLOBAL objective only, from its
  pooled (CLS) output: which colour-shape pairs are present (multi-label) and how many objects.
  Positions, sizes and the digits stamped on the objects are never asked for, so like CLIP's, its
  late blocks are pushed toward global content while early blocks still hold local detail.
* :func:`pretrain_language_model`: the tiny Qwen2-style decoder trained on TEXT only (scene
  descriptions with questions and answers about them, caption copying, knowledge facts), so its
  attention is text-specialised before it ever sees an image token.

Both are cached per seed and size in ``<output_dir>/pretrained/`` (:func:`cached_parts`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("llavit.pretrain")


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    from ..data.datasets import CLIP_MEAN, CLIP_STD

    x = images_u8.float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class _GlobalHeads(nn.Module):
    def __init__(self, dim: int, n_pairs: int, n_counts: int):
        super().__init__()
        self.pairs = nn.Linear(dim, n_pairs)
        self.count = nn.Linear(dim, n_counts)


def pretrain_vision(vision_cfg: dict, seed: int, n_images: int, steps: int, batch_size: int, lr: float,
                    max_shapes: int = 5, n_eval: int = 400, progress: bool = False):
    """A CLIPVisionModel (config ``vision_cfg``) trained on the global labels of synthetic scenes.

    Returns ``(model, stats)``; ``stats`` holds the held-out per-label accuracy of the colour-shape
    pairs, the exact-set accuracy and the object-count accuracy, with the chance levels.
    """
    from ..data.synthetic import HELDOUT_SEED_OFFSET, PAIRS, scene_batch
    from ..models.llavit import _clip_vision_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = _clip_vision_model(vision_cfg)
    heads = _GlobalHeads(int(vision_cfg["hidden_size"]), len(PAIRS), max_shapes)
    size = int(vision_cfg["image_size"])
    images, pairs, counts = scene_batch(n_images, seed + 11, size, max_shapes)
    x_all = _normalise(images)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, math.ceil(0.03 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        pooled = model(pixel_values=x_all[idx]).pooler_output
        loss = F.binary_cross_entropy_with_logits(heads.pairs(pooled), pairs[idx]) + \
            F.cross_entropy(heads.count(pooled), counts[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"  vision pre-training step {step + 1}/{steps} loss {losses[-1]:.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        ev_img, ev_pairs, ev_counts = scene_batch(n_eval, seed + HELDOUT_SEED_OFFSET + 11, size, max_shapes)
        pooled = model(pixel_values=_normalise(ev_img)).pooler_output
        pred = heads.pairs(pooled) > 0
        stats = {
            "pair_label_accuracy": float((pred == (ev_pairs > 0.5)).float().mean()),
            "pair_label_chance": float(1 - ev_pairs.mean()),  # always "absent"
            "pair_set_exact": float((pred == (ev_pairs > 0.5)).all(-1).float().mean()),
            "count_accuracy": float((heads.count(pooled).argmax(-1) == ev_counts).float().mean()),
            "count_chance": float(torch.bincount(ev_counts).max() / len(ev_counts)),
            "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.perf_counter() - t0, 1), "steps": steps, "n_eval": n_eval,
        }
    for p in model.parameters():
        p.requires_grad_(False)
    return model, stats


def pretrain_language_model(model, tokenizer, seed: int, n_samples: int, steps: int, batch_size: int, lr: float,
                            output_dir: str, max_length: int, progress: bool = False, n_eval: int = 300):
    """Train ``model.language_model`` (everything else frozen) on text-only synthetic samples.

    ``model`` is a :class:`LlavitForConditionalGeneration` (its vision side unused: no sample has an
    image). Afterwards the image q/k/v are re-copied from the trained text q/k/v. Returns stats with
    the text-only held-out accuracy per question kind.
    """
    from ..data.datasets import SafeDataset, SampleProcessor
    from ..data.synthetic import text_samples
    from .evaluate import evaluate_synthetic
    from .trainer import TrainConfig, train

    t0 = time.perf_counter()
    records = text_samples(n_samples, seed + 21)
    proc = SampleProcessor(tokenizer, int(model.config.vision["image_size"]), model.config.num_image_tokens, max_length)
    cfg = TrainConfig(output_dir=output_dir, stage=2, trainable=[r"^language_model\."], max_steps=steps,
                      batch_size=batch_size, lr=lr, warmup_steps=max(1, math.ceil(0.03 * steps)), min_lr_ratio=0.0,
                      weight_decay=0.01, seed=seed, progress=progress, plot=False)
    history = []
    train(model, SafeDataset(records, proc), cfg, pad_token_id=tokenizer.pad_token_id, history=history,
          tag="LM pre-training (text only)")
    for layer in model.language_model.model.layers:
        layer.self_attn.init_image_from_text()
    heldout = text_heldout(n_eval, seed)
    ev = evaluate_synthetic(model, tokenizer, heldout, batch_size=100, max_new_tokens=3)
    losses = [h["loss"] for h in history]
    return {"text_heldout": _strip(ev), "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.perf_counter() - t0, 1), "steps": steps}


def text_heldout(n: int, seed: int):
    """Text-only held-out questions (no caption copying): the language model's reading of scenes."""
    from ..data.synthetic import HELDOUT_SEED_OFFSET, text_samples

    return text_samples(n, seed + HELDOUT_SEED_OFFSET + 21, copy_share=0.0)


def _strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "examples"}


def cached_parts(cache_dir: str, key: dict, build):
    """Load ``(vision_state, lm_state, stats)`` from ``cache_dir`` when its ``key`` matches, else
    ``build()`` them and save. The key holds every size field the parts depend on, and the seed."""
    from safetensors.torch import load_file, save_file

    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("key") == key:
            log.info("pre-trained parts loaded from %s", cache_dir)
            return (load_file(os.path.join(cache_dir, "vision.safetensors")),
                    load_file(os.path.join(cache_dir, "language_model.safetensors")), dict(meta["stats"], cached=True))
    vision_state, lm_state, stats = build()
    os.makedirs(cache_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vision_state.items()}, os.path.join(cache_dir, "vision.safetensors"))
    save_file({k: v.contiguous() for k, v in lm_state.items()}, os.path.join(cache_dir, "language_model.safetensors"))
    with open(meta_path, "w") as f:
        json.dump({"key": key, "stats": stats}, f, indent=2)
    return vision_state, lm_state, stats

"""The main job: a tiny LLaViT trained through both stages on the synthetic data, on the CPU, with a
miniature of the paper's ablation table (LLaViT vs LLaVA-1.5 and single-component ablations).

Every variant starts from the same random initialisation (same seed, same frozen random CLIP),
sees the same batches, and is evaluated on the same held-out questions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace

import torch

from ..data.datasets import SafeDataset, SampleProcessor
from ..data.synthetic import HELDOUT_SEED_OFFSET, WORDS, synthetic_samples
from ..data.tokenizer import WordTokenizer
from ..models.llavit import LlavitConfig, LlavitForConditionalGeneration, TextConfig
from .evaluate import evaluate_synthetic
from .trainer import TrainConfig, plot_losses, train

log = logging.getLogger("llavit.demo")


@dataclass
class DemoSize:
    """Sizes of the CPU main job (defaults) and of the CI smoke run (QUICK)."""

    image_size: int = 32  # 32 px, patch 8: 16 image tokens per image
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 4  # feature layers 1, 2, 4 (the paper's 5, 15, 23 scaled to depth 4)
    text_hidden: int = 128
    text_layers: int = 4
    n_caption: int = 6000
    n_qa: int = 12000
    n_heldout: int = 1000
    stage1_steps: int = 20
    stage2_steps: int = 600
    batch_size: int = 32
    lr1: float = 2e-3
    lr2: float = 3e-3
    caption_mix: float = 0.5  # stage 2: captions per question
    train_vision: bool = False  # stage 2 also trains the (random-init) CLIP tower


QUICK = DemoSize(vision_hidden=32, vision_layers=3, text_hidden=64, text_layers=2, n_caption=128, n_qa=256,
                 n_heldout=64, stage1_steps=3, stage2_steps=10, batch_size=16)

# name -> (separate_image_qkv, bidirectional_image, feature_layers); None = default multi-layer
VARIANTS = {
    "LLaViT (all three)": (True, True, None),
    "LLaVA-1.5 baseline (all off)": (False, False, [-2]),
    "LLaViT - image QKV": (False, True, None),
    "LLaViT - bidirectional": (True, False, None),
    "LLaViT - multi-layer ([-2] only)": (True, True, [-2]),
}


def tiny_config(tokenizer: WordTokenizer, size: DemoSize, separate_image_qkv=True, bidirectional_image=True,
                feature_layers=None) -> LlavitConfig:
    vision = dict(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                  num_hidden_layers=size.vision_layers, num_attention_heads=4, image_size=size.image_size,
                  patch_size=size.patch_size)
    text = TextConfig(vocab_size=len(tokenizer), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
                      num_hidden_layers=size.text_layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    return LlavitConfig(vision=vision, text=text, feature_layers=feature_layers, separate_image_qkv=separate_image_qkv,
                        bidirectional_image=bidirectional_image, image_token_id=tokenizer.image_token_id,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def build_tiny(tokenizer, size: DemoSize, seed: int = 0, **switches) -> LlavitForConditionalGeneration:
    """Random tiny LLaViT; the vision tower is drawn first from ``seed`` so all variants share it."""
    torch.manual_seed(seed)
    cfg = tiny_config(tokenizer, size, **switches)
    from ..models.llavit import _clip_vision_model

    vision = _clip_vision_model(cfg.vision)
    torch.manual_seed(seed + 1)
    return LlavitForConditionalGeneration(cfg, vision_tower=vision)


def synthetic_datasets(tokenizer, size: DemoSize, seed: int = 0):
    n_tok = (size.image_size // size.patch_size) ** 2
    proc = SampleProcessor(tokenizer, size.image_size, n_tok, max_length=n_tok + 64)
    captions = synthetic_samples(size.n_caption, seed + 1, 1, size.image_size)
    stage1 = SafeDataset(captions, proc)
    # Stage 2 mixes the questions with the captions (as LLaVA-1.5's instruction mix keeps caption-like
    # data): dense per-word visual supervision helps the tiny random-init model ground its answers.
    qa = synthetic_samples(size.n_qa, seed + 2, 2, size.image_size)
    stage2 = SafeDataset(qa + captions[: int(size.caption_mix * len(qa))] if size.caption_mix else qa, proc)
    heldout = synthetic_samples(size.n_heldout, seed + HELDOUT_SEED_OFFSET, 2, size.image_size)
    return stage1, stage2, heldout


def run_variant(name, switches, tokenizer, data, size: DemoSize, output_dir, seed=0, progress=True) -> dict:
    stage1, stage2, heldout = data
    qkv, bidi, layers = switches
    model = build_tiny(tokenizer, size, seed, separate_image_qkv=qkv, bidirectional_image=bidi, feature_layers=layers)
    history = []
    t0 = time.perf_counter()
    common = dict(batch_size=size.batch_size, seed=seed, progress=progress, plot=False, warmup_steps=5)
    s1 = train(model, stage1, TrainConfig(output_dir=os.path.join(output_dir, "stage1"), stage=1,
                                          max_steps=size.stage1_steps, lr=size.lr1, **common),
               pad_token_id=tokenizer.pad_token_id, history=history, tag=f"{name} | stage 1")
    from .trainer import STAGE_PATTERNS

    patterns2 = STAGE_PATTERNS[2] + ([r"^vision_tower\."] if size.train_vision else [])
    s2 = train(model, stage2, TrainConfig(output_dir=os.path.join(output_dir, "stage2"), stage=2, trainable=patterns2,
                                          max_steps=size.stage2_steps, lr=size.lr2, **common),
               pad_token_id=tokenizer.pad_token_id, history=history, tag=f"{name} | stage 2")
    train_s = time.perf_counter() - t0
    ev = evaluate_synthetic(model, tokenizer, heldout, batch_size=100)
    plot_losses(history, os.path.join(output_dir, "loss.png"), name)
    with open(os.path.join(output_dir, "history.json"), "w") as f:
        json.dump(history, f)
    s1_losses = [h["loss"] for h in history if h["stage"] == 1]
    s2_losses = [h["loss"] for h in history if h["stage"] == 2]
    return {
        "variant": name, "separate_image_qkv": qkv, "bidirectional_image": bidi,
        "feature_layers": model.config.resolved_feature_layers,
        "stage1_loss_first": s1_losses[0], "stage1_loss_last": _tail_mean(s1_losses),
        "stage2_loss_first": s2_losses[0], "stage2_loss_last": _tail_mean(s2_losses),
        "train_seconds": round(train_s, 1), "eval": ev,
        "trainable_params": {"stage1": s1["trainable_params"], "stage2": s2["trainable_params"]},
    }


def _tail_mean(xs, k=10):
    tail = xs[-k:]
    return sum(tail) / len(tail)


def markdown_table(results) -> str:
    kinds = sorted({k for r in results for k in r["eval"]["per_kind"]})
    head = "| variant | image QKV | bidir. | feature layers | held-out acc. | " + " | ".join(kinds) + \
           " | stage-2 loss (first -> last 10) |"
    sep = "|" + "---|" * (6 + len(kinds))
    rows = [head, sep]
    for r in results:
        ev = r["eval"]
        rows.append(
            f"| {r['variant']} | {'on' if r['separate_image_qkv'] else 'off'} | {'on' if r['bidirectional_image'] else 'off'} "
            f"| {','.join(map(str, r['feature_layers']))} | {100 * ev['accuracy']:.1f}% | "
            + " | ".join(f"{100 * ev['per_kind'].get(k, 0):.1f}" for k in kinds)
            + f" | {r['stage2_loss_first']:.2f} -> {r['stage2_loss_last']:.3f} |"
        )
    return "\n".join(rows)


def main_demo(output_dir: str = "runs/demo", quick: bool = False, seed: int = 0, variants=None, progress=True,
              size: DemoSize = None) -> dict:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    size = size or (QUICK if quick else DemoSize())
    os.makedirs(output_dir, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = WordTokenizer(WORDS)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
    data = synthetic_datasets(tokenizer, size, seed)
    chance = _chance(data[2])
    names = variants or list(VARIANTS)
    results = []
    for name in names:
        vdir = os.path.join(output_dir, _slug(name))
        r = run_variant(name, VARIANTS[name], tokenizer, data, size, vdir, seed, progress)
        results.append(r)
        print(f"[{name}] held-out accuracy {100 * r['eval']['accuracy']:.1f}%  ({r['train_seconds']}s)", flush=True)
    table = markdown_table(results)
    n_held = len(data[2])
    se = 100 * (0.25 / max(1, n_held)) ** 0.5  # one standard error of an accuracy near 50%
    table += (f"\n\nOne standard error of an overall accuracy near 50% on {n_held} questions: about {se:.1f} points "
              f"(per kind, with a quarter of the questions, about {2 * se:.1f}); one seed per variant.")
    total = time.perf_counter() - t_start
    summary = {"results": results, "size": size.__dict__, "seed": seed, "total_seconds": round(total, 1),
               "heldout_n": len(data[2]), "majority_baseline": chance, "quick": quick}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table + "\n\n" + f"Held-out questions: {len(data[2])}; majority-answer baseline per kind: "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in chance.items()) + f". Total wall time {total:.0f} s.\n")
    _plot_all(results, output_dir)
    print("\n" + table)
    print("\nmajority-answer baseline per kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in chance.items()))
    ex = results[0]["eval"]["examples"]
    print(f"\nsample generations ({results[0]['variant']}):")
    for e in ex[:6]:
        print(f"  Q: {e['question']:<55} A: {e['answer']:<9} model: {e['prediction']}")
    print(f"\ntotal wall time {total:.0f} s; outputs in {output_dir}/ (results.json, table.md, loss_curves.png)")
    return summary


def _chance(heldout):
    from collections import Counter, defaultdict

    by = defaultdict(Counter)
    for s in heldout:
        by[s["kind"]][s["answer"]] += 1
    return {k: max(c.values()) / sum(c.values()) for k, c in sorted(by.items())}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")[:40]


def _plot_all(results, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        hist = json.load(open(os.path.join(output_dir, _slug(r["variant"]), "history.json")))
        n1 = max(h["step"] for h in hist if h["stage"] == 1)
        xs = [h["step"] + (n1 if h["stage"] == 2 else 0) for h in hist]
        ax.plot(xs, [h["loss"] for h in hist], label=r["variant"], lw=1)
    ax.axvline(n1, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (stage 1 | stage 2)")
    ax.set_ylabel("training loss (answer tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "loss_curves.png"), dpi=110)
    plt.close(fig)

"""The training loop: parameter groups by pattern, warm-up + cosine, grad accumulation, bf16 autocast,
activation checkpointing, DDP / FSDP2, checkpoint + exact resume, progress bar, JSON log, loss PNG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data.datasets import collate_packed, collate_padded
from ..data.tokenizer import IGNORE_INDEX

log = logging.getLogger("llavit.train")

STAGE_PATTERNS = {
    1: [r"^projector\.", r"_proj_image\."],
    2: [r"^projector\.", r"_proj_image\.", r"^language_model\."],
}


@dataclass
class TrainConfig:
    output_dir: str = "runs/llavit"
    stage: int = 1
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # samples per micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-3  # default lr for patterns without "=lr"
    trainable: Optional[List[str]] = None  # "regex" or "regex=lr"; None: STAGE_PATTERNS[stage]
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine to 0 (LLaVA-1.5)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = False
    bf16: str = "auto"  # "auto" (on CUDA), "on", "off"
    grad_checkpointing: bool = False
    save_every: int = 0  # steps; 0: only at the end
    resume: Optional[str] = None  # a checkpoint dir, or "auto" (latest in output_dir)
    seed: int = 0
    log_every: int = 1
    parallel: str = "auto"  # "auto" (ddp when WORLD_SIZE > 1), "none", "ddp", "fsdp"
    num_workers: int = 0
    progress: bool = True
    plot: bool = True


# ------------------------------------------------------------------------------------ distributed
def dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> Tuple[int, int, torch.device]:
    """Init the process group under torchrun (gloo on CPU, nccl on GPU); return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = dist_info()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def wrap_parallel(model, mode: str, device):
    """DDP or FSDP2 (``fully_shard`` per decoder layer, then the root)."""
    rank, world = dist_info()
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" or world == 1:
        return model, "none"
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), "ddp"
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.language_model.model.layers:
            fully_shard(layer)
        # The vision tower stays in the root unit: sharding CLIPVisionModel on its own drops its
        # output_hidden_states kwarg under transformers 5's output-capturing hooks.
        fully_shard(model)
        return model, "fsdp"
    raise ValueError(f"parallel: expected auto, none, ddp or fsdp, got {mode!r}")


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "language_model") else model


# ------------------------------------------------------------------------------------ params and schedule
def param_groups(model, patterns: Sequence[str], default_lr: float, weight_decay: float):
    """Freeze everything, then unfreeze parameters whose name matches a pattern (first match sets the lr)."""
    parsed = []
    for p in patterns:
        regex, _, lr = p.partition("=")
        parsed.append((re.compile(regex), float(lr) if lr else default_lr))
    groups = {}
    seen = set()
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        for i, (regex, lr) in enumerate(parsed):
            if regex.search(name):
                if id(param) not in seen:  # tied weights appear once
                    groups.setdefault(i, {"params": [], "lr": lr, "names": [], "weight_decay": weight_decay})
                    groups[i]["params"].append(param)
                    groups[i]["names"].append(name)
                    seen.add(id(param))
                param.requires_grad_(True)
                break
    if not groups:
        raise ValueError(f"trainable: no parameter matches any of {list(patterns)}")
    out = []
    for i in sorted(groups):
        g = groups[i]
        g["pattern"] = patterns[i]
        out.append(g)
    return out


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ------------------------------------------------------------------------------------ data order
class ResumableBatchSampler:
    """Micro-batches of indices, deterministic by (seed, epoch), for this rank, starting at a micro-step.

    The global micro-batch ``m`` is ``perm_epoch[(m % per_epoch) * B * W : ...]``; rank r takes its
    slice of B. Resuming at micro-step m replays exactly the batches not yet seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.start, self.stop, self.rank, self.world = n, batch_size, seed, start, stop, rank, world
        self.per_epoch = max(1, n // (batch_size * world))

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        cached_epoch, perm = -1, None
        for m in range(self.start, self.stop):
            epoch, j = divmod(m, self.per_epoch)
            if epoch != cached_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
                cached_epoch = epoch
            base = j * self.bs * self.world + self.rank * self.bs
            yield perm[base: base + self.bs].tolist()


class _Collate:
    def __init__(self, packing: bool, pad_token_id: int):
        self.packing, self.pad = packing, pad_token_id

    def __call__(self, samples):
        skipped = sum(s is None for s in samples)
        batch = collate_packed(samples) if self.packing else collate_padded(samples, self.pad)
        return batch, skipped


# ------------------------------------------------------------------------------------ checkpoints
def _full_state(model, optimizer=None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = unwrap(model)
    msd = get_model_state_dict(inner, options=opts)
    osd = get_optimizer_state_dict(inner, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def save_checkpoint(directory, model, optimizer, scheduler, state: dict):
    """Model (safetensors + JSON config), optimizer, scheduler and trainer state. Call on every rank."""
    from safetensors.torch import save_file

    from ..models.llavit import WEIGHTS_NAME

    rank, _ = dist_info()
    msd, osd = _full_state(model, optimizer)
    if rank == 0:
        tmp = directory + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        inner = unwrap(model)
        inner.config.save(tmp)
        msd = {k: v.contiguous() for k, v in msd.items()}
        if inner.config.text.tie_word_embeddings:
            msd.pop("language_model.lm_head.weight", None)
        save_file(msd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save({"optimizer": osd, "scheduler": scheduler.state_dict(), "state": state,
                    "rng": torch.get_rng_state()}, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(directory):
            import shutil

            shutil.rmtree(directory)
        os.replace(tmp, directory)  # a checkpoint dir is complete or absent
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(output_dir: str) -> Optional[str]:
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def load_checkpoint(directory, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from ..models.llavit import WEIGHTS_NAME

    inner = unwrap(model)
    msd = load_file(os.path.join(directory, WEIGHTS_NAME))
    if inner.config.text.tie_word_embeddings:
        msd["language_model.lm_head.weight"] = msd["language_model.model.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(inner, msd, options=opts)
    blob = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)
    if blob["optimizer"] is not None:
        set_optimizer_state_dict(inner, optimizer, blob["optimizer"], options=opts)
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"])
    return blob["state"]


# ------------------------------------------------------------------------------------ logging
def plot_losses(history: List[dict], path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    by_stage = {}
    for h in history:
        by_stage.setdefault(h.get("stage", 0), []).append(h)
    offset = 0
    for stage, hs in sorted(by_stage.items()):
        ax.plot([offset + h["step"] for h in hs], [h["loss"] for h in hs], label=f"stage {stage}")
        offset += hs[-1]["step"]
    ax.set_xlabel("optimizer step (stages concatenated)")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the loop
def _batch_on_every_rank(batch, world: int, device) -> bool:
    """False when this rank or any other has no usable micro-batch (all its samples bad).

    Every rank then skips that micro-step together: a rank that skipped alone would leave the others
    waiting in DDP's gradient all-reduce / FSDP's collectives (a hang, not an error). One tiny
    all-reduce per micro-step under torchrun (the loop already syncs per micro-step for the loss).
    """
    have = batch is not None
    if world > 1:
        missing = torch.tensor([0 if have else 1], dtype=torch.int32, device=device)
        dist.all_reduce(missing)
        return int(missing.item()) == 0
    return have


def train(model, dataset, cfg: TrainConfig, pad_token_id: int = 0, device=None, history: Optional[list] = None,
          tag: str = "") -> dict:
    """Train ``model`` on ``dataset`` (a :class:`SafeDataset`); returns a summary dict.

    Writes ``checkpoint-{step}/`` (every ``save_every`` steps and at the end), ``log.jsonl`` (one
    line per step) and ``loss.png`` under ``cfg.output_dir``. Resumes exactly from a checkpoint.
    """
    rank, world = dist_info()
    device = device or torch.device("cpu")
    os.makedirs(cfg.output_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    patterns = cfg.trainable or STAGE_PATTERNS[cfg.stage]
    groups = param_groups(model, patterns, cfg.lr, cfg.weight_decay)
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    if rank == 0:
        for g in groups:
            log.info("trainable %-28s lr %.2e  %d tensors", g["pattern"], g["lr"], len(g["params"]))
    unwrap(model).set_gradient_checkpointing(cfg.grad_checkpointing)
    model.to(device)
    wrapped, mode = wrap_parallel(model, cfg.parallel, device)
    # Optimizer over the (possibly sharded) trainable parameters, in the pattern groups.
    name_to_group = {n: i for i, g in enumerate(groups) for n in g["names"]}
    opt_groups = [{"params": [], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups]
    for name, p in unwrap(wrapped).named_parameters():
        if p.requires_grad and name in name_to_group:
            opt_groups[name_to_group[name]]["params"].append(p)
    optimizer = torch.optim.AdamW([g for g in opt_groups if g["params"]], betas=(0.9, 0.95), fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))

    state = {"step": 0, "skipped": {}, "tokens": 0, "stage": cfg.stage}
    resume = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if resume:
        state = load_checkpoint(resume, wrapped, optimizer, scheduler)
        if rank == 0:
            log.info("resumed from %s at step %d", resume, state["step"])
    history = history if history is not None else []
    log_path = os.path.join(cfg.output_dir, "log.jsonl")

    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, state["step"] * cfg.grad_accum,
                                    cfg.max_steps * cfg.grad_accum, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=_Collate(cfg.packing, pad_token_id))
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    skipped = Counter(state.get("skipped", {}))
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=tag or f"stage {cfg.stage}", dynamic_ncols=True,
                   mininterval=1.0)
    wrapped.train()
    micro, loss_acc, tok_acc, t0 = 0, 0.0, 0, time.perf_counter()
    last_loss = None
    try:
        for batch, n_skipped in loader:
            if n_skipped:
                skipped["bad_sample"] += n_skipped
            if not _batch_on_every_rank(batch, world, device):
                log.warning("micro-batch with no usable sample (on this or another rank) skipped")
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                _, loss = wrapped(**batch)
            (loss / cfg.grad_accum).backward()
            loss_acc += float(loss.detach()) / cfg.grad_accum
            tok_acc += int(batch["input_ids"].numel() if "cu_seqlens" in batch else batch["attention_mask"].sum())
            micro += 1
            if micro % cfg.grad_accum:
                continue
            if cfg.max_grad_norm:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            if world > 1:
                t = torch.tensor([loss_acc, tok_acc], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                loss_acc, tok_acc = float(t[0]) / world, int(t[1])
            state["tokens"] += tok_acc
            last_loss = loss_acc
            rec = {"stage": cfg.stage, "step": state["step"], "loss": round(loss_acc, 5),
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tok_acc / max(dt, 1e-9), 1),
                   "tag": tag}
            history.append(rec)
            if rank == 0:
                if state["step"] % cfg.log_every == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_acc:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            loss_acc, tok_acc = 0.0, 0
            state["skipped"] = dict(skipped)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.max_steps:
                save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{state['step']}"), wrapped, optimizer,
                                scheduler, state)
    except BaseException:
        # Keep the progress made so far, then re-raise (Ctrl-C, a bad batch, an OOM...).
        if state["step"] > 0 and world == 1:
            path = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
            log.error("training interrupted at step %d; saving %s", state["step"], path)
            save_checkpoint(path, wrapped, optimizer, scheduler, state)
        raise
    finally:
        if bar is not None:
            bar.close()
    state["skipped"] = dict(skipped)
    save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{state['step']}"), wrapped, optimizer, scheduler, state)
    if rank == 0:
        if sum(skipped.values()):
            log.warning("skipped %d bad samples: %s", sum(skipped.values()), dict(skipped))
        if cfg.plot and history:
            plot_losses(history, os.path.join(cfg.output_dir, "loss.png"), tag)
    return {"step": state["step"], "final_loss": last_loss, "skipped": dict(skipped), "tokens": state["tokens"],
            "trainable_params": n_trainable, "parallel": mode, "history": history, "config": asdict(cfg)}

"""The training loop: parameter groups by pattern, warm-up + cosine, grad accumulation, bf16 autocast,
activation checkpointing, DDP / FSDP2, checkpoint + exact resume, progress bar, JSON log, loss PNG.

Reliability (what survives what is tabled in docs/training.md): a non-finite loss or gradient norm
stops the run (or skips the step, up to ``max_bad_steps``) and is never checkpointed; SIGTERM /
SIGINT checkpoint at the next step boundary on every rank and raise :class:`TrainingInterrupted`;
checkpoints are written to a temp dir and renamed in (a failed save keeps the previous one); the
data position is counted in samples consumed; the loss is token-weighted over the global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data.datasets import collate_packed, collate_padded, num_target_tokens
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
    # reliability (issue 14)
    # A non-empty output_dir without resume: False refuses it (the CLI's default, --overwrite sets True);
    # True (the library default, e.g. the demo re-run into its own dirs) removes the earlier run's
    # checkpoints and logs first, so two runs never mix.
    overwrite: bool = True
    save_total_limit: int = 0  # keep at most this many checkpoint-N dirs (oldest deleted); 0: all
    max_bad_steps: int = 0  # steps with a non-finite loss / grad norm skipped before stopping; 0: stop at the first
    data_id: Optional[str] = None  # what the data is (file, format, ...): resume refuses a different one

    def validate(self):
        """Raise ValueError naming the setting, what is expected and what was given."""
        def num(name, value, lo=None, lo_open=False, hi=None, integer=False):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if integer:
                ok = ok and float(value).is_integer()
            if ok and lo is not None:
                ok = value > lo if lo_open else value >= lo
            if ok and hi is not None:
                ok = value <= hi
            if not ok:
                kind = "an integer" if integer else "a finite number"
                rng = (f" > {lo}" if lo_open else f" >= {lo}") if lo is not None else ""
                rng += f" and <= {hi}" if hi is not None else ""
                raise ValueError(f"{name}: expected {kind}{rng}, got {value!r}")

        num("lr", self.lr, 0, lo_open=True)
        num("max_steps", self.max_steps, 1, integer=True)
        num("batch_size", self.batch_size, 1, integer=True)
        num("grad_accum", self.grad_accum, 1, integer=True)
        for name, lo in (("warmup_steps", 0), ("save_every", 0), ("num_workers", 0), ("save_total_limit", 0),
                         ("max_bad_steps", 0), ("log_every", 1), ("seed", 0)):
            if hasattr(self, name):
                num(name, getattr(self, name), lo, integer=True)
        if hasattr(self, "min_lr_ratio"):
            num("min_lr_ratio", self.min_lr_ratio, 0, hi=1)
        num("weight_decay", self.weight_decay, 0)
        num("max_grad_norm", self.max_grad_norm, 0)
        if self.stage not in STAGE_PATTERNS:
            raise ValueError(f"stage: expected one of {sorted(STAGE_PATTERNS)}, got {self.stage!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16: expected auto, on or off, got {self.bf16!r}")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"parallel: expected auto, none, ddp or fsdp, got {self.parallel!r}")
        for p in self.trainable or []:
            regex, sep, lr = p.partition("=")
            try:
                re.compile(regex)
            except re.error as e:
                raise ValueError(f"trainable: {regex!r} is not a regular expression ({e})") from None
            if sep:
                try:
                    value = float(lr)
                except ValueError:
                    raise ValueError(f"trainable: the learning rate of {p!r}: expected a number, got {lr!r}") from None
                num(f"trainable {regex!r} learning rate", value, 0, lo_open=True)
        return self


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN / inf: the run stops (nothing non-finite is saved)."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT: a checkpoint was written at the step boundary; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


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
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_parent()
    rank, world = dist_info()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


_PARENT_WATCH = {"started": False}


def stop_with_parent(grace_s: Optional[float] = None):
    """Make this worker stop when its launcher dies (torchrun killed with ``kill -9`` does not stop its workers).

    On Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` delivers SIGTERM when the parent dies, which the
    training loop turns into a checkpoint at the next step boundary on every rank. A watchdog thread
    does the same by polling the parent pid (every platform), and ends the process with exit status
    1 if it is still alive ``grace_s`` seconds later (``LLAVIT_PARENT_GRACE_S``, default 120), e.g.
    when a collective waits for a rank that is gone.
    """
    if _PARENT_WATCH["started"]:
        return
    _PARENT_WATCH["started"] = True
    parent = os.getppid()
    grace = float(os.environ.get("LLAVIT_PARENT_GRACE_S", "120")) if grace_s is None else grace_s
    if hasattr(os, "uname") and os.uname().sysname == "Linux":
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # not fatal: the watchdog below still works
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent-pid watchdog")

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the launcher (pid %d) is gone: stopping at the next step boundary (hard exit in %.0f s)",
                  parent, grace)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except OSError:
            pass
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="llavit-parent-watch", daemon=True).start()


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
    """Micro-batches of indices from one global sample stream, for this rank, from a sample position.

    The stream is ``randperm(n, seed * 1000 + e)`` for epochs e = 0, 1, ... concatenated. The
    micro-batch starting at global position ``p`` is ``stream[p : p + B * W]``; rank r takes
    ``stream[p + r * B : p + (r + 1) * B]``. Positions are counted in samples CONSUMED (good or
    bad), so resuming at ``start_sample`` replays exactly the samples not yet seen, whatever was
    skipped. Endless unless ``stop_sample`` is given.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_sample: int = 0, stop_sample: Optional[int] = None,
                 rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("dataset: expected at least one record, got 0")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start, self.stop = start_sample, stop_sample

    def __len__(self):
        if self.stop is None:
            raise TypeError("an endless sampler has no length")
        return max(0, -(-(self.stop - self.start) // (self.bs * self.world)))

    def _perm(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def __iter__(self):
        cache = {}
        p = self.start
        while self.stop is None or p < self.stop:
            lo = p + self.rank * self.bs
            out = []
            for q in range(lo, lo + self.bs):
                epoch, j = divmod(q, self.n)
                if epoch not in cache:
                    if len(cache) > 1:
                        cache.clear()
                    cache[epoch] = self._perm(epoch).tolist()
                out.append(cache[epoch][j])
            yield out
            p += self.bs * self.world


class _Tagged(torch.utils.data.Dataset):
    """``dataset[i] -> (sample or None, skip reason or None)``, so reasons come back from worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from ..data.datasets import SafeDataset

        if isinstance(self.dataset, SafeDataset) and type(self.dataset).__getitem__ is SafeDataset.__getitem__:
            return self.dataset.load(i)
        s = self.dataset[i]
        return s, (None if s is not None else "bad_sample")


class _Collate:
    def __init__(self, packing: bool, pad_token_id: int):
        self.packing, self.pad = packing, pad_token_id

    def __call__(self, tagged):
        samples = [s for s, _ in tagged]
        reasons = Counter(r for s, r in tagged if s is None)
        batch = collate_packed(samples) if self.packing else collate_padded(samples, self.pad)
        return batch, reasons


# ------------------------------------------------------------------------------------ checkpoints
def _seed_all(seed: int) -> None:
    """Seed every global generator the trainer owns: torch (CPU and CUDA), Python's random, numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    state["numpy"] = np.random.get_state()
    return state


def _set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the other generators were saved
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _full_state(model, optimizer=None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = unwrap(model)
    msd = get_model_state_dict(inner, options=opts)
    osd = get_optimizer_state_dict(inner, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path):
    for name in os.listdir(path):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _nonfinite_tensors(msd: dict) -> List[str]:
    return [k for k, v in msd.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]


def save_checkpoint(directory, model, optimizer, scheduler, state: dict, extra: Optional[dict] = None):
    """Model (safetensors + JSON config), optimizer, scheduler and trainer state. Call on every rank.

    Written to ``directory.tmp`` and renamed in, so ``directory`` is always complete or absent. A
    failure (full disk...) removes the temp dir, keeps whatever was there before, and raises
    :class:`CheckpointError`. Re-saving an existing step renames the old dir to ``.old``, moves the
    new one in, then deletes the old one (``latest_checkpoint`` recovers an interrupted swap).
    Weights with a NaN / inf are refused (:class:`NonFiniteError`), never written.
    """
    from safetensors.torch import save_file

    from ..models.llavit import WEIGHTS_NAME

    rank, _ = dist_info()
    msd, osd = _full_state(model, optimizer)
    error = None
    if rank == 0:
        bad = _nonfinite_tensors(msd)
        if bad:
            error = NonFiniteError(f"refusing to save {directory}: {len(bad)} of {len(msd)} weight tensors are "
                                   f"non-finite (first: {bad[:3]})")
        else:
            tmp = directory + ".tmp"
            old = directory + ".old"
            try:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
                inner = unwrap(model)
                inner.config.save(tmp)
                msd = {k: v.contiguous() for k, v in msd.items()}
                if inner.config.text.tie_word_embeddings:
                    msd.pop("language_model.lm_head.weight", None)
                save_file(msd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
                blob = {"optimizer": osd, "scheduler": scheduler.state_dict(), "state": state,
                        "rng": _rng_state()}
                blob.update(extra or {})
                torch.save(blob, os.path.join(tmp, "trainer_state.pt"))
                _fsync_tree(tmp)
                if os.path.exists(directory):
                    if os.path.exists(old):
                        shutil.rmtree(old)
                    os.replace(directory, old)  # the old one stays whole until the new one is in
                    os.replace(tmp, directory)
                    shutil.rmtree(old)
                else:
                    os.replace(tmp, directory)
                _fsync_dir(os.path.dirname(os.path.abspath(directory)))
            except Exception as e:  # noqa: BLE001 - reported with the path, then raised on every rank
                shutil.rmtree(tmp, ignore_errors=True)
                if os.path.exists(old) and not os.path.exists(directory):
                    os.replace(old, directory)
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                error = CheckpointError(f"could not write checkpoint {directory} ({type(e).__name__}: {why}); "
                                        "the temp dir was removed and earlier checkpoints are untouched")
                error.__cause__ = e
    if dist.is_initialized():
        # every rank learns whether rank 0's save failed, so they stop together instead of hanging
        flag = [type(error).__name__ if error is not None else None, str(error) if error is not None else None]
        dist.broadcast_object_list(flag, src=0)
        if error is None and flag[0] is not None:
            error = (NonFiniteError if flag[0] == "NonFiniteError" else CheckpointError)(flag[1])
    if error is not None:
        raise error


def _recover_checkpoints(output_dir: str):
    """Finish or undo an interrupted save: ``checkpoint-N.old`` whose ``checkpoint-N`` is missing is
    moved back; stale ``.old`` / ``.tmp`` dirs are removed (rank 0 only)."""
    if dist_info()[0] != 0 or not os.path.isdir(output_dir):
        return
    for d in os.listdir(output_dir):
        m = re.fullmatch(r"(checkpoint-\d+)\.(old|tmp)", d)
        if not m:
            continue
        full, target = os.path.join(output_dir, d), os.path.join(output_dir, m.group(1))
        if m.group(2) == "old" and not os.path.exists(target):
            os.replace(full, target)
            log.warning("restored %s (a re-save of that step was interrupted)", target)
        else:
            shutil.rmtree(full, ignore_errors=True)


def _checkpoint_steps(output_dir: str) -> List[int]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    _recover_checkpoints(output_dir)
    steps = _checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def prune_checkpoints(output_dir: str, keep: int):
    """Delete the oldest ``checkpoint-N`` dirs beyond the newest ``keep`` (rank 0; 0 keeps all)."""
    if keep <= 0 or dist_info()[0] != 0:
        return
    for step in _checkpoint_steps(output_dir)[:-keep]:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        shutil.rmtree(path, ignore_errors=True)
        log.info("save_total_limit %d: removed %s", keep, path)


def check_checkpoint_files(directory: str):
    """Raise :class:`CheckpointError` naming the file and what is wrong (missing dir / file, bad JSON,
    truncated or foreign safetensors), before anything is built from the checkpoint."""
    from ..models.llavit import CONFIG_NAME, WEIGHTS_NAME

    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint {directory}: no such directory")
    cfg_path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing (not a LLaViT checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    w_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(w_path):
        raise CheckpointError(f"{w_path}: missing")
    try:
        from safetensors import safe_open

        with safe_open(w_path, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{w_path}: not a readable safetensors file, truncated or corrupt "
                              f"({os.path.getsize(w_path)} bytes; {e})") from None
    return cfg


def _config_diff(saved: dict, current: dict, prefix="") -> List[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{k}: checkpoint {a!r}, this run {b!r}")
    return out


def load_checkpoint(directory, model, optimizer, scheduler, return_blob: bool = False):
    """Load weights, optimizer, scheduler and RNG; return the trainer state (and the whole blob).

    Refuses (ValueError) a checkpoint whose model config differs from ``model``'s (e.g. resuming a
    bidirectional run with ``--no-bidirectional``)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from ..models.llavit import WEIGHTS_NAME

    inner = unwrap(model)
    saved_cfg = check_checkpoint_files(directory)
    diff = _config_diff(json.loads(json.dumps(saved_cfg)), json.loads(json.dumps(inner.config.to_dict())))
    if diff:
        raise ValueError(f"resume: {directory} holds a different model architecture than this run: "
                         + "; ".join(diff) + ". Use the checkpoint's settings, or start a new --output-dir "
                         "(with --init-from to start from its weights)")
    state_path = os.path.join(directory, "trainer_state.pt")
    try:
        blob = torch.load(state_path, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing (a model-only checkpoint cannot be resumed; use --init-from)") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{state_path}: unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None
    msd = load_file(os.path.join(directory, WEIGHTS_NAME))
    if inner.config.text.tie_word_embeddings:
        msd["language_model.lm_head.weight"] = msd["language_model.model.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(inner, msd, options=opts)
    if blob["optimizer"] is not None:
        set_optimizer_state_dict(inner, optimizer, blob["optimizer"], options=opts)
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return (blob["state"], blob) if return_blob else blob["state"]


_ARTIFACT = re.compile(r"checkpoint-\d+(\.tmp|\.old)?|log\.jsonl|log\.json|loss\.png")


def resolve_resume(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """``None`` / ``"auto"`` (the latest checkpoint in output_dir, or a fresh start when there is none) /
    ``"latest"`` (the latest; an error when there is none) / a checkpoint directory."""
    if not resume:
        return None
    if resume in ("auto", "latest"):
        path = latest_checkpoint(output_dir)
        if path is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no checkpoint-N directory in {output_dir}")
        return path
    if not os.path.isdir(resume):
        raise CheckpointError(f"--resume {resume}: no such directory (expected auto, latest or a checkpoint dir)")
    return resume


def checkpoint_bytes(model, n_trainable: int) -> int:
    """Bytes one checkpoint takes: all weights in their dtype + AdamW's two fp32 moments of the trainable ones."""
    weights = sum(p.numel() * p.element_size() for p in unwrap(model).parameters())
    return weights + 2 * 4 * n_trainable + (1 << 20)


def prepare_output_dir(cfg: "TrainConfig", need_bytes: int = 0):
    """Before any work: refuse a non-empty ``output_dir`` without ``resume`` (unless ``overwrite``,
    which removes the earlier run's checkpoints and logs), check it is writable and has
    ``need_bytes`` free (one checkpoint). Every rank checks; rank 0 deletes."""
    out = cfg.output_dir
    rank, world = dist_info()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"output_dir {out}: cannot create it ({e.strerror or e})") from None
    entries = sorted(e for e in os.listdir(out) if not e.startswith(".write-test-"))
    explicit = cfg.resume not in (None, "", "auto", "latest")
    if entries and explicit and not cfg.overwrite and os.path.isdir(cfg.resume) and not os.path.samefile(
            os.path.dirname(os.path.abspath(cfg.resume)), out):
        raise FileExistsError(f"output_dir {out} is not empty and --resume {cfg.resume} is a checkpoint of another "
                              "directory: resume into an empty --output-dir, or pass --overwrite")
    if entries and not cfg.resume:
        if not cfg.overwrite:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise FileExistsError(f"output_dir {out} is not empty ({shown}): pass --resume auto to continue that run, "
                                  "--overwrite to replace it, or another --output-dir")
        if rank == 0:
            for e in entries:
                if _ARTIFACT.fullmatch(e):
                    full = os.path.join(out, e)
                    shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
            log.warning("--overwrite: removed the earlier run's checkpoints and logs from %s", out)
    probe = os.path.join(out, f".write-test-{rank}-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"output_dir {out}: not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes:
        raise CheckpointError(f"output_dir {out}: {free / 2**30:.2f} GiB free, one checkpoint needs about "
                              f"{need_bytes / 2**30:.2f} GiB")
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------ logging
def plot_losses(history: List[dict], path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    by_stage = {}
    for h in history:
        if h.get("loss") is not None:  # a skipped non-finite step has no loss
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


def _json_safe(value):
    """Strict JSON: non-finite floats become null (``json.dumps`` would write a bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dumps_strict(obj, **kw) -> str:
    return json.dumps(_json_safe(obj), allow_nan=False, **kw)


class _StopSignals:
    """SIGTERM / SIGINT set a flag that the loop reads at the next step boundary (main thread only).
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _ignore_stop_signals(worker_id: int):
    """DataLoader workers leave SIGTERM / SIGINT (a Ctrl-C reaches the whole process group) to the
    main process, which stops at the step boundary and then shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _sum_counts(counts: Counter, world: int) -> Counter:
    """Sum per-reason counts over ranks (a collective: every rank calls it)."""
    if world == 1:
        return Counter(counts)
    allc = [None] * world
    dist.all_gather_object(allc, dict(counts))
    out = Counter()
    for c in allc:
        out.update(c)
    return out


def _rewrite_log(path: str, records: List[dict]):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(dumps_strict(r) + "\n")
    os.replace(tmp, path)


def _run_settings(cfg: TrainConfig, n_records: int, world: int) -> dict:
    return {"stage": cfg.stage, "seed": cfg.seed, "num_records": n_records, "data_id": cfg.data_id,
            "packing": cfg.packing, "global_batch": cfg.batch_size * world * cfg.grad_accum,
            "trainable": list(cfg.trainable or STAGE_PATTERNS[cfg.stage])}


def _check_resume_settings(saved: Optional[dict], now: dict, path: str):
    if not saved:
        return
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {now[k]!r}" for k in
            ("stage", "seed", "num_records", "data_id", "trainable") if k in saved and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"resume: {path} was trained with other data / settings: " + "; ".join(diff)
                         + ". Pass the same settings, or start a new --output-dir (with --init-from for its weights)")
    if saved.get("global_batch") != now["global_batch"] or saved.get("packing") != now["packing"]:
        log.warning("resume: global batch %s -> %s, packing %s -> %s: the data position (in samples) is kept, "
                    "the losses will not match an uninterrupted run", saved.get("global_batch"), now["global_batch"],
                    saved.get("packing"), now["packing"])


def _grad_norm(params, max_norm: float) -> float:
    total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(total, "full_tensor"):  # FSDP2: a DTensor
        total = total.full_tensor()
    return float(total)


def train(model, dataset, cfg: TrainConfig, pad_token_id: int = 0, device=None, history: Optional[list] = None,
          tag: str = "") -> dict:
    """Train ``model`` on ``dataset`` (a :class:`SafeDataset`); returns a summary dict.

    Writes ``checkpoint-{step}/`` (every ``save_every`` steps and at the end), ``log.jsonl`` (one
    strict-JSON line per step) and ``loss.png`` under ``cfg.output_dir``. Resumes exactly from a
    checkpoint. The loss of a step is the mean over ALL answer tokens of the global batch (every
    micro-batch of every rank), so 1 process, DDP and FSDP agree on the same global batch.
    """
    cfg.validate()
    rank, world = dist_info()
    device = device or torch.device("cpu")
    _seed_all(cfg.seed)
    patterns = cfg.trainable or STAGE_PATTERNS[cfg.stage]
    groups = param_groups(model, patterns, cfg.lr, cfg.weight_decay)
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    prepare_output_dir(cfg, checkpoint_bytes(model, n_trainable))
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
    params = [p for g in optimizer.param_groups for p in g["params"]]

    settings = _run_settings(cfg, len(dataset), world)
    state = {"step": 0, "skipped": {}, "tokens": 0, "stage": cfg.stage, "samples": 0, "nonfinite_steps": 0,
             "run": settings}
    resume = resolve_resume(cfg.output_dir, cfg.resume)
    past: List[dict] = []  # this run's log records before the resume point
    if resume:
        state, blob = load_checkpoint(resume, wrapped, optimizer, scheduler, return_blob=True)
        _check_resume_settings(state.get("run"), settings, resume)
        if "samples" not in state:  # a checkpoint from before samples were counted
            state["samples"] = state["step"] * cfg.grad_accum * cfg.batch_size * world
        state.setdefault("nonfinite_steps", 0)
        state["run"] = settings
        past = list(blob.get("log", []))
        if rank == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", resume, state["step"], state["samples"])
    elif cfg.resume == "auto" and rank == 0:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", cfg.output_dir)
    history = history if history is not None else []
    seen = {(h.get("stage"), h.get("step"), h.get("tag")) for h in history}
    history.extend(r for r in past if r.get("loss") is not None and (r.get("stage"), r["step"], r.get("tag")) not in seen)
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    if rank == 0:  # the log holds exactly the steps of the checkpoint we continue from (none for a fresh run)
        _rewrite_log(log_path, [r for r in past if r["step"] % cfg.log_every == 0 or r.get("nonfinite")])
    records = list(past)  # saved in every checkpoint

    gstride = cfg.batch_size * world
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, state["samples"], None, rank, world)
    loader = DataLoader(_Tagged(dataset), batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=_Collate(cfg.packing, pad_token_id),
                        worker_init_fn=_ignore_stop_signals if cfg.num_workers else None,
                        # the loader's own generator: its per-iterator seed draw must not advance the
                        # global torch generator restored from the checkpoint
                        generator=torch.Generator().manual_seed(cfg.seed))
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    base_skipped = Counter(state.get("skipped", {}))  # summed over ranks, up to the checkpoint
    local_skipped = Counter()  # this rank, since this call started
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=tag or f"stage {cfg.stage}", dynamic_ncols=True,
                   mininterval=1.0)
    wrapped.train()
    last_loss = None
    # the step whose checkpoint in output_dir holds the current weights (no re-save needed)
    saved_at = state["step"] if resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)),
                                                            cfg.output_dir) else None
    samples = state["samples"]

    def save(step_state):
        nonlocal saved_at
        step_state["skipped"] = dict(base_skipped + _sum_counts(local_skipped, world))
        path = os.path.join(cfg.output_dir, f"checkpoint-{step_state['step']}")
        save_checkpoint(path, wrapped, optimizer, scheduler, step_state, extra={"log": records})
        saved_at = step_state["step"]
        prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
        return path

    it = iter(loader)
    unusable = 0  # samples consumed since the last usable micro-batch
    t0 = time.perf_counter()
    with _StopSignals() as stop:
        try:
            while state["step"] < cfg.max_steps:
                # one optimizer step's micro-batches (ranks skip a micro-batch together when one has none)
                pending = []
                while len(pending) < cfg.grad_accum:
                    batch, reasons = next(it)
                    samples += gstride
                    local_skipped.update(reasons)
                    if not _batch_on_every_rank(batch, world, device):
                        log.warning("micro-batch with no usable sample (on this or another rank) skipped")
                        unusable += gstride
                        if unusable > len(dataset) + gstride:  # a whole pass without one usable micro-batch
                            raise RuntimeError(
                                f"no usable micro-batch in the last {unusable} samples (more than one pass over "
                                f"the {len(dataset)} records): every record is being skipped on some rank "
                                f"(this rank's skips by reason: {dict(local_skipped)}); check the data, "
                                "--image-root, --max-length and the tokenizer")
                        continue
                    unusable = 0
                    pending.append(batch)
                n_local = sum(num_target_tokens(b) for b in pending)
                flags = torch.tensor([n_local, stop.signum], dtype=torch.float64, device=device)
                if world > 1:  # the global token count, and whether any rank was asked to stop
                    dist.all_reduce(flags)
                n_global, signum = int(flags[0]), int(flags[1])
                if signum:
                    signum = stop.signum or (signal.SIGTERM if signum >= signal.SIGTERM else signal.SIGINT)
                    path = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
                    if state["step"] > 0 and saved_at != state["step"]:
                        path = save(state)
                    elif state["step"] == 0:
                        path = None
                    msg = (f"stopped by {signal.Signals(signum).name} at step {state['step']}"
                           + (f"; checkpoint {path} (continue with --resume auto)" if path else "; nothing to save"))
                    if rank == 0:
                        log.error(msg)
                    saved_at = state["step"]
                    raise TrainingInterrupted(msg, signum, path)
                if n_global == 0:
                    log.warning("a step with no answer token on any rank skipped")
                    state["samples"] = samples
                    continue
                loss_sum = 0.0
                tok_acc = 0
                for batch in pending:
                    n_b = num_target_tokens(batch)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast():
                        _, loss = wrapped(**batch)
                    # loss is this micro-batch's mean over its n_b answer tokens; the step's loss is the sum over
                    # all of them / n_global. DDP / FSDP average gradients over ranks, hence the factor world.
                    (loss * (n_b * world / n_global)).backward()
                    loss_sum += float(loss.detach()) * n_b
                    tok_acc += int(batch["input_ids"].numel() if "cu_seqlens" in batch else batch["attention_mask"].sum())
                if world > 1:
                    t = torch.tensor([loss_sum, tok_acc], dtype=torch.float64, device=device)
                    dist.all_reduce(t)
                    loss_sum, tok_acc = float(t[0]), int(t[1])
                step_loss = loss_sum / n_global
                gnorm = _grad_norm(params, cfg.max_grad_norm)
                if not (math.isfinite(step_loss) and math.isfinite(gnorm)):
                    optimizer.zero_grad(set_to_none=True)
                    state["nonfinite_steps"] += 1
                    rec = {"stage": cfg.stage, "step": state["step"] + 1, "loss": None, "grad_norm": None,
                           "nonfinite": True, "tag": tag}
                    records.append(rec)
                    what = f"loss {step_loss} / grad norm {gnorm} at step {state['step'] + 1}"
                    if rank == 0:
                        with open(log_path, "a") as f:
                            f.write(dumps_strict(rec) + "\n")
                    if state["nonfinite_steps"] > cfg.max_bad_steps:
                        last = latest_checkpoint(cfg.output_dir) if rank == 0 else None
                        raise NonFiniteError(
                            f"non-finite {what}: stopping (lower --lr, check the data, or allow skipped steps with "
                            f"--max-bad-steps). Nothing non-finite was saved; the last good checkpoint is "
                            f"{last or 'none'}")
                    log.warning("non-finite %s: step skipped (%d of at most %d)", what, state["nonfinite_steps"],
                                cfg.max_bad_steps)
                    state["samples"] = samples
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["samples"] = samples
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                state["tokens"] += tok_acc
                last_loss = step_loss
                rec = {"stage": cfg.stage, "step": state["step"], "loss": round(step_loss, 5),
                       "grad_norm": round(gnorm, 5), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": round(tok_acc / max(dt, 1e-9), 1), "tag": tag}
                history.append(rec)
                records.append(rec)
                if rank == 0:
                    if state["step"] % cfg.log_every == 0:
                        with open(log_path, "a") as f:
                            f.write(dumps_strict(rec) + "\n")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < cfg.max_steps:
                    save(state)
        except BaseException as e:
            # Keep the progress made so far, then re-raise (Ctrl-C, a bad batch, an OOM...). Not after a
            # failed save (the disk is the problem), a non-finite step (nothing bad is saved) or a signal
            # stop (already saved), and not under torchrun (other ranks may be inside a collective).
            if (world == 1 and state["step"] > 0 and saved_at != state["step"]
                    and not isinstance(e, (CheckpointError, NonFiniteError, TrainingInterrupted))):
                path = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
                log.error("training interrupted at step %d (%s); saving %s", state["step"], type(e).__name__, path)
                try:
                    save(state)
                except Exception as save_error:  # noqa: BLE001 - report, keep the original exception
                    log.error("the emergency save failed too: %s", save_error)
            raise
        finally:
            if bar is not None:
                bar.close()
        if saved_at != state["step"]:
            save(state)
    skipped = Counter(state["skipped"])
    if rank == 0:
        if sum(skipped.values()):
            log.warning("skipped %d bad samples: %s", sum(skipped.values()), dict(skipped))
        if cfg.plot and history:
            plot_losses(history, os.path.join(cfg.output_dir, "loss.png"), tag)
    return {"step": state["step"], "final_loss": last_loss, "skipped": dict(skipped), "tokens": state["tokens"],
            "samples": state["samples"], "nonfinite_steps": state["nonfinite_steps"],
            "trainable_params": n_trainable, "parallel": mode, "history": history, "config": asdict(cfg)}

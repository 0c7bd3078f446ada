"""The paper's training recipe (LLaViT follows LLaVA-1.5) as per-stage defaults, and the derivations
that turn a data size, a global batch and a world size into steps, warm-up, per-device batch and
gradient accumulation.

LLaVA-1.5 (which LLaViT, arXiv 2511.10301, follows for both stages):

=========================  ==========================  ==============================
                           stage 1 (pre-training)      stage 2 (instruction tuning)
=========================  ==========================  ==============================
trainable                  projector + image q/k/v     projector + image q/k/v + LLM
learning rate              1e-3 (all trainable groups) 2e-5 (all trainable groups)
global batch               256                         128
epochs                     1                           1
schedule                   linear warm-up over 3% of the steps, then cosine to 0
weight decay               0                           0
=========================  ==========================  ==============================

The image q/k/v group: LLaViT trains it from stage 1 on (it is new, copied from the text q/k/v, like
the projector is new), so in stage 1 it takes the stage's learning rate 1e-3 together with the
projector; in stage 2 everything trainable takes 2e-5. Give a group its own rate with
``--trainable '_proj_image\\.=LR'``.

A ``--batch-size`` given without ``--global-batch-size`` is taken as it is (global batch =
batch-size x grad-accum (default 1) x ranks); give ``--global-batch-size`` to have the accumulation
derived. Precedence: an explicit ``--max-steps`` / ``--warmup-steps`` / ``--lr`` / ``--batch-size`` /
``--grad-accum`` / ``--min-lr-ratio`` wins over the recipe; anything left unset comes from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["StageRecipe", "PAPER_RECIPE", "steps_for_epochs", "warmup_steps_for", "split_global_batch",
           "resolve_schedule"]


@dataclass(frozen=True)
class StageRecipe:
    lr: float
    global_batch_size: int
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to 0
    weight_decay: float = 0.0
    max_per_device_batch: int = 16  # the largest per-device micro-batch chosen when none is given


PAPER_RECIPE = {
    1: StageRecipe(lr=1e-3, global_batch_size=256, max_per_device_batch=32),
    2: StageRecipe(lr=2e-5, global_batch_size=128, max_per_device_batch=16),
}


def steps_for_epochs(num_samples: int, epochs: float, per_device_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``num_samples``.

    A pass is ``num_samples // (per_device_batch * world_size)`` micro-batches (the trainer's batch
    sampler drops the last partial micro-batch of an epoch); the optimizer steps round up, so every
    sample of the requested epochs is seen (the last step may take a few from the next pass).
    """
    for name, v in (("num_samples", num_samples), ("per_device_batch", per_device_batch),
                    ("world_size", world_size), ("grad_accum", grad_accum)):
        if int(v) < 1:
            raise ValueError(f"{name}: expected >= 1, got {v}")
    if not epochs > 0:
        raise ValueError(f"epochs: expected > 0, got {epochs}")
    micro_per_epoch = num_samples // (per_device_batch * world_size)
    if micro_per_epoch < 1:
        raise ValueError(f"num_samples: {num_samples} samples do not fill one micro-batch of "
                         f"{per_device_batch} x {world_size} ranks")
    return max(1, math.ceil(epochs * micro_per_epoch / grad_accum - 1e-9))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """``ceil(ratio * total)`` as in Hugging Face's Trainer (LLaVA-1.5's ``--warmup_ratio 0.03``)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio: expected a value in [0, 1), got {warmup_ratio}")
    return int(math.ceil(warmup_ratio * total_steps))


def split_global_batch(global_batch: int, world_size: int, per_device_batch: Optional[int] = None,
                       max_per_device_batch: int = 16) -> Tuple[int, int]:
    """``(per_device_batch, grad_accum)`` with ``per_device_batch * world_size * grad_accum == global_batch``.

    Without ``per_device_batch``, the largest divisor of ``global_batch / world_size`` that is at most
    ``max_per_device_batch`` (fewest accumulation steps within the memory cap).
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"global_batch_size / world_size: expected >= 1, got {global_batch} / {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global_batch_size: expected a multiple of the world size {world_size}, got {global_batch}")
    per_rank = global_batch // world_size
    if per_device_batch is None:
        cap = max(1, min(per_rank, max_per_device_batch))
        per_device_batch = max(d for d in range(1, cap + 1) if per_rank % d == 0)
    if per_device_batch < 1 or per_rank % per_device_batch:
        raise ValueError(f"batch_size: expected a divisor of global_batch_size / world_size = {global_batch} / "
                         f"{world_size} = {per_rank}, got {per_device_batch}")
    return per_device_batch, per_rank // per_device_batch


def resolve_schedule(stage: int, num_samples: int, world_size: int = 1, *, lr: Optional[float] = None,
                     epochs: Optional[float] = None, max_steps: Optional[int] = None,
                     global_batch_size: Optional[int] = None, batch_size: Optional[int] = None,
                     grad_accum: Optional[int] = None, warmup_steps: Optional[int] = None,
                     warmup_ratio: Optional[float] = None, min_lr_ratio: Optional[float] = None,
                     weight_decay: Optional[float] = None) -> dict:
    """The TrainConfig fields of one stage: the recipe's values, overridden by any argument given.

    The batch: ``global_batch_size`` (default: the recipe's) is split into per-device batch x world
    x accumulation; giving ``batch_size`` (and optionally ``grad_accum``, default 1) without
    ``global_batch_size`` uses them as they are (global = their product x world). Steps: ``max_steps`` if given, else ``epochs``
    (default 1) passes over ``num_samples``. Returns a dict with ``lr``, ``max_steps``,
    ``batch_size``, ``grad_accum``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay`` and, for
    the record, ``global_batch_size``, ``epochs`` and ``warmup_ratio``.
    """
    if stage not in PAPER_RECIPE:
        raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
    r = PAPER_RECIPE[stage]
    if global_batch_size is None and batch_size is not None:
        # a per-device batch given without a global one is taken as is (accumulation 1 unless given)
        global_batch_size = batch_size * (1 if grad_accum is None else grad_accum) * world_size
    gbs = r.global_batch_size if global_batch_size is None else int(global_batch_size)
    if grad_accum is not None and batch_size is None:
        if gbs % (grad_accum * world_size):
            raise ValueError(f"grad_accum: {grad_accum} x world {world_size} does not divide global_batch_size {gbs}")
        batch_size = gbs // (grad_accum * world_size)
    bs, accum = split_global_batch(gbs, world_size, batch_size, r.max_per_device_batch)
    ep = r.epochs if epochs is None else float(epochs)
    steps = int(max_steps) if max_steps is not None else steps_for_epochs(num_samples, ep, bs, world_size, accum)
    if steps < 1:
        raise ValueError(f"max_steps: expected >= 1, got {steps}")
    ratio = r.warmup_ratio if warmup_ratio is None else float(warmup_ratio)
    return {
        "lr": r.lr if lr is None else float(lr),
        "max_steps": steps,
        "batch_size": bs,
        "grad_accum": accum,
        "warmup_steps": warmup_steps_for(steps, ratio) if warmup_steps is None else int(warmup_steps),
        "min_lr_ratio": r.min_lr_ratio if min_lr_ratio is None else float(min_lr_ratio),
        "weight_decay": r.weight_decay if weight_decay is None else float(weight_decay),
        "global_batch_size": gbs,
        "epochs": None if max_steps is not None else ep,
        "warmup_ratio": None if warmup_steps is not None else ratio,
    }

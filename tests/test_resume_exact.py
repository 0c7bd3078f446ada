"""Exact resume, step by step: the learning-rate schedule and every random number generator the trainer
owns continue after a checkpoint round trip exactly as in the uninterrupted run.

(tests/test_train.py checks the next losses after a resume; these pin what that check missed: a
scheduler that is not restored shows first in the logged lr and only a step later in the loss, and
a global RNG that is not restored shows only once something draws from it, e.g. dropout or
augmentation.)
"""

import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from llavit_kernels.data import SYNTHETIC_WORDS, SafeDataset, SampleProcessor, WordTokenizer, synthetic_samples  # noqa: E402
from llavit_kernels.train import TrainConfig, train  # noqa: E402
from llavit_kernels.train.demo import DemoSize, build_tiny  # noqa: E402

SIZE = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


def _cfg(out, **kw):
    # warm-up 2 then cosine over 6 steps: the lr changes at every step, so a schedule that restarts shows at once
    base = dict(output_dir=str(out), stage=2, max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, progress=False,
                plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_every_step_lr_and_loss(tok, tmp_path):
    """Six steps straight vs two steps, checkpoint, then four more from the checkpoint in a fresh model:
    the logged learning rate and loss of every step after the resume point are the uninterrupted run's."""
    ds = SafeDataset(synthetic_samples(32, 1, 2, SIZE.image_size), SampleProcessor(tok, SIZE.image_size, 16, 128))
    straight = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "a", save_every=2), pad_token_id=0)
    resumed = train(build_tiny(tok, SIZE, seed=123), ds,
                    _cfg(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2")), pad_token_id=0)
    want = [h for h in straight["history"] if h["step"] > 2]
    got = [h for h in resumed["history"] if h["step"] > 2]  # (the history may also carry the checkpoint's steps)
    assert [h["step"] for h in got] == [3, 4, 5, 6] == [h["step"] for h in want]
    lrs = [h["lr"] for h in straight["history"]][1:]  # steps 2..6 (the lr logged after each step)
    assert len(set(lrs)) == len(lrs), f"the schedule must change the lr at every step from the resume point: {lrs}"
    for w, g in zip(want, got):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12), f"step {w['step']}: lr {g['lr']} vs {w['lr']}"
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6), f"step {w['step']}: loss"


class RecordingDataset(SafeDataset):
    """Draws from every global generator on each sample (as augmentation would) and records the draws
    with the sample index (the data order comes from the trainer's sampler generators)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws = []

    def __getitem__(self, i):
        draw = (int(i), torch.rand(()).item(), random.random(), float(np.random.rand()))
        if torch.cuda.is_available():
            draw += (torch.rand((), device="cuda").item(),)
        self.draws.append(draw)
        return super().__getitem__(i)


def test_checkpoint_restores_every_rng_the_trainer_owns(tok, tmp_path):
    """torch (CPU and CUDA), Python's random, numpy and the data order: the draws after a resume equal the
    uninterrupted run's, whatever state the process was in before the resumed run started."""
    records = synthetic_samples(16, 1, 2, SIZE.image_size)
    proc = SampleProcessor(tok, SIZE.image_size, 16, 128)
    cfg = dict(max_steps=4, batch_size=2, warmup_steps=1)
    straight_ds = RecordingDataset(records, proc)
    train(build_tiny(tok, SIZE), straight_ds, _cfg(tmp_path / "a", save_every=2, **cfg), pad_token_id=0)
    per_step = cfg["batch_size"]
    assert len(straight_ds.draws) == 4 * per_step

    # a different process state before the resumed run: nothing may leak from it
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    resumed_ds = RecordingDataset(records, proc)
    train(build_tiny(tok, SIZE, seed=7), resumed_ds,
          _cfg(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"), **cfg), pad_token_id=0)
    want = straight_ds.draws[2 * per_step:]
    names = ["sample index", "torch", "random", "numpy", "torch.cuda"]
    assert len(resumed_ds.draws) == len(want)
    for n, (g, w) in enumerate(zip(resumed_ds.draws, want)):
        for name, a, b in zip(names, g, w):
            assert a == b, f"draw {n} after the resume: {name} gives {a}, the uninterrupted run {b}"
    # and the generators really were exercised (the draws are not all equal)
    assert len({d[1] for d in straight_ds.draws}) == len(straight_ds.draws)

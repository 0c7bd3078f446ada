"""The paper's recipe (LLaVA-1.5 schedule) as defaults: derivations, the LR schedule, pad-to-square."""

import math

import pytest
import torch

from llavit_kernels.data.datasets import CLIP_MEAN, CLIP_STD, clip_preprocess
from llavit_kernels.train.recipe import (PAPER_RECIPE, resolve_schedule, split_global_batch, steps_for_epochs,
                                         warmup_steps_for)
from llavit_kernels.train.trainer import TrainConfig, lr_lambda


def test_paper_recipe_values():
    assert PAPER_RECIPE[1].lr == 1e-3 and PAPER_RECIPE[2].lr == 2e-5
    assert PAPER_RECIPE[1].global_batch_size == 256 and PAPER_RECIPE[2].global_batch_size == 128
    for r in PAPER_RECIPE.values():
        assert r.warmup_ratio == 0.03 and r.min_lr_ratio == 0.0 and r.epochs == 1.0
    assert TrainConfig().min_lr_ratio == 0.0  # cosine to 0 by default


def test_llava_stage_steps_from_data_size():
    # LLaVA-1.5 stage 1: 558k captions / 256 on 8 GPUs x 32; stage 2: 665k / 128 on 8 x 16
    s1 = resolve_schedule(1, 558_128, world_size=8)
    assert (s1["batch_size"], s1["grad_accum"], s1["lr"]) == (32, 1, 1e-3)
    assert s1["max_steps"] == 558_128 // 256 and s1["warmup_steps"] == math.ceil(0.03 * s1["max_steps"])
    s2 = resolve_schedule(2, 665_298, world_size=8)
    assert (s2["batch_size"], s2["grad_accum"], s2["lr"], s2["min_lr_ratio"]) == (16, 1, 2e-5, 0.0)
    assert s2["max_steps"] == 665_298 // 128 == 5197
    # one GPU: same global batch through accumulation
    s2_1 = resolve_schedule(2, 665_298, world_size=1)
    assert s2_1["batch_size"] * s2_1["grad_accum"] == 128 and s2_1["batch_size"] <= 16
    assert s2_1["max_steps"] == math.ceil((665_298 // 16) / 8) == 5198  # the last step spills into a 2nd pass


def test_explicit_arguments_win():
    r = resolve_schedule(2, 1000, world_size=2, lr=1e-4, max_steps=7, warmup_steps=2, global_batch_size=8, batch_size=2)
    assert (r["lr"], r["max_steps"], r["warmup_steps"], r["batch_size"], r["grad_accum"]) == (1e-4, 7, 2, 2, 2)
    r = resolve_schedule(1, 1000, batch_size=4, grad_accum=3)  # no global batch: taken as given
    assert (r["batch_size"], r["grad_accum"], r["global_batch_size"]) == (4, 3, 12)
    assert r["max_steps"] == math.ceil((1000 // 4) / 3)
    r = resolve_schedule(2, 1000, world_size=2, batch_size=4)  # a per-device batch alone: accumulation 1
    assert (r["batch_size"], r["grad_accum"], r["global_batch_size"], r["max_steps"]) == (4, 1, 8, 125)
    r = resolve_schedule(1, 1000, global_batch_size=32, epochs=2.5)
    assert r["max_steps"] == math.ceil(2.5 * (1000 // r["batch_size"]) / r["grad_accum"])


@pytest.mark.parametrize("gbs,world,pdb,want", [(256, 8, None, (32, 1)), (128, 1, None, (16, 8)), (96, 4, None, (12, 2)),
                                                 (12, 1, 12, (12, 1)), (12, 2, 3, (3, 2))])
def test_split_global_batch(gbs, world, pdb, want):
    got = split_global_batch(gbs, world, pdb, max_per_device_batch=32 if gbs == 256 else 16)
    assert got == want and got[0] * got[1] * world == gbs


def test_bad_batch_arguments_raise_clearly():
    with pytest.raises(ValueError, match="multiple of the world size"):
        split_global_batch(10, 4)
    with pytest.raises(ValueError, match="divisor"):
        split_global_batch(12, 1, 5)
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(100, 0, 4, 1, 1)
    with pytest.raises(ValueError, match="one micro-batch"):
        steps_for_epochs(3, 1, 4, 1, 1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_steps_for(100, 1.5)
    with pytest.raises(ValueError, match="stage"):
        resolve_schedule(3, 100)


def test_schedule_warmup_then_cosine_to_zero():
    total = 200
    warm = warmup_steps_for(total, 0.03)
    assert warm == 6
    f = lr_lambda(warm, total, 0.0)
    vals = [f(s) for s in range(total + 1)]
    assert all(a < b for a, b in zip(vals[:warm], vals[1:warm]))  # linear rise
    assert vals[warm - 1] == pytest.approx(1.0) and vals[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[warm:], vals[warm + 1:]))  # then monotone decay
    assert vals[total] == pytest.approx(0.0, abs=1e-12)
    mid = warm + (total - warm) // 2
    assert vals[mid] == pytest.approx(0.5, abs=0.01)


def test_pad_to_square_with_clip_mean_is_the_default():
    from PIL import Image

    img = Image.new("RGB", (64, 32), (255, 255, 255))  # wide white image
    x = clip_preprocess(img, 24)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    pad = (torch.tensor([int(c * 255) for c in CLIP_MEAN]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 0, 12], pad, atol=0.02, rtol=0)  # top band: padding (about 0 after norm)
    torch.testing.assert_close(x[:, 12, 0], white, atol=0.02, rtol=0)  # nothing cut off left and right
    torch.testing.assert_close(x[:, 12, 23], white, atol=0.02, rtol=0)
    y = clip_preprocess(img, 24, aspect="crop")  # centre crop: all white
    torch.testing.assert_close(y[:, 0, 12], white, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="aspect"):
        clip_preprocess(img, 24, aspect="stretch")


def test_cli_epochs_and_global_batch_then_eval_the_run_dir(tmp_path, capsys):
    """`train --epochs 1 --global-batch-size 16 --batch-size 8` on 32 samples: 2 accumulation steps per
    optimizer step, 2 steps; warm-up ceil(3% x 2) = 1; `eval --checkpoint RUN_DIR` finds its checkpoint."""
    import json

    from llavit_kernels.train.__main__ import main

    out = tmp_path / "run"
    main(["train", "--tiny", "--stage", "1", "--num-samples", "32", "--epochs", "1", "--global-batch-size", "16",
          "--batch-size", "8", "--no-progress", "--output-dir", str(out)])
    log = json.load(open(out / "log.json"))
    cfg = log["config"]
    assert (log["step"], cfg["batch_size"], cfg["grad_accum"], cfg["warmup_steps"]) == (2, 8, 2, 1)
    assert (cfg["lr"], cfg["min_lr_ratio"]) == (1e-3, 0.0)  # stage 1 of the recipe
    capsys.readouterr()
    main(["eval", "--checkpoint", str(out), "--num", "6", "--output", str(tmp_path / "ev.json")])
    assert json.load(open(tmp_path / "ev.json"))["n"] == 6
    with pytest.raises(SystemExit, match="neither a checkpoint"):
        main(["eval", "--checkpoint", str(tmp_path), "--num", "6"])

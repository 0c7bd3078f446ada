"""The CPU miniature: its data, pre-trained parts, the control row's mask, the table and verdict."""

import json
import os

import pytest
import torch

from llavit_kernels.data import SYNTHETIC_WORDS, WordTokenizer
from llavit_kernels.data.synthetic import (FACTS, PAIRS, QUESTION_KINDS, caption, make_scene, scene_batch,
                                           synthetic_samples, text_samples)
from llavit_kernels.layout import SpanLayout
from llavit_kernels.models.llavit import block_image_to_image
from llavit_kernels.train.demo import (QUICK, VARIANTS, DemoSize, build_tiny, group_accuracy, main_demo, verdict)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


def test_scenes_captions_and_questions(tok):
    import random

    for i in range(50):
        shapes = make_scene(random.Random(i), 5)
        assert 1 <= len(shapes) <= 5
        assert len({(s.colour, s.kind) for s in shapes}) == len(shapes)  # every object named uniquely
        assert len({(s.row, s.col) for s in shapes}) == len(shapes)
        cap = caption(shapes)
        assert cap.count(",") == len(shapes) - 1 and all(f"{s.colour} {s.kind} {s.digit}" in cap for s in shapes)
    samples = synthetic_samples(60, 3, 2, 48) + synthetic_samples(5, 3, 1, 48) + text_samples(60, 3)
    for s in samples:  # every word is in the vocabulary
        for turn in s["conversations"]:
            assert tok.unk_token_id not in tok.encode(turn["value"]), turn["value"]
    t = text_samples(40, 1)
    assert all("image" not in s for s in t) and {"copy", "knowledge"} <= {s["kind"] for s in t}
    assert {q for q, _ in FACTS} >= {s["conversations"][0]["value"].split("\n")[-1] for s in t if s["kind"] == "knowledge"}


def test_ocr_answer_is_drawn_on_the_object():
    """The digit is really in the pixels: the ink pattern inside the named object differs by digit."""
    import random

    from llavit_kernels.data.synthetic import Shape, render

    imgs = []
    for d in ("1", "8"):
        s = Shape("square", "red", "big", 1, 1, d, 0.5, 0.5)
        imgs.append(render([s], 48, random.Random(0)).int())
    centre = (slice(None), slice(20, 28), slice(20, 28))
    assert (imgs[0][centre] - imgs[1][centre]).abs().sum() > 2000


def test_scene_batch_labels():
    images, pairs, counts = scene_batch(20, 0, 48)
    assert images.shape == (20, 3, 48, 48) and images.dtype == torch.uint8
    assert pairs.shape == (20, len(PAIRS)) and torch.equal(pairs.sum(1).long(), counts + 1)


def test_block_image_to_image_layout_and_model(tok):
    is_image = torch.tensor([[0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    base = SpanLayout.from_image_mask(is_image, torch.tensor([[1, 1, 1, 1, 1, 1]]))
    m = block_image_to_image(base).dense_mask()[0]
    want = base.dense_mask()[0].clone()
    for q in (1, 2, 3):
        want[q] = False
        want[q, q] = True
    assert torch.equal(m, want)
    # model level: in the control, an image token's LLM output does not depend on the other image tokens
    size = DemoSize(image_size=16, patch_size=8, vision_hidden=16, vision_layers=2, text_hidden=32, text_layers=2)
    ids = torch.tensor([[tok.vocab["<user>"]] + [tok.image_token_id] * 4 + [tok.vocab["what"], tok.vocab["?"]]])
    feats = torch.randn(1, 1, 4, 32).repeat(2, 1, 1, 1)
    feats[1, :, 0] += 3.0  # the two inputs differ in the first image token only
    for control in (True, False):
        model = build_tiny(tok, size, 0, block_image_to_image=control).eval()
        outs = []
        for i in range(2):
            model.image_features = lambda pv, f=feats[i]: f  # bypass the vision tower (it mixes patches)
            outs.append(model(ids, torch.zeros(1, 3, 16, 16))[0])
        later_image_tokens_same = torch.allclose(outs[0][0, 2:5], outs[1][0, 2:5], atol=1e-5)
        assert later_image_tokens_same == control
        assert not torch.allclose(outs[0][0, 5:], outs[1][0, 5:], atol=1e-5)  # text still sees the image


def test_group_accuracy_and_verdict():
    ev = {"per_kind": {"count": 0.5, "shape": 1.0}, "count_per_kind": {"count": 100, "shape": 100}}
    p, se, n = group_accuracy(ev, ("count", "shape", "size"))
    assert n == 200 and p == pytest.approx(0.75) and se == pytest.approx((0.75 * 0.25 / 200) ** 0.5)
    vc = ("count", "relation", "size", "shape")
    good = {"per_kind": {k: 0.9 for k in vc}, "count_per_kind": {k: 100 for k in vc}}
    low = {"per_kind": {k: 0.4 for k in vc}, "count_per_kind": {k: 100 for k in vc}}
    rows = lambda ctrl: [{"variant": n, "eval_stage2": (ctrl if n.startswith("control") else good)} for n in VARIANTS]
    assert "drops sharply" in verdict(rows(low)) and "CAN see" in verdict(rows(low))
    assert "cannot detect" in verdict(rows(good))


def test_quick_demo_end_to_end_and_cache(tmp_path):
    size = DemoSize(**{**QUICK.__dict__, "n_heldout": 12, "n_text_heldout": 6})
    summary = main_demo(str(tmp_path), variants=["LLaVA-1.5 baseline", "control: LLaViT, image-to-image blocked"],
                        progress=False, size=size)
    assert [r["variant"] for r in summary["results"]] == ["LLaVA-1.5 baseline", "control: LLaViT, image-to-image blocked"]
    for f in ("results.json", "table.md", "loss_curves.png", "accuracy.png", "pretrained/seed0/meta.json"):
        assert os.path.exists(tmp_path / f), f
    table = open(tmp_path / "table.md").read()
    assert "After stage 1" in table and "After stage 2" in table and "verdict" in table and "Text only" in table
    r = summary["results"][0]
    assert set(r["eval_stage2"]["per_kind"]) == set(QUESTION_KINDS) and r["feature_layers"] == [-2]
    assert summary["results"][1]["feature_layers"] == [1, 2]  # 3-block tower: 2 = the penultimate
    assert not summary["pretraining"][0].get("cached")
    again = main_demo(str(tmp_path), variants=["LLaVA-1.5 baseline"], progress=False, size=size)
    assert again["pretraining"][0]["cached"]  # pre-trained parts reused, per seed
    assert again["results"][0]["eval_stage2"] == summary["results"][0]["eval_stage2"]  # deterministic


def test_multi_seed_table(tmp_path):
    """--long's path: several seeds, each with its own pre-trained parts, mean ± s.e. over seeds."""
    size = DemoSize(**{**QUICK.__dict__, "n_heldout": 12, "n_text_heldout": 6, "seeds": 2})
    summary = main_demo(str(tmp_path), variants=["+ multi-layer (= LLaViT)", "control: LLaViT, image-to-image blocked"],
                        progress=False, size=size, seed=3)
    assert len(summary["results_per_seed"]) == 2 and len(summary["verdicts"]) == 2
    for s in (3, 4):
        assert os.path.exists(tmp_path / "pretrained" / f"seed{s}" / "meta.json")
        assert os.path.exists(tmp_path / f"seed{s}" / "multi_layer_llavit" / "history.json")
    table = open(tmp_path / "table.md").read()
    assert "### seed 3" in table and "### seed 4" in table and "mean ± s.e. over 2 seeds" in table
    assert os.path.exists(tmp_path / "accuracy.png") and os.path.exists(tmp_path / "loss_curves.png")

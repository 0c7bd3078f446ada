"""Training: exact resume, crash safety, packed == padded training, CLI, 2-process DDP / FSDP2 (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from llavit_kernels.data import SYNTHETIC_WORDS, SafeDataset, SampleProcessor, WordTokenizer, synthetic_samples  # noqa: E402
from llavit_kernels.train import TrainConfig, train  # noqa: E402
from llavit_kernels.train.demo import DemoSize, build_tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


def _dataset(tok, n=48, stage=2, records=None):
    proc = SampleProcessor(tok, SIZE.image_size, 16, 128)
    return SafeDataset(records or synthetic_samples(n, 1, stage, SIZE.image_size), proc)


def _cfg(out, **kw):
    base = dict(output_dir=str(out), stage=2, max_steps=4, batch_size=6, lr=3e-3, warmup_steps=1, progress=False,
                plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_the_same_next_step_loss(tok, tmp_path):
    ds = _dataset(tok)
    straight = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "a", save_every=2, grad_accum=2), pad_token_id=0)
    losses = [h["loss"] for h in straight["history"]]
    assert os.path.isdir(tmp_path / "a" / "checkpoint-2")
    # a fresh process would build a fresh model: use another init to prove the weights come from the checkpoint
    resumed = train(build_tiny(tok, SIZE, seed=123), ds,
                    _cfg(tmp_path / "b", grad_accum=2, resume=str(tmp_path / "a" / "checkpoint-2")), pad_token_id=0)
    r_losses = [h["loss"] for h in resumed["history"]]
    # the history (and so first_loss and loss.png) covers the whole run: steps 1-2 come from the checkpoint
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert r_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0]


def test_resume_auto_picks_latest(tok, tmp_path):
    ds = _dataset(tok, 24)
    train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=2), pad_token_id=0)
    out = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path, max_steps=3, resume="auto"), pad_token_id=0)
    assert [h["step"] for h in out["history"]] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_packed_training_equals_padded(tok, tmp_path):
    ds = _dataset(tok, 24)
    pad = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "pad", max_steps=3), pad_token_id=0)
    pack = train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "pack", max_steps=3, packing=True), pad_token_id=0)
    assert [h["loss"] for h in pack["history"]] == pytest.approx([h["loss"] for h in pad["history"]], rel=1e-4)


def test_stage1_trains_only_projector_and_image_qkv(tok, tmp_path):
    model = build_tiny(tok, SIZE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, _dataset(tok, 12, stage=1), _cfg(tmp_path, stage=1, max_steps=1), pad_token_id=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projector.") or "_proj_image." in k for k in changed)
    assert any("_proj_image." in k for k in changed)


def test_bad_data_is_skipped_and_a_crash_keeps_progress(tok, tmp_path):
    good = synthetic_samples(12, 1, 2, SIZE.image_size)
    bad = [{"id": "nofile", "image": "/does/not/exist.png", "conversations": good[0]["conversations"]}]
    out = train(build_tiny(tok, SIZE), _dataset(tok, records=good + bad), _cfg(tmp_path / "skip", max_steps=4),
                pad_token_id=0)
    assert out["step"] == 4 and out["skipped"].get("missing_image", 0) >= 1

    class Exploding(SafeDataset):
        def __getitem__(self, i):
            if self.calls >= 14:  # a non-data error in the middle of step 3
                raise RuntimeError("boom")
            self.calls += 1
            return super().__getitem__(i)

    ds = Exploding(good, SampleProcessor(tok, SIZE.image_size, 16, 128))
    ds.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        train(build_tiny(tok, SIZE), ds, _cfg(tmp_path / "crash", max_steps=6), pad_token_id=0)
    assert os.path.isdir(tmp_path / "crash" / "checkpoint-2")  # the progress made so far is on disk


def test_cli_train_eval_and_demo(tmp_path, capsys):
    from llavit_kernels.train.__main__ import main

    out = tmp_path / "run"
    main(["train", "--tiny", "--stage", "2", "--max-steps", "2", "--batch-size", "4", "--num-samples", "16",
          "--output-dir", str(out), "--no-progress", "--save-every", "1"])
    log = json.load(open(out / "log.json"))
    assert log["step"] == 2 and os.path.isdir(log["checkpoint"])
    assert os.path.exists(out / "loss.png") and len(open(out / "log.jsonl").readlines()) == 2
    main(["eval", "--checkpoint", log["checkpoint"], "--num", "8", "--output", str(tmp_path / "ev.json")])
    assert json.load(open(tmp_path / "ev.json"))["n"] == 8
    assert "held-out accuracy" in capsys.readouterr().out


def test_demo_small(tmp_path):
    from llavit_kernels.train.demo import main_demo

    size = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2,
                    vit_images=32, vit_steps=2, vit_batch=8, lm_samples=32, lm_steps=2, lm_batch=8, n_caption=32,
                    n_qa=48, n_heldout=16, n_text_heldout=8, stage1_steps=2, stage2_steps=3, batch_size=8)
    summary = main_demo(str(tmp_path), variants=["+ multi-layer (= LLaViT)", "LLaVA-1.5 baseline"],
                        progress=False, size=size)
    assert len(summary["results"]) == 2
    for f in ("results.json", "table.md", "loss_curves.png"):
        assert os.path.exists(tmp_path / f)
    assert "LLaVA-1.5 baseline" in open(tmp_path / "table.md").read()


def _torchrun(args, out):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llavit_kernels.train", "train", "--tiny", "--stage", "2", "--max-steps", "2", "--batch-size", "2",
           "--num-samples", "16", "--no-progress", "--output-dir", str(out)] + args
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.load(open(out / "log.json"))


def _text_jsonl(path):
    """Text-only records whose answers have 2 to 9 target tokens, plus two bad lines."""
    answers = ["red", "a big red circle on the left .", "two", "a small blue square .", "circle",
               "a green triangle in the middle and a red square .", "left", "yellow"]
    lines = [json.dumps({"id": i, "conversations": [{"from": "human", "value": "describe the image ."},
                                                    {"from": "gpt", "value": answers[i % len(answers)]}]})
             for i in range(14)]
    lines.insert(3, '{"id": "broken", ')
    lines.insert(9, json.dumps({"id": "no_answer", "conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt"}]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo(tmp_path, mode):
    """torchrun with 2 CPU processes (gloo): the same step losses as one process on the same global batch
    (the loss is token-weighted over the global batch; answers here differ in length, so a mean of
    per-rank means would differ), and the same skip counts (summed over ranks)."""
    from llavit_kernels.train.__main__ import main

    data = _text_jsonl(tmp_path / "text.jsonl")
    extra = ["--data", data, "--max-steps", "4"]  # 16 records, 4 per step: each read once
    dist = _torchrun(["--parallel", mode] + extra, tmp_path / mode)
    assert dist["parallel"] == mode and dist["step"] == 4
    main(["train", "--tiny", "--stage", "2", "--max-steps", "4", "--batch-size", "4", "--no-progress",
          "--data", data, "--output-dir", str(tmp_path / "single")])
    single = json.load(open(tmp_path / "single" / "log.json"))
    losses = {k: [json.loads(line)["loss"] for line in open(tmp_path / k / "log.jsonl")] for k in (mode, "single")}
    assert losses[mode] == pytest.approx(losses["single"], abs=2e-5)
    assert dist["skipped_by_reason"] == single["skipped_by_reason"] and single["skipped"] == {"invalid_json": 1, "empty_answer": 1}
    # the checkpoint written from the sharded / replicated model loads as a plain model
    from llavit_kernels.models import LlavitForConditionalGeneration

    LlavitForConditionalGeneration.load(dist["checkpoint"])


def test_cli_two_stages_from_hf_dirs_on_llava_json(tmp_path):
    """Stage 1 from local CLIP + Qwen2 + tokenizer dirs on a caption file, stage 2 from its checkpoint on LLaVA JSON."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from llavit_kernels.models import LlavitForConditionalGeneration
    from llavit_kernels.train.__main__ import main

    words = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>", "user", "assistant", "describe", "the", "image", ".",
             "a", "red", "blue", "square", "what", "colour", "is", "?"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    llm = tmp_path / "qwen"
    tok.save_pretrained(str(llm))
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(str(llm))
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=32, patch_size=16)).save_pretrained(str(tmp_path / "clip"))
    (tmp_path / "imgs").mkdir()
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220)] * 4):
        Image.new("RGB", (40, 36), colour).save(tmp_path / "imgs" / f"{i}.png")
    name = ["red", "blue"]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.png", "caption": f"a {name[i % 2]} square ."})
                                                  for i in range(8)))
    llava = [{"id": i, "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the square ?"},
                                                              {"from": "gpt", "value": name[i % 2]}]} for i in range(8)]
    llava.append({"id": "bad", "image": "missing.png", "conversations": llava[0]["conversations"]})
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    common = ["--image-root", str(tmp_path / "imgs"), "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    main(["train", "--stage", "1", "--vision", str(tmp_path / "clip"), "--llm", str(llm), "--data",
          str(tmp_path / "caps.jsonl"), "--data-format", "caption", "--output-dir", str(tmp_path / "s1")] + common)
    s1 = json.load(open(tmp_path / "s1" / "log.json"))
    model = LlavitForConditionalGeneration.load(s1["checkpoint"])
    assert model.config.text.vocab_size == len(words) + 1  # <image> added to the tokenizer and the embeddings
    assert model.config.eos_token_id == words.index("<|im_end|>")
    main(["train", "--stage", "2", "--init-from", s1["checkpoint"], "--data", str(tmp_path / "llava.json"),
          "--output-dir", str(tmp_path / "s2"), "--packing"] + common)
    s2 = json.load(open(tmp_path / "s2" / "log.json"))
    assert s2["step"] == 2 and s2["skipped_by_reason"] == {"missing_image": 1}


def test_checkpoint_without_tokenizer_dir_needs_a_matching_tokenizer(tok, tmp_path):
    """Periodic checkpoints have no tokenizer/; falling back to the synthetic word tokenizer is right
    for a tiny synthetic model and must be refused for a model with another vocabulary (an HF LLM)."""
    import argparse

    from llavit_kernels.models import LlavitForConditionalGeneration
    from llavit_kernels.train.__main__ import build_model_and_tokenizer, eval_checkpoint

    build_tiny(tok, SIZE).save_pretrained(str(tmp_path / "tiny"))
    args = argparse.Namespace(init_from=str(tmp_path / "tiny"), tokenizer=None, no_image_qkv=False,
                              no_bidirectional=False, feature_layers=None)
    _, got = build_model_and_tokenizer(args)
    assert got.vocab == tok.vocab
    other = build_tiny(tok, SIZE)
    other.resize_token_embeddings(len(tok) + 40)
    assert isinstance(other, LlavitForConditionalGeneration)
    other.save_pretrained(str(tmp_path / "big"))
    args.init_from = str(tmp_path / "big")
    with pytest.raises(SystemExit, match="--tokenizer"):
        build_model_and_tokenizer(args)
    with pytest.raises(SystemExit, match="--tokenizer"):
        eval_checkpoint(str(tmp_path / "big"), num=4)


def test_empty_micro_batch_is_skipped_on_every_rank(monkeypatch):
    """A rank whose micro-batch has no usable sample must not skip alone (the other ranks would wait
    in DDP / FSDP collectives forever): the ranks agree through one all-reduce. The other rank is
    simulated by the fake all-reduce adding its flag."""
    from llavit_kernels.train import trainer

    other_rank_missing = {"value": 0}

    def fake_all_reduce(t):
        t += other_rank_missing["value"]

    monkeypatch.setattr(trainer.dist, "all_reduce", fake_all_reduce)
    cpu = torch.device("cpu")
    batch = {"input_ids": torch.zeros(1, 2)}
    assert trainer._batch_on_every_rank(batch, 2, cpu)
    assert not trainer._batch_on_every_rank(None, 2, cpu)
    other_rank_missing["value"] = 1  # this rank has data, the other does not: skip here too
    assert not trainer._batch_on_every_rank(batch, 2, cpu)
    assert trainer._batch_on_every_rank(batch, 1, cpu) and not trainer._batch_on_every_rank(None, 1, cpu)

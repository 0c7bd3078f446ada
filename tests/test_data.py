"""Data pipeline: LLaVA JSON / caption fixtures with PNGs, chat template, labels, bad data, synthetic set."""

import json
import logging

import pytest
import torch

from llavit_kernels.data import (
    IGNORE_INDEX, SYNTHETIC_WORDS, BadSample, SafeDataset, SampleProcessor, WordTokenizer, clip_preprocess,
    collate_packed, collate_padded, encode_chat, load_caption_json, load_llava_json, load_tokenizer, synthetic_samples,
)
from llavit_kernels.data.synthetic import HELDOUT_SEED_OFFSET

N_IMG = 4


def _png(path, colour=(200, 30, 30), size=(40, 30)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


@pytest.fixture
def llava_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", (20, 20, 240))
    records = [
        {"id": "ok", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many circles are there ?"}, {"from": "gpt", "value": "zero"}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "tag_no_image", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "image_no_tag", "image": "b.png", "conversations": [
            {"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "too_long", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "the " * 60}, {"from": "gpt", "value": "blue"}]},
        {"id": "text_only", "conversations": [
            {"from": "human", "value": "what colour is the square ?"}, {"from": "gpt", "value": "red"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.png", "caption": "a big red square ."}, {"image_path": "b.png", "caption": "a blue circle ."}]))
    return tmp_path


def _proc(tok, root, max_length=40):
    return SampleProcessor(tok, 16, N_IMG, max_length, image_root=str(root / "imgs"))


def test_llava_json_pipeline(tok, llava_dir):
    records = load_llava_json(str(llava_dir / "data.json"))
    s = _proc(tok, llava_dir)(records[0])
    ids, labels = s["input_ids"], s["labels"]
    assert s["pixel_values"].shape == (1, 3, 16, 16)
    assert int((ids == tok.image_token_id).sum()) == N_IMG
    # labels are the next token on answer tokens only: "red <eos>" and "zero <eos>"
    targets = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(targets, skip_special_tokens=False) == "red <eos> zero <eos>"
    for t in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        assert labels[t] == ids[t + 1]
    # pixel values: CLIP-normalised red (the 40x30 image is padded to a square: check its middle rows)
    mid = s["pixel_values"][0, :, 5:11]
    assert mid[0].mean() > 1.0 and mid[2].mean() < -1.0


def test_caption_format(tok, llava_dir):
    recs = load_caption_json(str(llava_dir / "caps.jsonl"))
    assert len(recs) == 2 and recs[1]["image"] == "b.png"
    s = _proc(tok, llava_dir)(recs[0])
    assert tok.decode(s["labels"][s["labels"] != IGNORE_INDEX].tolist()) == "a big red square ."


@pytest.mark.parametrize("rid,match", [
    ("missing", "missing image file"), ("tag_no_image", "1 '<image>' tag"), ("image_no_tag", "0 '<image>' tag"),
    ("too_long", "max_length"),
])
def test_bad_samples_error_clearly(tok, llava_dir, rid, match):
    records = {r["id"]: r for r in load_llava_json(str(llava_dir / "data.json"))}
    with pytest.raises(BadSample, match=match):
        _proc(tok, llava_dir)(records[rid])
    ds = SafeDataset([records[rid]], _proc(tok, llava_dir), on_bad="error")
    with pytest.raises(BadSample, match=rid):
        ds[0]


def test_bad_samples_are_counted_and_skipped(tok, llava_dir, caplog):
    ds = SafeDataset(load_llava_json(str(llava_dir / "data.json")), _proc(tok, llava_dir), on_bad="skip")
    with caplog.at_level(logging.WARNING, logger="llavit.data"):
        items = [ds[i] for i in range(len(ds))]
    assert [x is not None for x in items] == [True, False, False, False, False, True]
    assert dict(ds.skipped) == {"missing_image": 1, "image_tag_mismatch": 2, "too_long": 1}
    assert "skipping sample 1" in caplog.text
    batch = collate_padded(items, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    packed = collate_packed(items)
    assert packed["cu_seqlens"].tolist() == [0, len(items[0]["input_ids"]), len(items[0]["input_ids"]) + len(items[5]["input_ids"])]
    assert packed["position_ids"][packed["cu_seqlens"][1]] == 0


def test_padding_and_packing_shapes(tok):
    proc = SampleProcessor(tok, 16, N_IMG, 64)
    samples = [proc(s) for s in synthetic_samples(3, 0, 2, 16)]
    pad = collate_padded(samples, tok.pad_token_id)
    lengths = [len(s["input_ids"]) for s in samples]
    assert pad["attention_mask"].sum(1).tolist() == lengths
    left = collate_padded(samples, tok.pad_token_id, padding_side="left")
    assert left["attention_mask"][:, -1].all()
    packed = collate_packed(samples)
    assert packed["input_ids"].shape == (sum(lengths),) and packed["cu_seqlens"].dtype == torch.int32
    assert (packed["labels"] != IGNORE_INDEX).sum() == (pad["labels"] != IGNORE_INDEX).sum()


def test_hf_tokenizer_chat_template(tmp_path, llava_dir):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>", "user", "assistant", "\n", "what", "colour", "is", "the",
             "square", "?", "red", "how", "many", "circles", "are", "there", "zero", "system", "you", "help"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))  # AutoTokenizer from a local path; adds <image>
    assert "<image>" in tok.get_vocab()
    rec = load_llava_json(str(llava_dir / "data.json"))[0]
    s = SampleProcessor(tok, 16, N_IMG, 64, image_root=str(llava_dir / "imgs"))(rec)
    targets = s["labels"][s["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(targets) .split() == ["red", "<|im_end|>", "zero", "<|im_end|>"]
    assert int((s["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == N_IMG


def test_word_tokenizer_round_trip(tok, tmp_path):
    ids, is_answer = encode_chat(tok, [{"role": "user", "content": "<image> how many circles ?"},
                                       {"role": "assistant", "content": "two"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<user> <image> how many circles ? <assistant> two <eos>"
    assert [tok.inv[i] for i, a in zip(ids, is_answer) if a] == ["two", "<eos>"]
    tok.save_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).vocab == tok.vocab


def test_synthetic_deterministic_and_heldout_disjoint():
    a = synthetic_samples(20, 1, 2, 32)
    b = synthetic_samples(20, 1, 2, 32)
    assert all(torch.equal(x["image"], y["image"]) and x["conversations"] == y["conversations"] for x, y in zip(a, b))
    held = synthetic_samples(20, 1 + HELDOUT_SEED_OFFSET, 2, 32)
    assert not any(torch.equal(x["image"], y["image"]) for x in a for y in held)
    kinds = [x["kind"] for x in synthetic_samples(60, 0, 2, 32)]
    assert set(kinds) == {"count", "relation", "size", "shape", "ocr", "knowledge"}
    assert all(kinds.count(k) == 10 for k in set(kinds))  # balanced round-robin
    cap = synthetic_samples(2, 0, 1, 32)[0]
    assert cap["kind"] == "caption" and cap["answer"].endswith(".")
    tok = WordTokenizer(SYNTHETIC_WORDS)
    for s in synthetic_samples(50, 0, 1, 32) + a:  # every word is in the vocabulary
        for turn in s["conversations"]:
            assert tok.unk_token_id not in tok.encode(turn["value"])


def test_clip_preprocess_pil_and_tensor():
    from PIL import Image

    img = Image.new("RGB", (64, 32), (255, 255, 255))
    x = clip_preprocess(img, 24, aspect="crop")
    assert x.shape == (3, 24, 24)
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) /
                               torch.tensor([0.26862954, 0.26130258, 0.27577711]))
    t = torch.full((3, 24, 24), 255, dtype=torch.uint8)
    torch.testing.assert_close(clip_preprocess(t, 24), x)


def test_malformed_conversations_are_skipped_not_a_crash(tok):
    """A record with an unknown speaker or a non-string turn is one bad sample, not a training crash."""
    proc = SampleProcessor(tok, 16, N_IMG, 64)
    bad = [{"id": "speaker", "conversations": [{"from": "robot", "value": "what colour ?"}, {"from": "gpt", "value": "red"}]},
           {"id": "value", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "red"}]},
           {"id": "turn", "conversations": ["what colour ?"]}]
    ds = SafeDataset(bad, proc, on_bad="skip")
    assert [ds[i] for i in range(len(bad))] == [None, None, None]
    assert dict(ds.skipped) == {"other": 3}
    with pytest.raises(BadSample, match="speaker.*malformed"):
        SafeDataset(bad, proc, on_bad="error")[0]

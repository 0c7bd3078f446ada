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
    assert dict(ds.skipped) == {"malformed": 3}
    with pytest.raises(BadSample, match="speaker.*malformed"):
        SafeDataset(bad, proc, on_bad="error")[0]


# ------------------------------------------------------------------------------------ issue 14: per-record failures
def _write_bad_jsonl(path):
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"}]}
    lines = [
        json.dumps(ok).encode(),                                   # 1 good
        b'{"id": "latin1", "conversations": "caf\xe9"}',           # 2 not UTF-8
        b'{"id": "broken", ',                                      # 3 invalid JSON
        b"",                                                       # 4 blank: ignored
        json.dumps({"id": "int_image", "image": 5, "conversations": ok["conversations"]}).encode(),   # 5
        b"[1, 2]",                                                 # 6 not an object
        json.dumps({"id": "no_value", "conversations": [{"from": "human", "value": "what ?"},
                                                        {"from": "gpt"}]}).encode(),                  # 7
        json.dumps({"id": "turn_str", "conversations": "hello"}).encode(),                           # 8
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_every_bad_jsonl_record_is_a_counted_skip_naming_file_and_line(tok, tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    _write_bad_jsonl(path)
    with caplog.at_level(logging.WARNING, logger="llavit.data"):
        records = load_llava_json(str(path), on_bad="skip")
        ds = SafeDataset(records, SampleProcessor(tok, 16, N_IMG, 64), on_bad="skip")
        items = [ds[i] for i in range(len(ds))]
    assert [x is not None for x in items] == [True] + [False] * 6
    assert dict(ds.skipped) == {"not_utf8": 1, "invalid_json": 1, "malformed": 2, "not_an_object": 1,
                                "empty_answer": 1}
    for line in (2, 3, 5, 6, 7, 8):
        assert f"d.jsonl:{line}" in caplog.text, line
    assert "d.jsonl:3: invalid JSON at column" in caplog.text


@pytest.mark.parametrize("line,match", [
    (2, r"d.jsonl:2: not UTF-8"), (3, r"d.jsonl:3: invalid JSON"), (6, r"d.jsonl:6: a sample must be a JSON object"),
])
def test_bad_jsonl_lines_are_errors_under_on_bad_error(tok, tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    _write_bad_jsonl(path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:1] + [lines[line - 1]]).replace(b"\n", b"\n" + b"\n" * (line - 2), 1))
    with pytest.raises(BadSample, match=match):
        load_llava_json(str(path), on_bad="error")


@pytest.mark.parametrize("rid,match", [("int_image", r"d.jsonl:5.*'image' must be a path string.*got int"),
                                       ("no_value", r"d.jsonl:7.*empty answer"),
                                       ("turn_str", r"d.jsonl:8.*malformed conversations")])
def test_bad_record_fields_are_errors_naming_file_and_line(tok, tmp_path, rid, match):
    path = tmp_path / "d.jsonl"
    _write_bad_jsonl(path)
    records = load_llava_json(str(path), on_bad="skip")
    i = next(k for k, r in enumerate(records) if r.get("id") == rid)
    with pytest.raises(BadSample, match=match):
        SafeDataset(records, SampleProcessor(tok, 16, N_IMG, 64), on_bad="error")[i]


def test_whole_json_file_errors_name_file_line_and_column(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"id": 1, "conversations": []},\n  {"id": 2,, }\n]')
    with pytest.raises(ValueError, match=r"d.json: invalid JSON at line 3 column"):
        load_llava_json(str(p))
    p.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"d.json: not UTF-8"):
        load_llava_json(str(p))
    p.write_text('{"id": 1}')
    with pytest.raises(ValueError, match=r"d.json: expected a JSON list"):
        load_llava_json(str(p))
    p.write_text('[\n{"id": 1},\n7\n]')
    recs = load_llava_json(str(p), on_bad="skip")
    assert recs[0]["_source"].endswith("d.json:2") and recs[1]["_bad"] == "not_an_object"
    with pytest.raises(BadSample, match=r"d.json:3: a sample must be a JSON object, got int"):
        load_llava_json(str(p))


def test_empty_or_missing_captions_are_skipped(tok, llava_dir):
    p = llava_dir / "caps_bad.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.png", "caption": "a red square ."}, {"image": "a.png"}, {"image": "a.png", "caption": "  "},
        {"image": "a.png", "caption": 3}]))
    ds = SafeDataset(load_caption_json(str(p)), _proc(tok, llava_dir), on_bad="skip")
    assert [ds[i] is not None for i in range(4)] == [True, False, False, False]
    assert dict(ds.skipped) == {"empty_answer": 2, "malformed": 1}


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((30, 40), 32768, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        x = clip_preprocess(im, 16)
    grey = (128 / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[:, 5, 5], grey, atol=0.02, rtol=0)

"""Thin LLaViT model: tiny forward/backward, switches, HF Qwen2 loading by name, checkpoint round trip."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llavit_kernels.data import SYNTHETIC_WORDS, SampleProcessor, WordTokenizer, collate_packed, collate_padded, synthetic_samples  # noqa: E402
from llavit_kernels.models import LlavitConfig, LlavitForConditionalGeneration, Qwen2Decoder, TextConfig, default_feature_layers, load_hf_qwen2_state_dict  # noqa: E402
from llavit_kernels.train.demo import DemoSize, build_tiny  # noqa: E402

SIZE = DemoSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, text_hidden=32, text_layers=2)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(SYNTHETIC_WORDS)


def _batch(tok, n=3, packed=False, stage=2):
    proc = SampleProcessor(tok, SIZE.image_size, (SIZE.image_size // SIZE.patch_size) ** 2, 128)
    samples = [proc(s) for s in synthetic_samples(n, 5, stage, SIZE.image_size)]
    return collate_packed(samples) if packed else collate_padded(samples, tok.pad_token_id)


def test_default_feature_layers():
    assert default_feature_layers(24) == [5, 15, 23]
    assert default_feature_layers(4) == [1, 2, 3]
    assert default_feature_layers(6) == [1, 4, 5]
    for n in range(2, 40):  # the global feature is always the penultimate block, as 23 of CLIP-L's 24
        layers = default_feature_layers(n)
        assert layers[-1] == n - 1 and layers == sorted(set(layers)) and layers[0] >= 1
    cfg = LlavitConfig(vision=dict(num_hidden_layers=3, hidden_size=8, image_size=32, patch_size=8), feature_layers=[7])
    with pytest.raises(ValueError, match="feature_layers"):
        cfg.resolved_feature_layers


@pytest.mark.parametrize("switches", [
    {}, {"separate_image_qkv": False, "bidirectional_image": False, "feature_layers": [-2]},
])
def test_forward_backward(tok, switches):
    model = build_tiny(tok, SIZE, **switches)
    batch = _batch(tok)
    logits, loss = model(**batch)
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(loss) and 2.0 < float(loss.detach()) < 6.0  # ~log(vocab) at init
    loss.backward()
    assert model.projector.linear_1.weight.grad is not None
    attn = model.language_model.model.layers[0].self_attn
    assert hasattr(attn, "q_proj_image") == switches.get("separate_image_qkv", True)
    if hasattr(attn, "q_proj_image"):
        assert attn.q_proj_image.weight.grad is not None and attn.q_proj_image.weight.grad.abs().sum() > 0
    n_feat = len(model.config.resolved_feature_layers)
    assert model.projector.linear_1.in_features == n_feat * SIZE.vision_hidden


def test_packed_equals_padded(tok):
    model = build_tiny(tok, SIZE)
    padded, packed = _batch(tok, 4), _batch(tok, 4, packed=True)
    _, loss_pad = model(**padded)
    _, loss_pack = model(**packed)
    torch.testing.assert_close(loss_pad, loss_pack, rtol=1e-5, atol=1e-5)


def test_bidirectional_switch_changes_image_outputs_only_where_expected(tok):
    a = build_tiny(tok, SIZE)
    b = build_tiny(tok, SIZE, bidirectional_image=False)
    b.load_state_dict(a.state_dict())
    batch = _batch(tok, 2)
    la, _ = a(**batch)
    lb, _ = b(**batch)
    first_image = int((batch["input_ids"][0] == tok.image_token_id).nonzero()[0])
    # tokens before the image are identical; image tokens differ (they now see later patches)
    torch.testing.assert_close(la[:, :first_image], lb[:, :first_image])
    assert not torch.allclose(la, lb)


def test_checkpoint_round_trip(tok, tmp_path):
    model = build_tiny(tok, SIZE)
    with torch.no_grad():
        model.language_model.model.layers[0].self_attn.q_proj_image.weight.add_(0.1)
    model.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "llavit_config.json") and os.path.exists(tmp_path / "model.safetensors")
    loaded = LlavitForConditionalGeneration.load(str(tmp_path))
    batch = _batch(tok)
    torch.testing.assert_close(model(**batch)[0], loaded(**batch)[0])
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.language_model.model.embed_tokens.weight.data_ptr()


def test_generate_matches_full_recompute(tok):
    model = build_tiny(tok, SIZE).eval()
    proc = SampleProcessor(tok, SIZE.image_size, 16, 128)
    from llavit_kernels.train.evaluate import build_prompt_ids

    s = synthetic_samples(2, 3, 2, SIZE.image_size)
    prompts = [build_prompt_ids(tok, x["conversations"], 16) for x in s]
    T = max(map(len, prompts))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    pix = torch.stack([proc.load_images(x)[0] for x in s])
    new = model.generate(ids, pix, mask, max_new_tokens=5, eos_token_id=-1)  # never stop early
    # full recompute, greedy, one row at a time without padding
    for i, p in enumerate(prompts):
        cur = torch.tensor(p)[None]
        for t in range(5):
            logits, _ = model(cur, pix[i:i + 1])
            nxt = logits[0, -1].argmax()
            assert int(nxt) == int(new[i, t])
            cur = torch.cat([cur, nxt.view(1, 1)], 1)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_qwen2_logits_match(tmp_path, tie):
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from llavit_kernels.layout import SpanLayout

    hf_cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=5000.0)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    hf.save_pretrained(str(tmp_path))
    dec = Qwen2Decoder(TextConfig.from_hf(AutoConfig.from_pretrained(str(tmp_path)))).eval()
    load_hf_qwen2_state_dict(dec, load_file(str(tmp_path / "model.safetensors")))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = hf(ids).logits
        layout = SpanLayout.from_image_mask(torch.zeros_like(ids, dtype=torch.bool))
        out = dec(dec.model.embed_tokens(ids), layout, torch.arange(11).expand(2, 11))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # the image projections start as copies of the text ones
    attn = dec.model.layers[1].self_attn
    torch.testing.assert_close(attn.k_proj_image.bias, attn.k_proj.bias)


def test_from_pretrained_local_dirs(tmp_path, tok):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(str(tmp_path / "clip"))
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    hf.save_pretrained(str(tmp_path / "qwen"))
    model = LlavitForConditionalGeneration.from_pretrained(str(tmp_path / "clip"), str(tmp_path / "qwen"),
                                                           image_token_id=tok.image_token_id)
    assert model.config.resolved_feature_layers == [1, 2]  # 3 blocks: the penultimate (2) is the global feature
    ids = torch.randint(6, len(tok), (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=1e-4, atol=1e-4)
    logits, loss = model(**_batch(tok, 2))
    assert torch.isfinite(logits).all()


def test_activation_checkpointing_same_gradients(tok):
    model = build_tiny(tok, SIZE)
    batch = _batch(tok)
    _, loss = model(**batch)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_gradient_checkpointing(True)
    _, loss2 = model(**batch)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6)


def test_text_only_batch_still_gives_every_trainable_parameter_a_gradient(tok):
    """DDP (no find_unused_parameters) fails on the step after one where a trainable parameter got
    no gradient; LLaVA data has text-only samples, so a text-only micro-batch must still reach the
    projector (with zero gradient) without changing the loss."""
    model = build_tiny(tok, SIZE)
    proc = SampleProcessor(tok, SIZE.image_size, 16, 128)
    text = {"conversations": [{"from": "human", "value": "what colour is the square ?"}, {"from": "gpt", "value": "red"}]}
    batch = collate_padded([proc(text), proc(text)], tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 0
    with torch.no_grad():
        _, want = model(**batch)
    _, loss = model(**batch)
    torch.testing.assert_close(loss, want)
    loss.backward()
    for name, p in model.projector.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) == 0.0, name


def test_generate_in_training_mode_with_checkpointing(tok):
    """Activation checkpointing must not bypass the KV caches that generate() fills."""
    from llavit_kernels.train.evaluate import build_prompt_ids

    model = build_tiny(tok, SIZE)
    s = synthetic_samples(1, 3, 2, SIZE.image_size)[0]
    ids = torch.tensor(build_prompt_ids(tok, s["conversations"], 16))[None]
    pix = SampleProcessor(tok, SIZE.image_size, 16, 128).load_images(s)[0][None]
    want = model.eval().generate(ids, pix, max_new_tokens=4, eos_token_id=-1)
    model.train().set_gradient_checkpointing(True)
    assert torch.equal(model.generate(ids, pix, max_new_tokens=4, eos_token_id=-1), want)


def test_rope_tables_survive_a_bf16_cast():
    """model.to(torch.bfloat16) must not round the RoPE frequencies (a float buffer would be cast,
    giving angle errors of radians at long positions); the tables equal the fp32 ones up to bf16 rounding."""
    dec = Qwen2Decoder(TextConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6))
    pos = torch.arange(4096)[None]
    cos32, sin32 = dec.rotary(pos, torch.float32)
    cos16, sin16 = dec.to(torch.bfloat16).rotary(pos, torch.bfloat16)
    torch.testing.assert_close(cos16.float(), cos32, rtol=0, atol=8e-3)
    torch.testing.assert_close(sin16.float(), sin32, rtol=0, atol=8e-3)

"""PEFT (LoRA, DoRA, modules_to_save) on LLaViT-converted models, both orders, on a tiny LLaVA.

The oracle of an adapted model is the same model with its adapters MERGED into plain weights
(``merge_and_unload``): plain nn.Linear projections, the fused routed op, no adapter code. Text
tokens must see the text projections' adapters and image tokens the image projections' ones.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from llavit_kernels.integrations import (  # noqa: E402
    HFLlavitAttention,
    apply_llavit,
    llavit_peft_modules,
    llavit_state_dict,
    load_llavit_weights,
)
from llavit_kernels.nn import attention as attention_module  # noqa: E402

from test_integration_transformers import IMAGE_ID, convert, image_batch, make_llava, perturb_image_weights  # noqa: E402

TEXT_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch():
    ids, mask = image_batch(length=26, starts=(1, 7), pad_left=(0, 2))
    labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4)), labels=labels)


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _attention(model):
    return [m for m in model.modules() if isinstance(m, HFLlavitAttention)]


class _FusedSpy:
    """Counts calls of the fused routed projection and fails on the unfused fallback warning."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = attention_module.modality_qkv

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(attention_module, "modality_qkv", spy)


def _lora_config(**kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    kwargs.setdefault("init_lora_weights", False)  # random B: the adapter changes outputs from the start
    kwargs.setdefault("exclude_modules", r".*vision_tower.*")
    return peft.LoraConfig(**kwargs)


def _train_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return loss, grads


def _check_adapter_model(model, batch, spy):
    """Adapter changes outputs, disabling restores them, the merged model agrees, gradients reach every
    trainable tensor, the base stays frozen and the fused op ran."""
    base_logits = None
    with model.disable_adapter():
        base_logits = _logits(model, batch)
    got = _logits(model, batch)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter is not ignored
    merged = copy.deepcopy(model).merge_and_unload()
    assert all(type(getattr(m, n)) is torch.nn.Linear for m in _attention(merged)
               for n in m.text_projection_names + m.image_projection_names)
    torch.testing.assert_close(got, _logits(merged, batch), rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base_logits)
    calls = spy.calls
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss, grads = _train_step(model, batch)
    assert spy.calls > calls and torch.isfinite(loss)
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or float(g.abs().sum()) == 0]
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    model.eval()
    return grads


def test_convert_then_lora_on_text_and_image_qkvo(monkeypatch, tmp_path):
    spy = _FusedSpy(monkeypatch)
    base = convert(make_llava("qwen2"))
    perturb_image_weights(base)
    modules = llavit_peft_modules(base, TEXT_QKVO, image_qkv="lora")
    assert modules == {"target_modules": TEXT_QKVO + ["q_proj_image", "k_proj_image", "v_proj_image"], "modules_to_save": []}
    model = peft.get_peft_model(base, _lora_config(**modules))
    batch = _batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot run inside the fused")
        grads = _check_adapter_model(model, batch, spy)
    names = set(grads)
    for proj in TEXT_QKVO + ["q_proj_image", "k_proj_image", "v_proj_image"]:
        assert any(f".{proj}.lora_A." in n for n in names) and any(f".{proj}.lora_B." in n for n in names), proj
    # the adapter saves and loads with the image projections' adapters
    model.save_pretrained(tmp_path)
    saved = peft.load_peft_weights(str(tmp_path))
    assert sum("_proj_image.lora_" in k for k in saved) == 2 * 3 * 2  # A and B, q/k/v, 2 layers
    fresh = peft.PeftModel.from_pretrained(_unwrapped(model), str(tmp_path))  # same base weights, fresh adapters
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch))


def _unwrapped(peft_model):
    """A plain converted copy of a PEFT model's base (adapters removed, base weights kept)."""
    clone = copy.deepcopy(peft_model)
    return clone.unload()


def test_convert_then_full_image_qkv_with_modules_to_save(monkeypatch, tmp_path):
    """LLaViT's recipe under PEFT: LoRA on the text projections, the image q/k/v trained in full and
    saved with the adapter."""
    spy = _FusedSpy(monkeypatch)
    base = convert(make_llava("qwen2"))
    modules = llavit_peft_modules(base, TEXT_QKVO, image_qkv="full", modules_to_save=["multi_modal_projector"])
    assert modules["modules_to_save"] == ["multi_modal_projector", "k_proj_image", "q_proj_image", "v_proj_image"]
    model = peft.get_peft_model(base, _lora_config(**modules))
    batch = _batch()
    grads = _check_adapter_model_full(model, batch, spy)
    assert any("q_proj_image.modules_to_save" in n for n in grads)
    model.save_pretrained(tmp_path)
    saved = peft.load_peft_weights(str(tmp_path))
    assert sum("_proj_image" in k for k in saved) == 3 * 2 * 2  # weight and bias, q/k/v, 2 layers
    loaded = peft.PeftModel.from_pretrained(_unwrapped(model), str(tmp_path))
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch))


def _check_adapter_model_full(model, batch, spy):
    with model.disable_adapter():
        base_logits = _logits(model, batch)
    model.train()
    loss, grads = _train_step(model, batch)
    model.eval()
    assert spy.calls > 0 and torch.isfinite(loss)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    got = _logits(model, batch)
    assert not torch.allclose(got, base_logits, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base_logits)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(got, _logits(merged, batch), rtol=1e-4, atol=1e-5)
    return grads


def test_lora_then_convert(monkeypatch, tmp_path):
    """Wrap first, convert second: the image copies carry copies of the text adapters (outputs unchanged
    by the conversion on text), the adapter config is extended to name them, everything trains."""
    spy = _FusedSpy(monkeypatch)
    plain = make_llava("qwen2")
    model = peft.get_peft_model(copy.deepcopy(plain), _lora_config(target_modules=list(TEXT_QKVO)))
    batch = _batch()
    text_batch = dict(batch, input_ids=torch.where(batch["input_ids"] == IMAGE_ID, 3, batch["input_ids"]))
    text_batch.pop("pixel_values")
    before = _logits(model, text_batch)
    trainable_before = sum(p.requires_grad for p in model.parameters())
    out = apply_llavit(model)
    assert out is model and _attention(model)
    assert sum(p.requires_grad for p in model.parameters()) == trainable_before + 2 * 3 * 2  # image LoRA A/B
    torch.testing.assert_close(_logits(model, text_batch), before, rtol=1e-5, atol=1e-5)
    assert {"q_proj_image", "k_proj_image", "v_proj_image"} <= set(model.peft_config["default"].target_modules)
    grads = _check_adapter_model(model, batch, spy)
    assert any(".q_proj_image.lora_A." in n for n in grads)
    # the image base weights under their plain names (what a converted checkpoint holds), loadable back
    image_state = llavit_state_dict(model)
    assert sorted(image_state) == sorted(k for k in convert(plain).state_dict() if "_proj_image." in k)
    assert load_llavit_weights(model, image_state) == len(image_state)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_unwrapped(model), str(tmp_path))
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch))


def test_lora_on_mlp_then_convert_keeps_trainable_count():
    """The issue's count: LoRA on the MLP, then conversion, must not add trainable tensors."""
    model = peft.get_peft_model(make_llava("qwen2"), _lora_config(target_modules=["gate_proj", "up_proj", "down_proj"]))
    before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    apply_llavit(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == before
    assert len(before) == 12


def test_dora_runs_unfused_with_one_warning():
    """A LoRA variant (DoRA) cannot split into base + low-rank terms: the projections are called as
    modules (warned once), and the result still equals the merged model."""
    attention_module._UNFUSED_WARNED.clear()
    base = convert(make_llava("qwen2"))
    model = peft.get_peft_model(base, _lora_config(use_dora=True, **llavit_peft_modules(base, ["q_proj", "v_proj"])))
    batch = _batch()
    with pytest.warns(UserWarning, match="cannot run inside the fused routed projection"):
        _logits(model, batch)
    with model.disable_adapter():
        base_logits = _logits(model, batch)
    got = _logits(model, batch)
    assert not torch.allclose(got, base_logits, atol=1e-3)
    torch.testing.assert_close(got, _logits(copy.deepcopy(model).merge_and_unload(), batch), rtol=1e-4, atol=1e-5)
    model.train()
    loss, grads = _train_step(model, batch)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())


def test_peft_generate_matches_merged():
    base = convert(make_llava("qwen2"))
    model = peft.get_peft_model(base, _lora_config(**llavit_peft_modules(base, TEXT_QKVO)))
    batch = _batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = model.generate(**kwargs)
    want = copy.deepcopy(model).merge_and_unload().generate(**kwargs)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU tier)")
def test_lora_on_cuda_triton_matches_reference_ops():
    """LoRA through the Triton routed projection (no RoPE in its epilogue, RoPE after the low-rank
    terms) against the same adapted model on the reference ops: logits and LoRA gradients."""
    from test_integration_transformers import VOCAB

    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=512, num_hidden_layers=2, vocab_size=VOCAB)  # head dim 64
    base = transformers.Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    apply_llavit(base, image_token_id=IMAGE_ID)
    model = peft.get_peft_model(base, _lora_config(exclude_modules=None, **llavit_peft_modules(base, TEXT_QKVO)))
    ids, mask = image_batch(length=96, starts=(5, 30), pad_left=(0, 7))
    ids, mask = ids.cuda(), mask.cuda()
    results = {}
    for backend in ("reference", None):
        for m in _attention(model):
            m.backend = backend
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=torch.where(mask == 0, -100, ids))
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.float(), grads)
    keep = mask.bool()
    torch.testing.assert_close(results[None][0][keep], results["reference"][0][keep], rtol=2e-2, atol=2e-2)
    assert results["reference"][1] and set(results[None][1]) == set(results["reference"][1])
    for name, grad in results["reference"][1].items():
        scale = float(grad.abs().max()) + 1e-6
        torch.testing.assert_close(results[None][1][name] / scale, grad / scale, rtol=2e-2, atol=2e-2)

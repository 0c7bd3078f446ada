"""apply_llavit on each supported text family beyond Qwen2/Llama (tiny random configs, CPU).

Per family: text-only logits equal the unconverted model's; with images, logits equal an oracle
built by hand here (the stock model, eager attention, q/k/v replaced by a per-token torch.where over
the text and image projections, and a dense 4-D mask written out element by element from the rule
"same row, key not padding, and key <= query or both in the same image"); generate() with the cache
equals greedy decoding by full recompute; save_pretrained / from_pretrained round trip.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llavit_kernels.integrations import HFLlavitAttention, apply_llavit, from_pretrained  # noqa: E402

from test_generation import greedy_by_recompute  # noqa: E402
from test_integration_transformers import (  # noqa: E402
    IMAGE_ID,
    VOCAB,
    RoutedLinear,
    _Holder,
    block_ids_python,
    image_batch,
    perturb_image_weights,
)

COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
              vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make(family, seed=0):
    torch.manual_seed(seed)
    if family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **COMMON)
        cls = transformers.MistralForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=8, **COMMON)
        cls = transformers.Qwen3ForCausalLM
    elif family == "phi3":
        config = transformers.Phi3Config(**COMMON)
        cls = transformers.Phi3ForCausalLM
    else:
        raise ValueError(family)
    return cls(config).eval()


FAMILIES = ["mistral", "qwen3", "phi3"]


def converted(plain):
    model = copy.deepcopy(plain)
    apply_llavit(model, image_token_id=IMAGE_ID)
    perturb_image_weights(model)
    return model


def dense_mask(ids, mask, dtype=torch.float32):
    """The LLaViT mask written out from its rule (additive float, [B, 1, T, T]): key k is visible to
    query q iff k is not padding and (k <= q or q and k lie in the same image run)."""
    length = ids.shape[1]
    block = block_ids_python(ids == IMAGE_ID)  # one id per maximal image run, -1 on text (Python loop)
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    same_image = (block[:, :, None] >= 0) & (block[:, :, None] == block[:, None, :])
    allowed = mask.bool()[:, None, :] & ((k <= q)[None] | same_image)
    out = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return out[:, None]


def oracle(plain, model):
    """The stock model with per-token routed q/k/v (weights of the converted model), eager attention."""
    ref = copy.deepcopy(plain)
    holder = _Holder()
    conv_modules = dict(model.named_modules())
    for name, module in ref.named_modules():
        conv = conv_modules.get(name)
        if isinstance(conv, HFLlavitAttention):
            for text_name, image_name in zip(conv.text_projection_names, conv.image_projection_names):
                setattr(module, text_name, RoutedLinear(copy.deepcopy(getattr(conv, text_name)),
                                                        copy.deepcopy(getattr(conv, image_name)), holder))
    ref.config._attn_implementation = "eager"
    ref._holder = holder
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_logits_equal_unconverted(family):
    plain = make(family)
    model = converted(plain)
    assert len([m for m in model.modules() if isinstance(m, HFLlavitAttention)]) == 2
    ids = torch.randint(3, IMAGE_ID - 1, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = plain(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_match_hand_built_dense_mask_oracle(family):
    plain = make(family)
    model = converted(plain)
    ref = oracle(plain, model)
    ids, mask = image_batch(pad_left=(0, 3))
    ref._holder.is_image = ids == IMAGE_ID
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=dense_mask(ids, mask), position_ids=positions).logits
        causal = ref(ids, attention_mask=dense_mask(torch.zeros_like(ids), mask), position_ids=positions).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[keep], causal[keep], atol=1e-3)  # the oracle can tell the masks apart


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_full_recompute(family):
    plain = make(family)
    model = converted(plain)
    perturb_image_weights(model, scale=1.0)
    ids, mask = image_batch(length=24, starts=(3, 6), pad_left=(0, 2))
    steps = 6
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recompute(model, ids, mask, steps))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    plain = make(family)
    model = converted(plain)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(type(plain), tmp_path).eval()
    ids, mask = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_phi3_fused_qkv_gets_an_image_copy():
    model = converted(make("phi3"))
    attn = model.model.layers[0].self_attn
    assert attn.fused_qkv and attn.image_projection_names == ("qkv_proj_image",)
    assert "model.layers.0.self_attn.qkv_proj_image.weight" in model.state_dict()


def test_unsupported_models_are_refused_with_the_supported_list():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel, which apply_llavit does not support.*Mistral.*Qwen3.*Phi-3.*LLaVA"):
        apply_llavit(gpt2, image_token_id=1)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=16, **COMMON))
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        apply_llavit(windowed, image_token_id=IMAGE_ID)
    partial = transformers.Phi3ForCausalLM(transformers.Phi3Config(partial_rotary_factor=0.5, **COMMON))
    with pytest.raises(NotImplementedError, match="partial_rotary_factor=0.5"):
        apply_llavit(partial, image_token_id=IMAGE_ID)
    # a LLaVA whose text side is not supported
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=28, patch_size=7)
    gemma = transformers.GemmaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     intermediate_size=64, num_hidden_layers=1, vocab_size=VOCAB)
    llava = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=gemma, image_token_id=IMAGE_ID))
    with pytest.raises(TypeError, match="model_type='gemma'.*supported text models: Qwen2"):
        apply_llavit(llava)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_only_mode_matches_oracle(family):
    """apply_llavit_mask (stock modules, attn_implementation="llavit") on each family: the stock
    weights with the hand-built mask."""
    from llavit_kernels.integrations import apply_llavit_mask

    plain = make(family)
    model = apply_llavit_mask(copy.deepcopy(plain), image_token_id=IMAGE_ID)
    ref = copy.deepcopy(plain)
    ref.config._attn_implementation = "eager"
    ids, mask = image_batch(pad_left=(0, 3))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=dense_mask(ids, mask), position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=16, **COMMON))
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        apply_llavit_mask(windowed, image_token_id=IMAGE_ID)

"""generate() with transformers' KV cache equals greedy decoding by full recompute; chunked prefill."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from test_integration_transformers import (  # noqa: E402
    IMAGE_ID,
    convert,
    image_batch,
    make_llava,
    make_text_model,
    perturb_image_weights,
)


import inspect  # noqa: E402

# transformers renamed the cache argument (past_key_values -> cache); use this version's name
CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.Qwen2ForCausalLM.forward).parameters else "past_key_values"


def greedy_by_recompute(model, ids, mask, steps, **kwargs):
    """Greedy decoding with no cache: the whole sequence is recomputed for every new token."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # generate()'s positions under left padding
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


@pytest.mark.parametrize("family", ["qwen2", "llama", "llava"])
def test_generate_with_cache_equals_full_recompute(family):
    plain = make_llava("qwen2") if family == "llava" else make_text_model(family)
    model = convert(plain)
    perturb_image_weights(model, scale=1.0)
    ids, mask = image_batch(length=24, starts=(3, 6), pad_left=(0, 2))
    kwargs = {"pixel_values": torch.randn(2, 3, 28, 28)} if family == "llava" else {}
    steps = 8
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         min_new_tokens=steps, pad_token_id=0, **kwargs)
    want = greedy_by_recompute(model, ids, mask, steps, **kwargs)
    assert torch.equal(out, want), (out[:, -steps:], want[:, -steps:])
    # the stock model decodes differently (so the comparison can fail)
    stock = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                           min_new_tokens=steps, pad_token_id=0, **kwargs)
    assert not torch.equal(out, stock)


def test_chunked_prefill_equals_one_shot_and_rejects_split_images():
    model = convert(make_text_model("qwen2"))
    perturb_image_weights(model)
    ids, mask = image_batch(length=24, starts=(3, 6), pad_left=(0, 2))  # images at [3, 19) and [6, 22)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache()
        first = model(ids[:, :2], attention_mask=mask[:, :2], **{CACHE_ARG: cache}, use_cache=True).logits
        second = model(ids[:, 2:22], attention_mask=mask[:, :22], **{CACHE_ARG: cache}, use_cache=True).logits
        third = model(ids[:, 22:], attention_mask=mask, **{CACHE_ARG: cache}, use_cache=True).logits
    keep = mask.bool()
    torch.testing.assert_close(torch.cat([first, second, third], 1)[keep], full[keep], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="starts inside an image"):
        cache = DynamicCache()
        model(ids[:, :10], attention_mask=mask[:, :10], **{CACHE_ARG: cache}, use_cache=True)
        model(ids[:, 10:], attention_mask=mask, **{CACHE_ARG: cache}, use_cache=True)


def test_mask_only_generate_equals_full_recompute():
    from llavit_kernels.integrations import apply_llavit_mask

    model = copy.deepcopy(make_text_model("llama"))
    apply_llavit_mask(model, image_token_id=IMAGE_ID)
    ids, mask = image_batch(length=24, starts=(3, 6), pad_left=(0, 2))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, greedy_by_recompute(model, ids, mask, 6))

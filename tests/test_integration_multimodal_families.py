"""apply_llavit on the top-level class of each supported multimodal family (tiny random configs).

The conversion changes only the language model, so these tests feed ``input_ids`` holding the image
placeholder (and, where the family has one, the video placeholder) without pixels: the stock models
then embed the placeholders as ordinary tokens, and routing + mask are exercised through the real
top-level forward, generate() and save/load of each class. (LLaVA with real pixels is covered in
test_integration_transformers.py, Qwen2-VL with real pixels and 3-D positions below.)
Per family: text-only logits equal the unconverted model's; with images, logits equal the stock
model with routed q/k/v and a dense 4-D mask written out by hand; generate() with the cache equals
greedy decoding by full recompute; save_pretrained / from_pretrained round trip.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
T = transformers

from llavit_kernels.integrations import HFLlavitAttention, apply_llavit, from_pretrained  # noqa: E402

from test_generation import greedy_by_recompute  # noqa: E402
from test_integration_families import dense_mask, oracle  # noqa: E402
from test_integration_transformers import IMAGE_ID, VOCAB, image_batch, perturb_image_weights  # noqa: E402

VIDEO_ID = 98


def _text(cls, **kw):
    return cls(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
               vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, **kw)


_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7)
_QWEN_VL_TEXT = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
                     vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
if int(T.__version__.split(".")[0]) >= 5:
    _QWEN_VL_TEXT["rope_parameters"] = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
else:  # the 4.x name
    _QWEN_VL_TEXT["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
_QWEN_VL_VISION = dict(depth=1, num_heads=4, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)

BUILDERS = {
    "llava_next": lambda: T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**_CLIP), text_config=_text(T.MistralConfig, sliding_window=None),
        image_token_id=IMAGE_ID, image_grid_pinpoints=[[28, 28]])),
    "llava_onevision": lambda: T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(**_CLIP), text_config=_text(T.Qwen2Config), image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID, image_grid_pinpoints=[[28, 28]])),
    "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
        text_config=dict(_QWEN_VL_TEXT), vision_config=dict(embed_dim=32, hidden_size=32, **_QWEN_VL_VISION),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=97)),
    "qwen2_5_vl": lambda: T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=dict(_QWEN_VL_TEXT), vision_config=dict(hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                            fullatt_block_indexes=[0], window_size=8, **_QWEN_VL_VISION),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=97)),
    "idefics3": lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
        vision_config=dict(_CLIP), text_config=_text(T.LlamaConfig), image_token_id=IMAGE_ID, scale_factor=2)),
    "smolvlm": lambda: T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        vision_config=dict(_CLIP), text_config=_text(T.LlamaConfig), image_token_id=IMAGE_ID, scale_factor=2)),
    "internvl": lambda: T.InternVLForConditionalGeneration(T.InternVLConfig(
        vision_config=dict(_CLIP, image_size=[28, 28], patch_size=[7, 7]), text_config=_text(T.Qwen2Config),
        image_token_id=IMAGE_ID)),
    "mistral3": lambda: T.Mistral3ForConditionalGeneration(T.Mistral3Config(
        vision_config=dict(_CLIP, head_dim=8), text_config=_text(T.MistralConfig, sliding_window=None),
        image_token_id=IMAGE_ID, spatial_merge_size=2)),
}
FAMILIES = sorted(BUILDERS)


def make(family, seed=0):
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    # transformers 4.x configs of some classes (Mistral3) take only image_token_index and keep their
    # default image token; setting the attribute goes through their attribute_map in every version
    model.config.image_token_id = IMAGE_ID
    assert model.config.image_token_id == IMAGE_ID
    return model


def converted(plain):
    model = copy.deepcopy(plain)
    apply_llavit(model)  # the image token id comes from the config
    perturb_image_weights(model)
    return model


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_logits_equal_unconverted(family):
    plain = make(family)
    model = converted(plain)
    assert len([m for m in model.modules() if isinstance(m, HFLlavitAttention)]) == 2
    ids = torch.randint(3, 90, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_hand_built_dense_mask_oracle(family):
    plain = make(family)
    model = converted(plain)
    ref = oracle(plain, model)
    ref.config.get_text_config()._attn_implementation = "eager"
    ids, mask = image_batch(pad_left=(0, 3))
    ref._holder.is_image = ids == IMAGE_ID
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        kwargs = dict(input_ids=ids, position_ids=_positions(mask))
        want = ref(attention_mask=dense_mask(ids, mask), **kwargs).logits
        causal = ref(attention_mask=dense_mask(torch.zeros_like(ids), mask), **kwargs).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[keep], causal[keep], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_full_recompute(family):
    plain = make(family)
    model = converted(plain)
    perturb_image_weights(model, scale=1.0)
    ids, mask = image_batch(length=24, starts=(3, 6), pad_left=(0, 2))
    steps = 3
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
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_video_tokens_are_visual(family):
    """A run of video placeholder tokens routes to the image weights and is bidirectional."""
    plain = make(family)
    model = converted(plain)
    ids, mask = image_batch(pad_left=(0, 3))
    video = torch.where(ids == IMAGE_ID, VIDEO_ID, ids)
    ref = oracle(plain, model)
    ref.config.get_text_config()._attn_implementation = "eager"
    ref._holder.is_image = video == VIDEO_ID
    with torch.no_grad():
        got = model(input_ids=video, attention_mask=mask).logits
        want = ref(input_ids=video, attention_mask=dense_mask(ids, mask), position_ids=_positions(mask)).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


def _with_dense_mask(ref, ids, mask):
    """Make the stock model's text model attend with the hand-built 4-D mask: the top level still gets
    the 2-D mask (so it computes its own 3-D RoPE positions), the text model receives the 4-D one."""
    text_model = ref.model.language_model
    dense = dense_mask(ids, mask)

    def swap(module, args, kwargs):
        kwargs["attention_mask"] = dense[:, :, -kwargs["inputs_embeds"].shape[1]:, :]
        return args, kwargs

    return text_model.register_forward_pre_hook(swap, with_kwargs=True)


def test_qwen2_vl_with_pixels_and_3d_positions():
    """Real pixels through the vision tower, 3-D (time, height, width) RoPE positions computed by the
    model: logits equal the routed-q/k/v stock model with the hand-built mask; generate() with the
    cache equals greedy decoding by full recompute."""
    plain = make("qwen2_vl")
    model = converted(plain)
    perturb_image_weights(model, scale=1.0)
    grid = torch.tensor([[1, 4, 4]])  # 16 patches, 2x2 merge -> 4 image tokens
    pixels = torch.randn(2 * 16, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, 90, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, 2], ids[0, 3:7] = 97, IMAGE_ID
    ids[1, 5], ids[1, 6:10] = 97, IMAGE_ID
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    kwargs = dict(pixel_values=pixels, image_grid_thw=grid.repeat(2, 1))
    if "mm_token_type_ids" in inspect.signature(type(plain).forward).parameters:  # transformers >= 5.x
        kwargs["mm_token_type_ids"] = (ids == IMAGE_ID).int()  # 1 on image tokens, as the processor returns
    ref = oracle(plain, model)
    ref.config.get_text_config()._attn_implementation = "eager"
    ref._holder.is_image = ids == IMAGE_ID
    handle = _with_dense_mask(ref, ids, mask)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        want = ref(input_ids=ids, attention_mask=mask, **kwargs).logits
    handle.remove()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    steps = 3
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=0, **kwargs)
    seq, seq_mask = ids, mask
    for _ in range(steps):
        if "mm_token_type_ids" in kwargs:
            kwargs["mm_token_type_ids"] = (seq == IMAGE_ID).int()
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=seq_mask, use_cache=False, **kwargs).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq, seq_mask = torch.cat([seq, token], 1), torch.cat([seq_mask, torch.ones_like(token)], 1)
    assert torch.equal(out, seq)

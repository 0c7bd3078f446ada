"""apply_llavit on tiny random Qwen2 / Llama / LLaVA models (CPU, reference ops).

The independent reference for image inputs is the stock transformers model with
* its q/k/v projections replaced by a per-token ``torch.where`` over text and image nn.Linear, and
* a 4-D mask built by transformers' own masking utilities, the ones Gemma 3 uses for its image
  blocks: ``create_causal_mask(..., or_mask_function=blockwise_overlay(block_ids))``.
"""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from llavit_kernels.integrations import (  # noqa: E402
    HFLlavitAttention,
    LlavitLayoutSource,
    apply_llavit,
    apply_llavit_mask,
    llavit_state_dict,
    load_llavit_weights,
)

IMAGE_ID = 99
VOCAB = 100


# ---------------------------------------------------------------------------- tiny models
def text_config(kind="qwen2", layers=2, **extra):
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=128, **extra)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(attention_bias=True, **common)


def make_text_model(kind="qwen2", seed=0, **extra):
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM
    return cls(text_config(kind, **extra)).eval()


IMAGE_TOKENS = 16  # (28 / 7)^2 patches, CLS dropped ("default" feature strategy)


def make_llava(kind="qwen2", seed=0):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text_config(kind), image_token_id=IMAGE_ID,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval()


def perturb_image_weights(model, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_proj_image." in name:
                param.add_(scale * torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1]))


def image_batch(batch=2, length=24, starts=(2, 5), pad_left=(0, 0)):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, IMAGE_ID - 1, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        ids[b, starts[b]:starts[b] + IMAGE_TOKENS] = IMAGE_ID
        mask[b, :pad_left[b]] = 0
        ids[b, :pad_left[b]] = 0
    return ids, mask


# ---------------------------------------------------------------------------- independent reference
class _Holder:
    is_image = None


class RoutedLinear(nn.Module):
    """Per-token weight selection, the plain way: both projections, then a where."""

    def __init__(self, text, image, holder):
        super().__init__()
        self.text, self.image, self.holder = text, image, holder

    def forward(self, x):
        return torch.where(self.holder.is_image[..., None], self.image(x), self.text(x))


def block_ids_python(is_image):
    """Gemma-3-style block ids: one id per maximal run of image tokens, -1 on text (Python loop)."""
    out = torch.full(is_image.shape, -1, dtype=torch.long)
    for b in range(is_image.shape[0]):
        block, prev = -1, False
        for t, flag in enumerate(is_image[b].tolist()):
            if flag and not prev:
                block += 1
            if flag:
                out[b, t] = block
            prev = flag
    return out


def _blockwise_overlay(block_ids):
    try:
        from transformers.masking_utils import blockwise_overlay
    except ImportError:  # older transformers: the same rule Gemma 3's token_type_ids overlay encodes
        def blockwise_overlay(ids):
            def inner(batch_idx, head_idx, q_idx, kv_idx):
                return (ids[batch_idx, q_idx] == ids[batch_idx, kv_idx]) & (ids[batch_idx, q_idx] >= 0)
            return inner
    return blockwise_overlay(block_ids)


def hf_image_mask(config, input_ids, attention_mask, bidirectional=True):
    """transformers' create_causal_mask with the Gemma 3 image-block overlay (eager float mask)."""
    from transformers.masking_utils import create_causal_mask

    batch, length = input_ids.shape
    params = inspect.signature(create_causal_mask).parameters
    kwargs = {"config": config, "attention_mask": attention_mask}
    embeds = torch.zeros(batch, length, config.hidden_size)
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(length)
    if "position_ids" in params:
        kwargs["position_ids"] = torch.arange(length)[None]
    if bidirectional:
        kwargs["or_mask_function"] = _blockwise_overlay(block_ids_python(input_ids == IMAGE_ID))
    elif "allow_is_causal_skip" in params:
        kwargs["allow_is_causal_skip"] = False
    mask = create_causal_mask(**kwargs)
    assert mask is not None and mask.dim() == 4
    return mask


def text_config_of(model):
    return getattr(model.config, "text_config", None) or model.config


def build_reference(plain, converted):
    """Stock model + routed q/k/v copied from the converted one, eager attention."""
    ref = copy.deepcopy(plain)
    holder = _Holder()
    converted_modules = dict(converted.named_modules())
    for name, module in list(ref.named_modules()):
        conv = converted_modules.get(name)
        if isinstance(conv, HFLlavitAttention):
            for proj in ("q_proj", "k_proj", "v_proj"):
                image = getattr(conv, proj + "_image") if conv.separate_image_qkv else getattr(conv, proj)
                setattr(module, proj, RoutedLinear(copy.deepcopy(getattr(conv, proj)), copy.deepcopy(image), holder))
    text_config_of(ref)._attn_implementation = "eager"
    ref._holder = holder
    return ref


def reference_forward(ref, input_ids, attention_mask=None, bidirectional=True, mask4d=None, **kwargs):
    ref._holder.is_image = input_ids == IMAGE_ID
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if mask4d is None:
        mask4d = hf_image_mask(text_config_of(ref), input_ids, attention_mask, bidirectional)
    return ref(input_ids=input_ids, attention_mask=mask4d, **kwargs)


def reference_param_name(name):
    for proj in ("q_proj", "k_proj", "v_proj"):
        if f".{proj}_image." in name:
            return name.replace(f".{proj}_image.", f".{proj}.image.")
        if f".{proj}." in name and "vision_tower" not in name:
            return name.replace(f".{proj}.", f".{proj}.text.")
    return name


def convert(plain, **kwargs):
    model = copy.deepcopy(plain)
    if not isinstance(plain, transformers.LlavaForConditionalGeneration):
        kwargs.setdefault("image_token_id", IMAGE_ID)
    apply_llavit(model, **kwargs)
    return model


# ---------------------------------------------------------------------------- text-only
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_text_only_logits_equal_unconverted(kind):
    plain = make_text_model(kind)
    model = convert(plain)
    perturb_image_weights(model)  # irrelevant for text: no token routes to them
    ids = torch.randint(0, IMAGE_ID - 1, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = plain(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- images vs HF-mask reference
def _compare_forward_and_grads(model, ref, batch_kwargs, ids, mask, rtol=1e-4, atol=1e-5):
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, 1:][mask[:, :-1] == 0] = -100  # predicted from a padding position: meaningless
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **batch_kwargs)
    want = reference_forward(ref, ids, mask, labels=labels, **batch_kwargs)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], want.logits[keep], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.loss, want.loss, rtol=rtol, atol=atol)
    out.loss.backward()
    want.loss.backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        other = ref_params[reference_param_name(name)]
        if param.grad is None:
            assert other.grad is None or float(other.grad.abs().max()) == 0, name
            continue
        torch.testing.assert_close(param.grad, other.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
        checked += 1
    image_grads = [p.grad for n, p in model.named_parameters() if "_proj_image." in n]
    assert image_grads and all(g is not None and float(g.abs().sum()) > 0 for g in image_grads)
    return checked


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_text_model_with_images_matches_hf_mask_reference(kind):
    plain = make_text_model(kind)
    model = convert(plain).train()
    perturb_image_weights(model)
    ref = build_reference(plain, model).train()
    ids, mask = image_batch(pad_left=(0, 3))
    assert _compare_forward_and_grads(model, ref, {}, ids, mask) > 10


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_llava_matches_hf_mask_reference(kind):
    plain = make_llava(kind)
    model = convert(plain).train()
    perturb_image_weights(model)
    ref = build_reference(plain, model).train()
    ids, mask = image_batch(length=26, starts=(1, 7), pad_left=(0, 2))
    pixels = torch.randn(2, 3, 28, 28)
    assert _compare_forward_and_grads(model, ref, {"pixel_values": pixels}, ids, mask) > 20


def test_reference_check_can_fail():
    """The comparison detects a causal-only model and a model that ignores the image weights."""
    plain = make_text_model("qwen2")
    model = convert(plain)
    perturb_image_weights(model)
    ref = build_reference(plain, model)
    ids, mask = image_batch()
    with torch.no_grad():
        want = reference_forward(ref, ids, mask).logits
        assert torch.allclose(model(ids, attention_mask=mask).logits, want, atol=1e-5)
        causal = convert(plain, bidirectional_image=False, weights=None)
        causal.load_state_dict(model.state_dict())
        assert not torch.allclose(causal(ids, attention_mask=mask).logits, want, atol=1e-3)
        # ... and the causal one equals the reference with transformers' plain causal mask
        torch.testing.assert_close(causal(ids, attention_mask=mask).logits,
                                   reference_forward(ref, ids, mask, bidirectional=False).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(ids, attention_mask=mask).logits, want, atol=1e-3)


def test_shared_weights_ablation_matches_reference():
    plain = make_text_model("llama")
    model = convert(plain, separate_image_qkv=False)
    assert not llavit_state_dict(model)
    ref = build_reference(plain, model)
    ids, mask = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   reference_forward(ref, ids, mask).logits, rtol=1e-4, atol=1e-5)


def test_mask_only_attention_interface():
    from transformers import AttentionInterface

    assert "llavit" in AttentionInterface._global_mapping
    plain = make_text_model("qwen2")
    model = copy.deepcopy(plain)
    apply_llavit_mask(model, image_token_id=IMAGE_ID)
    assert text_config_of(model)._attn_implementation == "llavit"
    assert set(model.state_dict()) == set(plain.state_dict())
    ref = copy.deepcopy(plain)
    text_config_of(ref)._attn_implementation = "eager"
    ids, mask = image_batch(pad_left=(2, 0))
    keep = mask.bool()
    with torch.no_grad():
        full_mask = hf_image_mask(text_config_of(ref), ids, mask)
        want = ref(ids, attention_mask=full_mask).logits
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["convert", "mask_only"])
def test_bf16_autocast_training_step(mode):
    """Mixed-precision training (fp32 weights under bf16 autocast, what GPU training does): the
    stock modules hand the mask-only attention function q/k in float32 (fp32 RoPE tables) and v
    in bfloat16; both paths must run and stay close to the fp32 loss. CPU autocast, same rules."""
    plain = make_text_model("qwen2")
    model = copy.deepcopy(plain).train()
    if mode == "convert":
        apply_llavit(model, image_token_id=IMAGE_ID)
    else:
        apply_llavit_mask(model, image_token_id=IMAGE_ID)
    ids, mask = image_batch(pad_left=(0, 3))
    labels = torch.where(mask == 0, -100, ids)
    fp32 = model(ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss.float(), fp32, rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- training details
def test_gradient_checkpointing_same_grads():
    plain = make_text_model("qwen2")
    model = convert(plain).train()
    perturb_image_weights(model)
    ckpt = copy.deepcopy(model)  # the deep copy keeps a working converted forward
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = image_batch()
    for m in (model, ckpt):
        m(ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_inputs_embeds_with_image_mask():
    plain = make_text_model("qwen2")
    model = convert(plain)
    perturb_image_weights(model)
    ids, mask = image_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings()(ids)
        got = model(inputs_embeds=embeds, attention_mask=mask, image_mask=ids == IMAGE_ID).logits
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="image_mask"):
        model(inputs_embeds=embeds, attention_mask=mask)


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", ["qwen2", "llava"])
def test_save_pretrained_from_pretrained_restores_image_weights(tmp_path, family):
    plain = make_llava("llama") if family == "llava" else make_text_model("qwen2")
    model = convert(plain)
    perturb_image_weights(model)
    model.save_pretrained(tmp_path)
    cls = type(plain)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert not llavit_state_dict(loaded)  # the stock class drops the image keys ...
    apply_llavit(loaded)  # ... and apply_llavit restores them from config._name_or_path
    for key, value in llavit_state_dict(model).items():
        torch.testing.assert_close(llavit_state_dict(loaded)[key], value)
    ids, mask = image_batch()
    kwargs = {"pixel_values": torch.randn(2, 3, 28, 28)} if family == "llava" else {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask, **kwargs).logits,
                                   model(ids, attention_mask=mask, **kwargs).logits)
    # explicit paths: a state dict, or weights=None (copies of the text weights)
    fresh = cls.from_pretrained(tmp_path)
    apply_llavit(fresh, weights=None)
    q_text = [p for n, p in fresh.named_parameters()
              if n.endswith("layers.0.self_attn.q_proj.weight") and "vision" not in n][0]
    q_image = [p for n, p in fresh.named_parameters() if n.endswith("layers.0.self_attn.q_proj_image.weight")][0]
    torch.testing.assert_close(q_image, q_text)
    assert load_llavit_weights(fresh, llavit_state_dict(model)) == len(llavit_state_dict(model))
    torch.testing.assert_close(llavit_state_dict(fresh), llavit_state_dict(model))
    # a converted config whose checkpoint cannot be found: a warning, not silent copies
    lost = cls.from_pretrained(tmp_path)
    lost.config._name_or_path = str(tmp_path / "moved-away")
    with pytest.warns(UserWarning, match="not found locally"):
        apply_llavit(lost)


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    plain = make_text_model("qwen2")
    with pytest.raises(ValueError, match=r"image_token_id: expected an id in the vocabulary \[0, 100\), got 100"):
        apply_llavit(copy.deepcopy(plain), image_token_id=VOCAB)
    with pytest.raises(ValueError, match="image_token_id: Qwen2ForCausalLM has no image token"):
        apply_llavit(copy.deepcopy(plain))
    with pytest.raises(TypeError, match="model: got Linear, which apply_llavit does not support. Supported text models: Qwen2"):
        apply_llavit(nn.Linear(2, 2), image_token_id=1)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB))
    with pytest.raises(TypeError, match="got GPT2LMHeadModel"):
        apply_llavit(gpt2, image_token_id=1)
    model = convert(plain)
    ids, mask = image_batch()
    with pytest.raises(ValueError, match="llavit layout: it covers"):
        model(ids, attention_mask=mask, image_mask=torch.zeros(2, 23, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 24, 24))
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 24, 32)
    cos = sin = torch.ones(1, 24, 8)
    with pytest.raises(ValueError, match="llavit layout: it covers"):
        attn(hidden, (cos, sin), None, llavit_layout=LlavitLayoutSource(torch.zeros(2, 20, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="no layout"):
        attn(hidden, (cos, sin), None)


# ---------------------------------------------------------------------------- convergence
def test_convergence_tiny_llava_follows_reference_loss_curve():
    """30 AdamW steps after conversion: the loss curve follows the HF-mask reference's and falls."""
    plain = make_llava("qwen2")
    model = convert(plain).train()
    ref = build_reference(plain, model).train()
    gen = torch.Generator().manual_seed(7)
    batches = []
    for i in range(4):
        ids, mask = image_batch(length=26, starts=(1 + i, 7 - i), pad_left=(0, i % 3))
        ids = torch.where(ids == IMAGE_ID, ids, torch.randint(0, 20, ids.shape, generator=gen))  # learnable text
        labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
        labels[:, 1:][mask[:, :-1] == 0] = -100
        mask4d = hf_image_mask(text_config_of(ref), ids, mask)  # built once per batch
        batches.append((ids, mask, labels, torch.randn(2, 3, 28, 28, generator=gen), mask4d))
    curves = {}
    for name, net in (("llavit", model), ("reference", ref)):
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        losses = []
        for step in range(30):
            ids, mask, labels, pixels, mask4d = batches[step % len(batches)]
            if name == "llavit":
                loss = net(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels).loss
            else:
                loss = reference_forward(net, ids, mask, mask4d=mask4d, labels=labels, pixel_values=pixels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        curves[name] = torch.tensor(losses)
    ours, want = curves["llavit"], curves["reference"]
    assert ours[-4:].mean() < 0.8 * ours[:4].mean(), ours
    torch.testing.assert_close(ours, want, rtol=2e-3, atol=2e-3)
    # the image weights were trained away from the text ones (they receive their own gradients)
    attn = model.model.language_model.layers[0].self_attn
    assert not torch.allclose(attn.q_proj_image.weight, attn.q_proj.weight)


# ---------------------------------------------------------------------------- packed (padding-free) batches
def test_packed_documents_from_position_ids():
    """Rows holding several documents (position ids restart, no attention_mask), as transformers packs."""
    plain = make_text_model("qwen2")
    model = convert(plain)
    perturb_image_weights(model)
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, IMAGE_ID - 1, (n,), generator=gen) for n in (7, 21, 12, 16)]
    docs[1][3:19] = IMAGE_ID
    docs[3][0:16] = IMAGE_ID  # a document that is one whole image
    rows = [torch.cat(docs[:2]), torch.cat(docs[2:])]  # 28 tokens each
    ids = torch.stack(rows)
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(21)]), torch.cat([torch.arange(12), torch.arange(16)])])
    with torch.no_grad():
        got = model(ids, position_ids=positions).logits
        separate = [model(d[None]).logits[0] for d in docs]
        text_ids = torch.where(ids == IMAGE_ID, 5, ids)
        text_got = model(text_ids, position_ids=positions).logits
        # transformers' own packed-sequence mask (it detects packing only without a cache)
        text_want = plain(text_ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got[0], torch.cat(separate[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], torch.cat(separate[2:]), rtol=1e-5, atol=1e-5)
    from transformers import masking_utils

    if hasattr(masking_utils, "find_packed_sequence_indices"):  # transformers >= 4.54 detects packing itself
        torch.testing.assert_close(text_got, text_want, rtol=1e-5, atol=1e-5)
    # explicit offsets (what DataCollatorWithFlattening passes): same result
    cu = torch.tensor([0, 7, 28, 40, 56], dtype=torch.int32)
    with torch.no_grad():
        explicit = model(ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=21, max_length_k=21).logits
    torch.testing.assert_close(explicit, got)
    # the mask-only attention function handles packing too
    masked = copy.deepcopy(plain)
    apply_llavit_mask(masked, image_token_id=IMAGE_ID)
    with torch.no_grad():
        torch.testing.assert_close(masked(text_ids, position_ids=positions).logits, text_got, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU tier)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_converted_model_on_cuda_triton_matches_reference_ops(dtype):
    """A converted model on CUDA (Triton kernels) against the same model on the reference ops:
    logits, loss gradients, and generate() with the KV cache (strided cached K/V)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=512, num_hidden_layers=2, vocab_size=VOCAB)  # head dim 64
    plain = transformers.Qwen2ForCausalLM(config).to("cuda", dtype)
    model = convert(plain).train()
    perturb_image_weights(model)
    ids, mask = image_batch(length=96, starts=(5, 30), pad_left=(0, 7))
    ids, mask = ids.cuda(), mask.cuda()
    attn_modules = [m for m in model.modules() if isinstance(m, HFLlavitAttention)]
    results = {}
    for backend in ("reference", None):
        for m in attn_modules:
            m.backend = backend
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=torch.where(mask == 0, -100, ids))
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.float(), grads)
    keep = mask.bool()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(results[None][0][keep], results["reference"][0][keep], **tol)
    for name, grad in results["reference"][1].items():
        scale = float(grad.abs().max()) + 1e-6
        torch.testing.assert_close(results[None][1][name] / scale, grad / scale, **tol, msg=lambda m: f"{name}: {m}")
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 101)


# ---------------------------------------------------------------------------- frozen state, config ownership
def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_conversion_keeps_requires_grad():
    """A frozen model stays frozen; a partly frozen one keeps its pattern; image copies take the flag
    of the text projection they copy."""
    frozen = make_llava("qwen2").requires_grad_(False)
    apply_llavit(frozen)
    assert _trainable(frozen) == []
    partial = make_llava("qwen2").requires_grad_(False)
    lm = partial.model.language_model
    lm.layers[0].self_attn.q_proj.requires_grad_(True)  # one text projection trainable
    lm.layers[1].mlp.requires_grad_(True)
    before = _trainable(partial)
    apply_llavit(partial)
    after = _trainable(partial)
    assert set(before) <= set(after)
    assert sorted(set(after) - set(before)) == ["model.language_model.layers.0.self_attn.q_proj_image.bias",
                                                "model.language_model.layers.0.self_attn.q_proj_image.weight"]
    # the usual case: everything trainable stays trainable, image copies included
    full = convert(make_text_model("llama"))
    assert all(p.requires_grad for p in full.parameters())


def test_conversion_does_not_touch_a_shared_config(tmp_path):
    """Two models built from one config object: converting one leaves the other working and unconverted."""
    torch.manual_seed(0)
    config = text_config("qwen2")
    a = transformers.Qwen2ForCausalLM(config).eval()
    b = transformers.Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, IMAGE_ID - 1, (2, 9))
    with torch.no_grad():
        b_before = b(ids).logits
    apply_llavit(a, image_token_id=IMAGE_ID)
    assert a.config is not config and a.model.config is a.config
    assert all(m.config is a.config for m in a.modules() if isinstance(m, HFLlavitAttention))
    assert not hasattr(config, "llavit") and config._attn_implementation != "llavit"
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, b_before)  # the other model still runs, unchanged
        a(ids)
    b.save_pretrained(tmp_path)
    import json

    assert "llavit" not in json.loads((tmp_path / "config.json").read_text())
    # LLaVA: the sub-configs are copied too
    llava = make_llava("qwen2")
    text_cfg = llava.config.text_config
    apply_llavit(llava)
    assert llava.config.text_config is not text_cfg and text_cfg._attn_implementation != "llavit"
    assert all(m.__dict__.get("config") is not text_cfg for m in llava.modules())  # no module keeps the shared one


# ---------------------------------------------------------------------------- loading converted checkpoints
def test_from_pretrained_reapplies_conversion_and_plain_load_warns(tmp_path):
    import warnings

    from llavit_kernels.integrations import from_pretrained

    plain = make_llava("qwen2")
    model = convert(plain)
    perturb_image_weights(model)
    model.save_pretrained(tmp_path)
    ids, mask = image_batch()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, pixel_values=pixels).logits
    loaded = from_pretrained(transformers.LlavaForConditionalGeneration, tmp_path).eval()
    assert loaded.config.llavit == model.config.llavit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converted load does not warn
        with torch.no_grad():
            got = loaded(ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, want)
    # a plain load: warns on first use (once), naming the fix
    stock = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with pytest.warns(UserWarning, match=r"LLaViT-converted checkpoint .*integrations.from_pretrained\(ModelClass, path\)"):
        with torch.no_grad():
            stock(ids, attention_mask=mask, pixel_values=pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            stock(ids, attention_mask=mask, pixel_values=pixels)  # once
    # converting the plain load afterwards removes the warning and restores the model
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    apply_llavit(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.testing.assert_close(again(ids, attention_mask=mask, pixel_values=pixels).logits, want)
    # a stock checkpoint through from_pretrained: converted fresh (no image weights to read)
    plain.save_pretrained(tmp_path / "stock")
    fresh = from_pretrained(transformers.LlavaForConditionalGeneration, tmp_path / "stock").eval()
    with torch.no_grad():
        text_ids = torch.where(ids == IMAGE_ID, 3, ids)
        torch.testing.assert_close(fresh(text_ids, attention_mask=mask).logits, plain(text_ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


def test_transformers_floor_is_declared_once():
    """setup.py's transformers floor is the one the package checks at import."""
    import pathlib
    import re

    from llavit_kernels.integrations import MIN_TRANSFORMERS

    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert re.search(r'"transformers>=([0-9.]+)"', setup).group(1) == MIN_TRANSFORMERS
    from packaging.version import Version

    assert Version(transformers.__version__) >= Version(MIN_TRANSFORMERS)


# ---------------------------------------------------------------------------- feature layers (LLaVA)
def test_feature_layers_swap_the_projector_and_concatenate_hidden_states(tmp_path):
    """apply_llavit(feature_layers=...) on LLaVA: the vision hidden states of those layers, CLS dropped,
    concatenated, through a new projector of 3x the input width; saved and reloaded with its weights."""
    from llavit_kernels.integrations import from_pretrained

    model = make_llava("qwen2")
    hidden = model.config.vision_config.hidden_size
    old_projector = model.model.multi_modal_projector
    apply_llavit(model, feature_layers=(0, 1, -1))
    projector = model.model.multi_modal_projector
    assert projector is not old_projector and projector.linear_1.in_features == 3 * hidden
    assert model.config.vision_feature_layer == [0, 1, -1] and model.config.llavit["feature_layers"] == [0, 1, -1]
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        want = projector(torch.cat([states[i][:, 1:] for i in (0, 1, -1)], dim=-1))
        got = model.model.get_image_features(pixels).pooler_output
        got = torch.stack(list(got)) if isinstance(got, (list, tuple)) else got  # per image, or batched
        torch.testing.assert_close(got, want)
    ids, mask = image_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(transformers.LlavaForConditionalGeneration, tmp_path).eval()
    assert loaded.config.vision_feature_layer == [0, 1, -1] and loaded.config.llavit["feature_layers"] == [0, 1, -1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask, pixel_values=pixels).logits, logits)
    # converting again with the same layers keeps the trained projector
    kept = loaded.model.multi_modal_projector
    apply_llavit(loaded, feature_layers=[0, 1, -1])
    assert loaded.model.multi_modal_projector is kept


def test_feature_layers_keep_dtype_device_and_frozen_flag():
    model = make_llava("qwen2").to(torch.bfloat16).requires_grad_(False)
    apply_llavit(model, feature_layers=(1, 2))
    params = list(model.model.multi_modal_projector.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    trainable = make_llava("qwen2")
    apply_llavit(trainable, feature_layers=(1, 2))
    assert all(p.requires_grad for p in trainable.model.multi_modal_projector.parameters())


@pytest.mark.parametrize("bad,error,match", [
    ((), TypeError, "non-empty sequence of ints"),
    (5, TypeError, "sequence of ints"),
    ((1, True), TypeError, "sequence of ints"),
    ((1, 3), ValueError, r"2 layers, so indices must be in \[-3, 2\].*\[3\]"),
    ((-4,), ValueError, r"got \[-4\]"),
])
def test_feature_layers_validation(bad, error, match):
    with pytest.raises(error, match="feature_layers: .*" + match):
        apply_llavit(make_llava("qwen2"), feature_layers=bad)


def test_feature_layers_refused_for_text_models_and_after_peft():
    with pytest.raises(ValueError, match="feature_layers: only for LLaVA-family models"):
        apply_llavit(make_text_model("qwen2"), image_token_id=IMAGE_ID, feature_layers=(1, 2))
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(make_llava("qwen2"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="before wrapping the model with PEFT"):
        apply_llavit(wrapped, feature_layers=(1, 2))

"""ModalityLinear and LlavitAttention against float64 brute-force references built from the definition."""

import math

import pytest
import torch
from torch import nn

from llavit_kernels import LlavitAttention, LlavitKVCache, ModalityLinear, SpanLayout
from llavit_kernels.nn import causal_mask_layout


# ---------------------------------------------------------------------------- brute-force references
def span_ids_python(is_image_row):
    """Id of the maximal run of image tokens each token belongs to (-1 for text), by a Python loop."""
    ids, current, prev = [], -1, False
    for flag in is_image_row.tolist():
        if flag and not prev:
            current += 1
        ids.append(current if flag else -1)
        prev = flag
    return ids


def brute_mask(is_image, valid, bidirectional=True):
    """allowed[b, q, k] from the rule: both valid and (k <= q or same image span)."""
    batch, length = is_image.shape
    mask = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        ids = span_ids_python(is_image[b])
        for q in range(length):
            for k in range(length):
                if not (valid[b, q] and valid[b, k]):
                    continue
                same_span = bidirectional and ids[q] >= 0 and ids[q] == ids[k]
                mask[b, q, k] = k <= q or same_span
    return mask


def rope64(x, pos, theta, head_dim):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = pos[..., None].double() * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[..., None, :], emb.sin()[..., None, :]
    half = head_dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def brute_attention(module, x, is_image, valid, positions, bidirectional=True):
    """float64 LLaViT attention: per-token weight pick, RoPE, dense-mask softmax, o_proj."""
    p = {k: v.double() for k, v in module.named_parameters()}  # not detached: grads flow
    x = x.double()
    sel = is_image[..., None]

    def proj(name):
        image_name = name + "_image" if module.separate_image_qkv else name
        y_t = x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0)
        y_i = x @ p[f"{image_name}.weight"].T + p.get(f"{image_name}.bias", 0)
        return torch.where(sel, y_i, y_t)

    B, T, _ = x.shape
    H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    q = rope64(proj("q_proj").view(B, T, H, D), positions, module.rope_theta, D)
    k = rope64(proj("k_proj").view(B, T, Hkv, D), positions, module.rope_theta, D)
    v = proj("v_proj").view(B, T, Hkv, D)
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    mask = brute_mask(is_image, valid, bidirectional)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, H * D)
    return out @ p["o_proj.weight"].T + p.get("o_proj.bias", 0)


def perturb_image_weights(module, scale=0.5):
    """Make the image weights differ from the text ones, so routing mistakes show."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "_image" in name:
                param.add_(scale * torch.randn_like(param) / math.sqrt(param.shape[-1]))


def random_batch(batch=3, length=17, hidden=32, left_pad=(0, 3, 1)):
    x = torch.randn(batch, length, hidden)
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    is_image[0, 2:7] = True
    is_image[1, 5:9] = True
    is_image[1, 11:15] = True
    is_image[2, 1:length] = True  # nearly all image
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b, pad in enumerate(left_pad):
        valid[b, :pad] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return x, is_image, valid, positions


# ---------------------------------------------------------------------------- ModalityLinear
def test_modality_linear_from_linear_and_routing():
    linear = nn.Linear(16, 24)
    ml = ModalityLinear.from_linear(linear)
    x = torch.randn(2, 9, 16)
    is_image = torch.rand(2, 9) > 0.5
    torch.testing.assert_close(ml(x, is_image), linear(x))
    assert set(dict(ml.named_parameters())) == {"weight", "bias", "weight_image", "bias_image"}
    perturb_image_weights(ml)
    want = torch.where(is_image[..., None], x @ ml.weight_image.T + ml.bias_image, x @ ml.weight.T + ml.bias)
    got = ml(x, SpanLayout.from_image_mask(is_image))
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert ml.weight_image.grad is not None and ml.weight.grad is not None
    # image rows only feed the image weights
    torch.testing.assert_close(ml.bias_image.grad, is_image.sum().float().expand(24))


def test_modality_linear_no_bias_and_errors():
    ml = ModalityLinear(8, 4, bias=False)
    assert ml.bias is None and ml.bias_image is None
    with pytest.raises(ValueError, match="leading dims"):
        ml(torch.randn(2, 5, 8), torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="nn.Linear"):
        ModalityLinear.from_linear(nn.Conv1d(2, 2, 1))


# ---------------------------------------------------------------------------- LlavitAttention
@pytest.mark.parametrize("separate,bidirectional", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_attention_matches_brute_force_forward_and_grads(separate, bidirectional, heads, kv_heads):
    attn = LlavitAttention(32, heads, kv_heads, qkv_bias=True, o_bias=True, separate_image_qkv=separate,
                           bidirectional_image=bidirectional, rope_theta=500.0).double()
    perturb_image_weights(attn)
    x, is_image, valid, positions = random_batch()
    x = x.double().requires_grad_(True)
    layout = SpanLayout.from_image_mask(is_image, attention_mask=valid.long())
    out = attn(x, layout)  # default position ids: counted from the first non-padding token
    ref_module = attn
    want = brute_attention(ref_module, x, is_image & valid, valid, positions, bidirectional)
    rows = valid[..., None]
    torch.testing.assert_close(out * rows, want * rows, rtol=1e-9, atol=1e-9)

    grad_out = torch.randn_like(out) * rows
    params = dict(attn.named_parameters())
    grads = torch.autograd.grad(out, [x, *params.values()], grad_out)
    want_grads = torch.autograd.grad(want, [x, *params.values()], grad_out)
    for name, g, w in zip(["x", *params], grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad of {name}: {m}")
    if separate:  # image tokens really reach the image weights
        assert float(grads[1 + list(params).index("q_proj_image.weight")].abs().sum()) > 0


def test_attention_detects_wrong_routing():
    """The brute-force check can fail: swapping modalities changes the output."""
    attn = LlavitAttention(32, 4, 2).double()
    perturb_image_weights(attn)
    x, is_image, valid, positions = random_batch(left_pad=(0, 0, 0))
    out = attn(x.double(), SpanLayout.from_image_mask(is_image))
    wrong = brute_attention(attn, x, ~is_image, valid, positions)
    assert not torch.allclose(out, wrong, atol=1e-4)
    causal = brute_attention(attn, x, is_image, valid, positions, bidirectional=False)
    assert not torch.allclose(out, causal, atol=1e-4)


def test_text_only_equals_plain_attention_and_image_init_is_copy():
    """With image weights initialised as copies, LLaViT attention on text equals plain causal GQA."""
    attn = LlavitAttention(32, 4, 2)
    x = torch.randn(2, 11, 32)
    out = attn(x, SpanLayout.from_image_mask(torch.zeros(2, 11, dtype=torch.bool)))
    B, T = 2, 11
    q = attn.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
    cos, sin = attn.rotary(torch.arange(T), x.dtype)
    rot = lambda t: t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(B, T, 32)), rtol=1e-5, atol=1e-5)
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn, name + "_image").weight, getattr(attn, name).weight)
    with torch.no_grad():
        attn.q_proj.weight.add_(1.0)
    attn.init_image_from_text()
    torch.testing.assert_close(attn.q_proj_image.weight, attn.q_proj.weight)


def test_shared_weights_have_no_image_params():
    attn = LlavitAttention(32, 4, separate_image_qkv=False)
    assert not any("_image" in n for n, _ in attn.named_parameters())
    assert {"q_proj.weight", "k_proj.bias", "o_proj.weight"} <= set(attn.state_dict())


def test_kv_cache_chunks_equal_full_forward():
    attn = LlavitAttention(32, 4, 2)
    perturb_image_weights(attn)
    x, is_image, valid, _ = random_batch(left_pad=(0, 2, 1))
    mask = valid.long()
    full = attn(x, SpanLayout.from_image_mask(is_image, attention_mask=mask))
    cache = LlavitKVCache()
    outs = []
    # chunks [0, 9) [9, 15) then 1-token decode steps; no chunk splits an image span
    is_image = is_image.clone()
    is_image[2] = False
    is_image[2, 1:8] = True
    full = attn(x, SpanLayout.from_image_mask(is_image, attention_mask=mask))
    for start, stop in [(0, 9), (9, 15), (15, 16), (16, 17)]:
        layout = SpanLayout.from_image_mask(is_image[:, start:stop], attention_mask=mask[:, :stop], past_length=cache.length)
        outs.append(attn(x[:, start:stop], layout, kv_cache=cache))
    assert cache.length == 17
    rows = valid[..., None]
    torch.testing.assert_close(torch.cat(outs, 1) * rows, full * rows, rtol=1e-5, atol=1e-5)


def test_packed_equals_padded_per_document():
    attn = LlavitAttention(32, 4, 2, o_bias=True)
    perturb_image_weights(attn)
    lengths = [5, 9, 4]
    xs = [torch.randn(n, 32) for n in lengths]
    imgs = [torch.zeros(n, dtype=torch.bool) for n in lengths]
    imgs[0][0:3] = True
    imgs[1][2:6] = True
    imgs[2][:] = True
    cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    packed = attn(torch.cat(xs), SpanLayout.from_packed(torch.cat(imgs), cu))
    for i, (x, img) in enumerate(zip(xs, imgs)):
        single = attn(x[None], SpanLayout.from_image_mask(img[None]))[0]
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("past", [0, 4])
def test_causal_mask_layout_equals_text_only_layout(past):
    is_image = torch.zeros(3, 10, dtype=torch.bool)
    is_image[0, 1:5] = True
    is_image[1, 6:10] = True
    is_image[2, :] = True
    mask = torch.ones(3, past + 10, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    got = causal_mask_layout(SpanLayout.from_image_mask(is_image, mask, past_length=past))
    want = SpanLayout.from_image_mask(torch.zeros_like(is_image), mask, past_length=past)
    for field in ("kv_start", "kv_end", "q_start", "q_end"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=field)
    cu = torch.tensor([0, 4, 10, 30], dtype=torch.int32)
    img = torch.rand(30) > 0.4
    got = causal_mask_layout(SpanLayout.from_packed(img, cu))
    want = SpanLayout.from_packed(torch.zeros_like(img), cu)
    assert torch.equal(got.dense_mask(), want.dense_mask())
    assert torch.equal(got.dense_mask_from_key_intervals(), want.dense_mask_from_key_intervals())


def test_position_embeddings_argument_matches_own_rotary():
    attn = LlavitAttention(32, 4, 2, rope_theta=1000.0)
    x, is_image, _, _ = random_batch(left_pad=(0, 0, 0))
    layout = SpanLayout.from_image_mask(is_image)
    cos, sin = attn.rotary(torch.arange(17), x.dtype)
    a = attn(x, layout)
    torch.testing.assert_close(attn(x, layout, position_embeddings=(cos[None], sin[None])), a)
    torch.testing.assert_close(attn(x, layout, position_embeddings=(cos.expand(3, 17, 8), sin.expand(3, 17, 8))), a)
    torch.testing.assert_close(attn(x, layout, position_ids=torch.arange(17)[None].expand(3, 17)), a)
    assert not torch.allclose(attn(x, layout, position_ids=torch.arange(17) + 3), a)


def test_from_hf_attention_copies_weights():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    config = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_hidden_layers=1, vocab_size=50)
    hf = Qwen2Attention(config, layer_idx=0)
    attn = LlavitAttention.from_attention(hf)
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.layer_idx) == (4, 2, 8, 0)
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(attn, name).weight, getattr(hf, name).weight)
    torch.testing.assert_close(attn.v_proj_image.bias, hf.v_proj.bias)
    shared = LlavitAttention.from_attention(hf, separate_image_qkv=False, bidirectional_image=False)
    assert not shared.separate_image_qkv and not shared.bidirectional_image


def test_bad_inputs_raise_clear_errors():
    attn = LlavitAttention(32, 4, 2)
    x = torch.randn(2, 8, 32)
    layout = SpanLayout.from_image_mask(torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout: expected token shape"):
        attn(x, layout)
    with pytest.raises(ValueError, match="hidden_size=32"):
        attn(torch.randn(2, 9, 16), layout)
    with pytest.raises(TypeError, match="layout: expected a SpanLayout"):
        attn(x, torch.zeros(2, 8, dtype=torch.bool))
    chunk = SpanLayout.from_image_mask(torch.zeros(2, 8, dtype=torch.bool), past_length=3)
    with pytest.raises(ValueError, match="needs kv_cache"):
        attn(x, chunk)
    with pytest.raises(ValueError, match="past_length=0"):
        attn(x, chunk, kv_cache=LlavitKVCache())
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlavitAttention(32, 4, 3)
    with pytest.raises(ValueError, match="head_dim"):
        LlavitAttention(30, 4)


# ---------------------------------------------------------------------------- Triton backend through the module
def _triton_usable():
    import os

    from llavit_kernels.ops._backend import triton_importable

    return triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_usable(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_attention_triton_backend_matches_reference_with_cache():
    """The module on the Triton ops (interpreter on CPU, fp32) equals the reference ops: forward,
    gradients, and a decode step whose cached K/V are strided views (as transformers' caches give)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    attn = LlavitAttention(128, 2, 1, qkv_bias=True).to(device)  # head dim 64: one the kernels support
    perturb_image_weights(attn)
    x = torch.randn(2, 20, 128, device=device, requires_grad=True)
    is_image = torch.zeros(2, 20, dtype=torch.bool, device=device)
    is_image[0, 3:11] = True
    is_image[1, 12:20] = True
    mask = torch.ones(2, 20, dtype=torch.long, device=device)
    mask[1, :2] = 0
    layout = SpanLayout.from_image_mask(is_image, attention_mask=mask)
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        attn.backend = backend
        out = attn(x, layout)
        outs[backend] = out
        grads[backend] = torch.autograd.grad((out * mask[..., None]).square().sum(), [x, *attn.parameters()])
    keep = mask.bool()
    torch.testing.assert_close(outs["triton"][keep], outs["reference"][keep], rtol=2e-4, atol=2e-4)
    for g_t, g_r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(g_t, g_r, rtol=2e-3, atol=2e-4)
    # decode step: keys/values as [B, Hkv, T, D] storage viewed as [B, T, Hkv, D]
    attn.backend = "triton"
    with torch.no_grad():
        q, k, v = attn.project_qkv(x[:, -1:].detach(), is_image[:, -1:])
        k_cache = torch.randn(2, 1, 20, 64, device=device).transpose(1, 2)
        v_cache = torch.randn(2, 1, 20, 64, device=device).transpose(1, 2)
        step = SpanLayout.from_image_mask(torch.zeros(2, 1, dtype=torch.bool, device=device),
                                          attention_mask=mask[:, :20], past_length=19)
        got = attn.attend(q, k_cache, v_cache, step)
        attn.backend = "reference"
        want = attn.attend(q, k_cache.contiguous(), v_cache.contiguous(), step)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_fused_weight_cache_in_inference_follows_weight_updates():
    attn = LlavitAttention(32, 4, 2)
    x = torch.randn(1, 6, 32)
    layout = SpanLayout.from_image_mask(torch.tensor([[False, True, True, False, False, False]]))
    with torch.no_grad():
        first = attn(x, layout)
        assert "_fused_cache" in attn.__dict__
        torch.testing.assert_close(attn(x, layout), first)
        attn.q_proj_image.weight.mul_(2.0)  # in-place update bumps the version: cache refreshed
        changed = attn(x, layout)
    assert not torch.allclose(changed, first)
    out = attn(x, layout)  # with autograd: no cache, gradients reach the text/image weights
    assert "_fused_cache" not in attn.__dict__
    torch.testing.assert_close(out, changed)
    out.sum().backward()
    assert attn.q_proj_image.weight.grad is not None and attn.v_proj.weight.grad is not None
    copied = __import__("copy").deepcopy(attn)
    with torch.no_grad():
        torch.testing.assert_close(copied(x, layout), changed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU tier)")
def test_attention_forward_backward_has_no_host_sync_on_cuda():
    """Layout from input_ids (no padding mask: no value checks) + module forward/backward: no sync."""
    attn = LlavitAttention(256, 4, 2).cuda().to(torch.bfloat16)
    input_ids = torch.randint(0, 50, (2, 128), device="cuda")
    input_ids[:, 10:70] = 7
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    attn(x, SpanLayout.from_input_ids(input_ids, 7)).sum().backward()  # warm-up: autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layout = SpanLayout.from_input_ids(input_ids, 7)
        attn(x, layout).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_weight_cache_from_inference_mode_is_not_reused_with_autograd():
    """Frozen q/k/v (e.g. stage 1 with shared q/k/v) keep the fused-weight cache while training;
    an entry made under torch.inference_mode() must not be handed to autograd afterwards."""
    attn = LlavitAttention(32, 4, 2, separate_image_qkv=False)
    for name, p in attn.named_parameters():
        p.requires_grad_(name.startswith("o_proj"))
    x = torch.randn(1, 6, 32)
    layout = SpanLayout.from_image_mask(torch.zeros(1, 6, dtype=torch.bool))
    with torch.inference_mode():
        want = attn(x, layout)
    x = x.clone().requires_grad_(True)
    out = attn(x, layout)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), want)
    assert x.grad is not None


def test_wrapped_qkv_projection_is_called_not_ignored():
    """A wrapper the fused op cannot read (not nn.Linear, not a PEFT LoRA layer) is CALLED, with a
    one-time warning, never silently dropped: the output equals the module with the adapter merged."""
    import copy

    class LoraLike(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora_a, self.lora_b = base, nn.Linear(32, 2, bias=False), nn.Linear(2, 32, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.lora_b(self.lora_a(x))

    attn = LlavitAttention(32, 4, 4)
    with torch.no_grad():
        attn.q_proj_image.weight.add_(0.3 * torch.randn_like(attn.q_proj_image.weight))
    merged = copy.deepcopy(attn)
    attn.q_proj_image = LoraLike(attn.q_proj_image)
    with torch.no_grad():
        merged.q_proj_image.weight.add_(attn.q_proj_image.lora_b.weight @ attn.q_proj_image.lora_a.weight)
    is_image = torch.zeros(2, 9, dtype=torch.bool)
    is_image[:, 2:6] = True
    layout = SpanLayout.from_image_mask(is_image)
    x = torch.randn(2, 9, 32)
    with pytest.warns(UserWarning, match="LoraLike cannot run inside the fused"):
        got = attn(x, layout)
    torch.testing.assert_close(got, merged(x, layout), rtol=1e-5, atol=1e-5)
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        attn(x, layout)  # warned once per kind
    # the base module without the adapter differs (the adapter is not ignored)
    plain = copy.deepcopy(attn)
    plain.q_proj_image = plain.q_proj_image.base_layer
    assert not torch.allclose(plain(x, layout), got, atol=1e-4)


def test_fused_qkv_matches_separate_projections():
    """fused_qkv=True (Phi-3's one qkv_proj) computes what three projections with the same rows do."""
    sep = LlavitAttention(32, 4, 2, qkv_bias=True)
    with torch.no_grad():
        for name in ("q_proj_image", "k_proj_image", "v_proj_image"):
            getattr(sep, name).weight.add_(0.2 * torch.randn_like(getattr(sep, name).weight))
    fused = LlavitAttention(32, 4, 2, qkv_bias=True, fused_qkv=True)
    assert not hasattr(fused, "q_proj") and fused.image_projection_names == ("qkv_proj_image",)
    with torch.no_grad():
        for suffix in ("", "_image"):
            mods = [getattr(sep, n + suffix) for n in ("q_proj", "k_proj", "v_proj")]
            getattr(fused, "qkv_proj" + suffix).weight.copy_(torch.cat([m.weight for m in mods]))
            getattr(fused, "qkv_proj" + suffix).bias.copy_(torch.cat([m.bias for m in mods]))
        fused.o_proj.load_state_dict(sep.o_proj.state_dict())
    is_image = torch.zeros(2, 11, dtype=torch.bool)
    is_image[0, 3:8] = True
    layout = SpanLayout.from_image_mask(is_image)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(fused(x, layout), sep(x, layout), rtol=1e-5, atol=1e-5)

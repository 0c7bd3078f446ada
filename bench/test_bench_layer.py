"""bench_layer.py in smoke mode: it runs, writes its JSON, and its providers compute the same layer."""

import torch

import bench_layer as bl
from harness import default_device


def test_script_smoke(tmp_path):
    records = bl.main(["--smoke", "--out", str(tmp_path)])
    by_key = {(r["provider"], r["mode"]): r for r in records}
    for provider in ("plain_llava_sdpa_causal", "llavit_ours"):
        for mode in ("fwd", "fwd+bwd"):
            record = by_key[(provider, mode)]
            assert record["error"] is None and record["ms"] > 0, record
    assert by_key[("llavit_flex_index_scatter", "fwd")]["error"] is None
    assert by_key[("llavit_ours", "setup")]["ms"] > 0
    assert list(tmp_path.glob("layer-smoke-*.json"))


def _layers_with_equal_weights(dims, device):
    ours = bl.DecoderLayer(dims, bl.OursAttention(dims)).to(device)
    flex_fn, _ = bl.flex_parts(True)
    flex = bl.DecoderLayer(dims, bl.FlexIndexScatterAttention(dims, flex_fn)).to(device)
    plain = bl.DecoderLayer(dims, bl.PlainAttention(dims)).to(device)
    with torch.no_grad():
        for name in ("input_layernorm", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"):
            getattr(flex, name).load_state_dict(getattr(ours, name).state_dict())
            getattr(plain, name).load_state_dict(getattr(ours, name).state_dict())
        attn = ours.self_attn.attn
        attn.q_proj_image.weight.add_(0.1 * torch.randn_like(attn.q_proj_image.weight))  # make routing visible
        for fused, suffix in ((flex.self_attn.qkv_text, ""), (flex.self_attn.qkv_image, "_image")):
            fused.weight.copy_(torch.cat([getattr(attn, f"{n}_proj{suffix}").weight for n in "qkv"]))
            fused.bias.copy_(torch.cat([getattr(attn, f"{n}_proj{suffix}").bias for n in "qkv"]))
        plain.self_attn.qkv.load_state_dict(flex.self_attn.qkv_text.state_dict())
        flex.self_attn.o_proj.load_state_dict(attn.o_proj.state_dict())
        plain.self_attn.o_proj.load_state_dict(attn.o_proj.state_dict())
    return ours, flex, plain


def test_providers_compute_the_llavit_layer():
    """Ours equals the off-the-shelf LLaViT layer; the plain LLaVA layer differs (so the check can fail)."""
    device = default_device()
    dims = bl.model_dims(True)
    case = bl.cases(True)[0]
    ours, flex, plain = _layers_with_equal_weights(dims, device)
    x = torch.randn(case["B"], case["T"], dims["hidden"], device=device)
    is_image = bl.image_mask(case["B"], case["T"], case["spans"], device)
    cos, sin = bl.rope_tables(case["T"], dims["D"], x.dtype, device)
    _, create_block_mask = bl.flex_parts(True)
    block_mask = bl.make_block_mask(create_block_mask, is_image, device)
    with torch.no_grad():
        got = ours(x, cos=cos, sin=sin, layout=bl.SpanLayout.from_image_mask(is_image))
        want = flex(x, cos=cos, sin=sin, is_image=is_image, block_mask=block_mask)
        other = plain(x, cos=cos, sin=sin)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, other, atol=1e-3)

"""One decoder layer, forward and forward+backward: plain LLaVA vs LLaViT (ours) vs LLaViT off the shelf.

    python bench/bench_layer.py [--smoke] [--out DIR] [--cases S1,S2] [--providers a,b]

Qwen2.5-7B layer shape (hidden 3584, 28 query heads, 4 KV heads, head dim 128, MLP 18944,
RMSNorm, SwiGLU, QKV biases), bf16 on CUDA; the S1 / S2 batches of DESIGN.md section 5.

Providers (same MLP, norms, RoPE tables; only the attention block differs):
* ``plain_llava_sdpa_causal``: shared QKV (one fused nn.Linear), RoPE, SDPA ``is_causal`` (cuDNN /
  flash causal: LLaVA's layer, no bidirectional images, no image weights). The baseline.
* ``llavit_ours``: :class:`llavit_kernels.LlavitAttention` (modality-routed fused QKV with RoPE in
  the epilogue, then span attention).
* ``llavit_flex_index_scatter``: LLaViT from off-the-shelf parts: boolean index + scatter over two
  fused QKV weights (CogVLM style), RoPE, FlexAttention (compiled) with a block mask.
  Building the block mask is per batch, not per layer: it is reported as its own record
  (``mode="setup"``) and not included in the layer time. The same holds for our SpanLayout.

Target (DESIGN.md): ``llavit_ours`` <= 1.03x ``plain_llava_sdpa_causal`` fwd+bwd.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import default_device, make_record, plot_results, print_table, run_provider, save_results, smoke_mode  # noqa: E402

from llavit_kernels import LlavitAttention, SpanLayout  # noqa: E402
from llavit_kernels.ops import apply_rotary  # noqa: E402

PROVIDERS = ("plain_llava_sdpa_causal", "llavit_ours", "llavit_flex_index_scatter")
BASELINE = "plain_llava_sdpa_causal"


def model_dims(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=64, H=4, Hkv=2, D=16, mlp=128)
    return dict(hidden=3584, H=28, Hkv=4, D=128, mlp=18944)  # Qwen2.5-7B


def cases(smoke: bool):
    if smoke:
        return [dict(name="smoke", B=2, T=96, spans=[(5, 24), (50, 20)])]
    return [
        dict(name="S1", B=8, T=2048, spans=[(35, 576)]),
        dict(name="S2", B=2, T=8192, spans=[(100, 576), (1500, 576), (3500, 2304), (7000, 576)]),
    ]


def image_mask(batch, tokens, spans, device):
    is_image = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for start, length in spans:
        is_image[:, start:start + length] = True
    return is_image


def rope_tables(tokens, head_dim, dtype, device, theta=1e6):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------- attention variants
class PlainAttention(nn.Module):
    """LLaVA's attention: shared fused QKV, RoPE, SDPA causal."""

    def __init__(self, dims):
        super().__init__()
        self.H, self.Hkv, self.D = dims["H"], dims["Hkv"], dims["D"]
        self.qkv = nn.Linear(dims["hidden"], (self.H + 2 * self.Hkv) * self.D, bias=True)
        self.o_proj = nn.Linear(self.H * self.D, dims["hidden"], bias=False)

    def forward(self, x, cos, sin, **_):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], -1)
        q = apply_rotary(q.view(B, T, self.H, self.D), cos, sin).transpose(1, 2)
        k = apply_rotary(k.view(B, T, self.Hkv, self.D), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.D))


class OursAttention(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.attn = LlavitAttention(dims["hidden"], dims["H"], dims["Hkv"], dims["D"], qkv_bias=True)

    def forward(self, x, cos, sin, layout=None, **_):
        return self.attn(x, layout, position_embeddings=(cos, sin))


class FlexIndexScatterAttention(nn.Module):
    """LLaViT from off-the-shelf parts: boolean index + scatter QKV, FlexAttention."""

    def __init__(self, dims, flex_fn):
        super().__init__()
        self.H, self.Hkv, self.D = dims["H"], dims["Hkv"], dims["D"]
        out = (self.H + 2 * self.Hkv) * self.D
        self.qkv_text = nn.Linear(dims["hidden"], out, bias=True)
        self.qkv_image = nn.Linear(dims["hidden"], out, bias=True)
        self.o_proj = nn.Linear(self.H * self.D, dims["hidden"], bias=False)
        self.flex_fn = flex_fn

    def forward(self, x, cos, sin, is_image=None, block_mask=None, **_):
        B, T, hidden = x.shape
        flat, img = x.reshape(B * T, hidden), is_image.reshape(B * T)
        qkv = flat.new_empty(B * T, self.qkv_text.out_features)
        qkv = qkv.index_put((~img,), self.qkv_text(flat[~img]))
        qkv = qkv.index_put((img,), self.qkv_image(flat[img]))
        q, k, v = qkv.view(B, T, -1).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], -1)
        q = apply_rotary(q.view(B, T, self.H, self.D), cos, sin).transpose(1, 2)
        k = apply_rotary(k.view(B, T, self.Hkv, self.D), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        out = self.flex_fn(q, k, v, block_mask=block_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.D))


class DecoderLayer(nn.Module):
    """Qwen2 decoder layer: RMSNorm, attention, residual, RMSNorm, SwiGLU MLP, residual."""

    def __init__(self, dims, attention: nn.Module):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dims["hidden"], eps=1e-6)
        self.self_attn = attention
        self.post_attention_layernorm = nn.RMSNorm(dims["hidden"], eps=1e-6)
        self.gate_proj = nn.Linear(dims["hidden"], dims["mlp"], bias=False)
        self.up_proj = nn.Linear(dims["hidden"], dims["mlp"], bias=False)
        self.down_proj = nn.Linear(dims["mlp"], dims["hidden"], bias=False)

    def forward(self, x, **attn_kwargs):
        h = x + self.self_attn(self.input_layernorm(x), **attn_kwargs)
        y = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def span_block_ids(is_image):
    """Id of each token's image span (-1 on text), device ops only."""
    prev = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], 1)
    starts = is_image & ~prev
    ids = starts.long().cumsum(1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


@functools.lru_cache(maxsize=None)
def flex_parts(smoke: bool):
    """FlexAttention (compiled on GPU: its eager path is a slow reference without backward) and
    create_block_mask. One compiled wrapper for the whole run."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_fn = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    return flex_fn, create_block_mask


def make_block_mask(create_block_mask, is_image, device):
    B, T = is_image.shape
    ids = span_block_ids(is_image)

    def mask_mod(b, h, q_idx, kv_idx):
        same_image = (ids[b, q_idx] == ids[b, kv_idx]) & (ids[b, q_idx] >= 0)
        return (kv_idx <= q_idx) | same_image

    return create_block_mask(mask_mod, B, None, T, T, device=device)


# ---------------------------------------------------------------------------- benchmark
def bench_case(case, dims, providers, device, dtype, smoke):
    records = []
    B, T = case["B"], case["T"]
    shape = {"case": case["name"], "B": B, "T": T, "hidden": dims["hidden"], "H": dims["H"], "Hkv": dims["Hkv"],
             "D": dims["D"], "images": len(case["spans"])}
    is_image = image_mask(B, T, case["spans"], device)
    layout = SpanLayout.from_image_mask(is_image)
    cos, sin = rope_tables(T, dims["D"], dtype, device)
    common = dict(op="decoder_layer", shape=shape, dtype=dtype, device=device)

    def build(provider):
        """Returns (layer, attention kwargs), built inside the provider so a failure is recorded."""
        torch.manual_seed(0)
        with torch.device(device):  # build on the device: a 7B layer initialised on the CPU is slow
            if provider == "plain_llava_sdpa_causal":
                attn, kwargs = PlainAttention(dims), {}
            elif provider == "llavit_ours":
                attn, kwargs = OursAttention(dims), {"layout": layout}
            else:
                flex_fn, create_block_mask = flex_parts(smoke)
                block_mask = make_block_mask(create_block_mask, is_image, device)
                attn, kwargs = FlexIndexScatterAttention(dims, flex_fn), {"is_image": is_image, "block_mask": block_mask}
            layer = DecoderLayer(dims, attn)
        layer = layer.to(device=device, dtype=dtype)
        for p in layer.parameters():  # small weights so bf16 activations stay finite
            nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            nn.init.ones_(norm.weight)
        if provider == "llavit_ours":
            layer.self_attn.attn.init_image_from_text()
        return layer, kwargs

    x = torch.randn(B, T, dims["hidden"], device=device, dtype=dtype)
    grad_out = torch.randn_like(x)

    for provider in providers:
        def forward_factory(provider=provider):
            layer, kwargs = build(provider)

            def fwd():
                with torch.no_grad():
                    return layer(x, cos=cos, sin=sin, **kwargs)

            return fwd

        def train_factory(provider=provider):
            if smoke and provider == "llavit_flex_index_scatter":
                raise RuntimeError("skipped in smoke mode: FlexAttention's backward needs torch.compile")
            layer, kwargs = build(provider)
            params = [p for p in layer.parameters() if p.requires_grad]
            x_req = x.detach().requires_grad_(True)

            def fwd_bwd():  # autograd.grad: no .grad accumulation inside the timed call
                out = layer(x_req, cos=cos, sin=sin, **kwargs)
                return torch.autograd.grad(out, [x_req, *params], grad_out)

            return fwd_bwd

        records.append(run_provider(forward_factory, provider=provider, mode="fwd", **common))
        records.append(run_provider(train_factory, provider=provider, mode="fwd+bwd", **common))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # per-batch setup, outside the layer times: our layout vs FlexAttention's block mask
    records.append(run_provider(lambda: (lambda: SpanLayout.from_image_mask(is_image)), provider="llavit_ours",
                                mode="setup", **common))
    if "llavit_flex_index_scatter" in providers:
        def block_mask_factory():
            _, create_block_mask = flex_parts(True)
            return lambda: make_block_mask(create_block_mask, is_image, device)

        records.append(run_provider(block_mask_factory, provider="llavit_flex_index_scatter", mode="setup", **common))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of S1,S2")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    args = parser.parse_args(argv)
    device = default_device()
    smoke = args.smoke or smoke_mode()
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    selected = cases(smoke)
    if args.cases:
        wanted = set(args.cases.split(","))
        selected = [c for c in selected if c["name"] in wanted]
    dims = model_dims(smoke)
    records = []
    for case in selected:
        records += bench_case(case, dims, providers, device, dtype, smoke)
    print_table(records, baseline=BASELINE)
    name = "layer" + ("-smoke" if smoke else "")
    path = save_results(records, name, args.out)
    plot_results(records, path.with_suffix(".png"), title="one decoder layer (Qwen2.5-7B shape)")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()

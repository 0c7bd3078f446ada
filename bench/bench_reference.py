"""Reference ops against eager peers: the pure-torch ground truth's cost, on any device.

    python bench/bench_reference.py [--smoke] [--out DIR]

span_attention: reference (dense mask from the layout's intervals, fp32 softmax) vs eager attention
with a dense mask built by a Python loop over spans (how a model without this library does it) vs
SDPA with a dense bool mask. modality_linear: reference (both GEMMs + where) vs boolean index +
scatter vs one dense GEMM (the floor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import default_device, plot_results, print_table, run_provider, save_results, smoke_mode  # noqa: E402

from llavit_kernels import SpanLayout, modality_linear, span_attention  # noqa: E402


def image_mask(batch: int, tokens: int, spans, device) -> torch.Tensor:
    is_image = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for start, length in spans:
        is_image[:, start:start + length] = True
    return is_image


def eager_dense_mask(batch: int, tokens: int, spans, device) -> torch.Tensor:
    """The mask as a model without this library builds it: causal, then one block per image."""
    mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    for start, length in spans:
        mask[start:start + length, start:start + length] = True
    return mask.expand(batch, tokens, tokens)


def allowed_pairs(layout: SpanLayout, heads: int) -> float:
    return float((layout.kv_end - layout.kv_start).sum()) * heads


def attention_cases(smoke: bool):
    if smoke:
        return [dict(B=2, T=96, H=4, Hkv=2, D=32, spans=[(5, 24), (50, 20)])]
    return [
        dict(B=8, T=2048, H=28, Hkv=4, D=128, spans=[(35, 576)]),
        dict(B=2, T=8192, H=28, Hkv=4, D=128, spans=[(100, 576), (1500, 576), (3500, 2304), (7000, 576)]),
    ]


def linear_cases(smoke: bool):
    if smoke:
        return [dict(M=256, K=64, N=96, image_share=0.28)]
    return [dict(M=16384, K=3584, N=4608, image_share=0.28), dict(M=16384, K=2048, N=2560, image_share=0.28)]


def bench_attention(device, dtype, smoke):
    records = []
    for case in attention_cases(smoke):
        B, T, H, Hkv, D, spans = case["B"], case["T"], case["H"], case["Hkv"], case["D"], case["spans"]
        layout = SpanLayout.from_image_mask(image_mask(B, T, spans, device))
        q = torch.randn(B, T, H, D, device=device, dtype=dtype)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
        shape = {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D, "images": len(spans)}
        flops = 4.0 * D * allowed_pairs(layout, H)

        def reference():
            return span_attention(q, k, v, layout, backend="reference")

        def eager():
            mask = eager_dense_mask(B, T, spans, device)[:, None]
            kk = k.transpose(1, 2).repeat_interleave(H // Hkv, 1)
            vv = v.transpose(1, 2).repeat_interleave(H // Hkv, 1)
            scores = (q.transpose(1, 2) @ kk.transpose(-1, -2)) / D**0.5
            return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv).transpose(1, 2)

        def sdpa_dense():
            mask = layout.dense_mask()[:, None]
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
            ).transpose(1, 2)

        for provider, fn in (("reference", reference), ("eager", eager), ("sdpa_dense_mask", sdpa_dense)):
            records.append(run_provider(lambda fn=fn: fn, device=device, op="span_attention", provider=provider,
                                        shape=shape, dtype=dtype, mode="fwd", flops=flops))
    return records


def bench_linear(device, dtype, smoke):
    records = []
    for case in linear_cases(smoke):
        M, K, N, share = case["M"], case["K"], case["N"], case["image_share"]
        n_image = int(M * share)
        is_image = torch.zeros(M, dtype=torch.bool, device=device)
        is_image[M // 7: M // 7 + n_image] = True
        x = torch.randn(M, K, device=device, dtype=dtype)
        w_t, w_i = (torch.randn(N, K, device=device, dtype=dtype) * K**-0.5 for _ in range(2))
        b_t, b_i = (torch.randn(N, device=device, dtype=dtype) for _ in range(2))
        shape = {"M": M, "K": K, "N": N, "image_share": share}
        flops = 2.0 * M * K * N

        def reference():
            return modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="reference")

        def index_scatter():
            out = torch.empty(M, N, device=device, dtype=dtype)
            out[~is_image] = F.linear(x[~is_image], w_t, b_t)
            out[is_image] = F.linear(x[is_image], w_i, b_i)
            return out

        def dense_gemm():
            return F.linear(x, w_t, b_t)

        for provider, fn in (("reference", reference), ("index_scatter", index_scatter), ("dense_gemm", dense_gemm)):
            records.append(run_provider(lambda fn=fn: fn, device=device, op="modality_linear", provider=provider,
                                        shape=shape, dtype=dtype, mode="fwd", flops=flops))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    args = parser.parse_args(argv)
    device = default_device()
    smoke = args.smoke or smoke_mode()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = bench_attention(device, dtype, smoke) + bench_linear(device, dtype, smoke)
    print_table(records, baseline="reference")
    path = save_results(records, "reference" + ("-smoke" if smoke else ""), args.out)
    plot_results(records, path.with_suffix(".png"), title="reference ops vs eager")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()

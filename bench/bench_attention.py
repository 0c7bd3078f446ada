"""Span attention microbenchmark: ours (Triton) against every other way to get the LLaViT mask.

    python bench/bench_attention.py [--smoke] [--out DIR] [--cases S1,S2,sweep] [--providers a,b] [--modes fwd,fwd+bwd]

Shapes (DESIGN.md section 5): Qwen2.5-7B attention, 28 query heads, 4 KV heads, head dim 128, bf16.
``S1`` = 8 x 2048 tokens, one 576-token image at 35. ``S2`` = 2 x 8192 tokens, images at 100 (576),
1500 (576), 3500 (2304), 7000 (576). ``sweep``: 16384 tokens per batch, image share 0 / 0.3 / 1
at T = 4096, and T = 1024 / 16384 at share 0.3 (ours and the causal baselines only: FlexAttention
recompiles per shape).

Providers, in one run:
* ``ours``: ``span_attention(..., backend="triton")`` (the layout is built once per batch; its build
  time is reported as ``mode="setup"``).
* ``eager_dense_mask``: the pure-torch reference (dense [B, Tq, Tk] mask, fp32 softmax).
* ``sdpa_dense_mask``: ``F.scaled_dot_product_attention`` with the dense bool mask (K/V repeated
  to the query heads outside the timed region, as Hugging Face does).
* ``flex_attention``: ``torch.compile(flex_attention)`` with a ``mask_mod`` read from the layout's
  intervals; ``create_block_mask`` is timed on its own (``mode="setup"``).
* ``sdpa_causal_flash`` / ``sdpa_causal_cudnn``: plain causal SDPA forced to the flash / cuDNN
  backend: NOT our mask (no bidirectional images), ~the same work: the speed to match.
* ``flash_attn_causal``: ``flash_attn_func(causal=True)`` when the package imports.

Effective TFLOP/s count the allowed (query, key) pairs: 4 * D * H * pairs forward, 3.5x that for
forward+backward; causal providers are credited with their own (causal) pairs. Peak memory is the
CUDA allocation peak of one call beyond its inputs. Results: JSON (``--out``, default $OUT or
bench/results) and a PNG plot; a table on stdout with ratios against ``ours``.

``--smoke`` (automatic without CUDA): tiny CPU shapes, reference + SDPA, and ours through the Triton
interpreter when ``TRITON_INTERPRET=1``; one timed call each. Nothing is downloaded; no network.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel imports

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (  # noqa: E402
    benchmark_ms, default_device, make_record, peak_memory_bytes, plot_results, print_table, save_results,
    smoke_mode, synchronize,
)

from llavit_kernels import SpanLayout, span_attention  # noqa: E402
from llavit_kernels.ops._backend import triton_interpreting  # noqa: E402
from llavit_kernels.ops.span_attention import span_attention_reference  # noqa: E402

OP = "span_attention"
PROVIDERS = (
    "ours", "eager_dense_mask", "sdpa_dense_mask", "flex_attention",
    "sdpa_causal_flash", "sdpa_causal_cudnn", "flash_attn_causal",
)
SWEEP_PROVIDERS = ("ours", "sdpa_causal_flash", "sdpa_causal_cudnn", "flash_attn_causal")
CAUSAL = ("sdpa_causal_flash", "sdpa_causal_cudnn", "flash_attn_causal")
MODES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------- shapes
def model_dims(smoke: bool) -> dict:
    if smoke:
        return dict(H=2, Hkv=1, D=64)
    return dict(H=28, Hkv=4, D=128)  # Qwen2.5-7B


def cases(smoke: bool, which):
    if smoke:
        return [dict(name="smoke", B=1, T=48, spans=[(5, 12), (30, 9)], providers=None)]
    out = []
    if "S1" in which:
        out.append(dict(name="S1", B=8, T=2048, spans=[(35, 576)], providers=None))
    if "S2" in which:
        out.append(dict(name="S2", B=2, T=8192, spans=[(100, 576), (1500, 576), (3500, 2304), (7000, 576)],
                        providers=None))
    if "sweep" in which:
        for share in (0.0, 0.3, 1.0):
            out.append(dict(name=f"share{share:g}", B=4, T=4096, spans=_spans_for_share(4096, share),
                            providers=SWEEP_PROVIDERS))
        for tokens in (1024, 16384):
            out.append(dict(name=f"T{tokens}", B=16384 // tokens, T=tokens, spans=_spans_for_share(tokens, 0.3),
                            providers=SWEEP_PROVIDERS))
    return out


def _spans_for_share(tokens: int, share: float):
    """576-token images (one image of all tokens at share 1) spread evenly, text in between."""
    if share <= 0:
        return []
    if share >= 1:
        return [(0, tokens)]
    count = max(1, round(tokens * share / 576))
    gap = (tokens - count * 576) // (count + 1)
    return [(gap + i * (576 + gap), 576) for i in range(count)]


def image_mask(batch, tokens, spans, device):
    is_image = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for start, length in spans:
        is_image[:, start:start + length] = True
    return is_image


# ----------------------------------------------------------------------------- providers
def _qkv(case, dims, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q = (case["B"], case["T"], dims["H"], dims["D"])
    shape_k = (case["B"], case["T"], dims["Hkv"], dims["D"])
    q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
               for s in (shape_q, shape_k, shape_k))
    grad_out = torch.randn(shape_q, generator=gen, device=device, dtype=dtype)
    return q, k, v, grad_out


def _with_backward(fn, inputs, grad_out):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, grad_out)

    return run


def _sdpa_inputs(q, k, v, expand):
    """[B, H, T, D] views; K/V repeated to the query heads when ``expand`` (as HF's repeat_kv)."""
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))
    if expand:
        groups = qt.shape[1] // kt.shape[1]
        kt, vt = (t.repeat_interleave(groups, dim=1) for t in (kt, vt))
    return [t.contiguous().requires_grad_(q.requires_grad) for t in (qt, kt, vt)]


def build_provider(name, case, layout, dims, dtype, device, mode):
    """Return (callable, flops pairs kind) for one provider and mode; raise if unavailable."""
    backward = mode == "fwd+bwd"
    q, k, v, grad_bthd = _qkv(case, dims, dtype, device, backward)
    grad_bhtd = grad_bthd.transpose(1, 2).contiguous()

    if name == "ours":
        fn = lambda: span_attention(q, k, v, layout, backend="triton")  # noqa: E731
        return (_with_backward(fn, (q, k, v), grad_bthd) if backward else fn), "span"
    if name == "eager_dense_mask":
        fn = lambda: span_attention_reference(q, k, v, layout)  # noqa: E731
        return (_with_backward(fn, (q, k, v), grad_bthd) if backward else fn), "span"
    if name == "sdpa_dense_mask":
        qt, kt, vt = _sdpa_inputs(q, k, v, expand=True)
        mask = layout.dense_mask()[:, None]  # [B, 1, Tq, Tk] bool, built once (outside timing)
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # noqa: E731
        return (_with_backward(fn, (qt, kt, vt), grad_bhtd) if backward else fn), "span"
    if name == "flex_attention":
        from torch.nn.attention.flex_attention import flex_attention

        qt, kt, vt = _sdpa_inputs(q, k, v, expand=False)
        block_mask = flex_block_mask(layout, device)
        flex = torch.compile(flex_attention, dynamic=False)
        fn = lambda: flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True)  # noqa: E731
        return (_with_backward(fn, (qt, kt, vt), grad_bhtd) if backward else fn), "span"
    if name in ("sdpa_causal_flash", "sdpa_causal_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if device.type != "cuda":
            raise RuntimeError("flash / cuDNN SDPA backends need CUDA")
        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa_causal_flash" else SDPBackend.CUDNN_ATTENTION
        # GQA natively when the backend takes it, else K/V repeated outside the timed region.
        for expand in (False, True):
            qt, kt, vt = _sdpa_inputs(q, k, v, expand=expand)

            def fn(qt=qt, kt=kt, vt=vt, expand=expand):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not expand)

            try:
                run = _with_backward(fn, (qt, kt, vt), grad_bhtd) if backward else fn
                run()
                return run, "causal"
            except RuntimeError:
                if expand:
                    raise
        raise AssertionError("unreachable")
    if name == "flash_attn_causal":
        from flash_attn import flash_attn_func  # noqa: F401 - optional dependency

        fn = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
        return (_with_backward(fn, (q, k, v), grad_bthd) if backward else fn), "causal"
    raise ValueError(f"unknown provider {name!r}")


def flex_block_mask(layout, device):
    from torch.nn.attention.flex_attention import create_block_mask

    kv_start, kv_end = layout.kv_start, layout.kv_end

    def span_mask(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[b, q_idx]) & (kv_idx < kv_end[b, q_idx])

    return create_block_mask(span_mask, layout.batch_size, None, layout.num_queries, layout.num_keys, device=str(device))


def provider_available(name, device, smoke):
    if smoke:
        allowed = {"eager_dense_mask", "sdpa_dense_mask"}
        if device.type == "cuda" or triton_interpreting():
            allowed.add("ours")
        return name in allowed
    return True


# ----------------------------------------------------------------------------- measuring
def measure(fn, device, smoke):
    fn()  # compile / autotune outside timing
    synchronize(device)
    if smoke:
        ms = benchmark_ms(fn, device, warmup=0, rep=1)
    else:
        ms = benchmark_ms(fn, device, cuda_warmup_ms=10, cuda_rep_ms=60)
    return ms, peak_memory_bytes(fn, device)


def run_case(case, dims, dtype, device, providers, modes, smoke):
    records = []
    shape = dict(case=case["name"], B=case["B"], T=case["T"], H=dims["H"], Hkv=dims["Hkv"], D=dims["D"])
    is_image = image_mask(case["B"], case["T"], case["spans"], device)
    layout = SpanLayout.from_image_mask(is_image)
    span_pairs = int((layout.kv_end - layout.kv_start).sum())
    causal_pairs = case["B"] * case["T"] * (case["T"] + 1) // 2
    shape.update(image_share=round(float(is_image.float().mean()), 3), pairs=span_pairs)
    base = dict(op=OP, shape=shape, dtype=dtype, device=device)

    # Per-batch setup costs, on their own.
    setup_ms = benchmark_ms(lambda: SpanLayout.from_image_mask(is_image), device, warmup=1, rep=3 if smoke else 10)
    records.append(make_record(provider="ours", mode="setup", ms=setup_ms, **base))
    wanted = [p for p in providers if p in (case["providers"] or PROVIDERS) and provider_available(p, device, smoke)]
    if "flex_attention" in wanted:
        try:
            flex_block_mask(layout, device)
            setup = benchmark_ms(lambda: flex_block_mask(layout, device), device, warmup=1, rep=3)
            records.append(make_record(provider="flex_attention", mode="setup", ms=setup, **base))
        except Exception as exc:  # noqa: BLE001 - recorded
            records.append(make_record(provider="flex_attention", mode="setup", ms=None,
                                       error=f"{type(exc).__name__}: {exc}"[:300], **base))

    for mode in modes:
        for name in wanted:
            try:
                fn, kind = build_provider(name, case, layout, dims, dtype, device, mode)
                pairs = span_pairs if kind == "span" else causal_pairs
                flops = 4 * dims["D"] * dims["H"] * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                ms, peak = measure(fn, device, smoke)
                records.append(make_record(provider=name, mode=mode, ms=ms, flops=flops, peak_memory=peak, **base))
            except Exception as exc:  # noqa: BLE001 - a missing peer is a record with its error
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                records.append(make_record(provider=name, mode=mode, ms=None, error=f"{type(exc).__name__}: {exc}"[:300],
                                           **base))
            finally:
                fn = None  # free the closure's tensors before the next provider
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, one timed call each")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    parser.add_argument("--cases", default="S1,S2,sweep", help="comma list of S1, S2, sweep")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of providers")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd")
    args = parser.parse_args(argv)
    smoke = args.smoke or smoke_mode()
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = model_dims(smoke)
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    records = []
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the interpreter's numpy warnings
    for case in cases(smoke, args.cases.split(",")):
        records.extend(run_case(case, dims, dtype, device, providers, modes, smoke))
    print_table(records, baseline="ours")
    name = "attention-smoke" if smoke else "attention"
    path = save_results(records, name, args.out)
    plot_results([r for r in records if r["mode"] != "setup"], path.with_suffix(".png"),
                 title=f"span attention, {dtype}, {records[0]['device'] if records else ''}")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()

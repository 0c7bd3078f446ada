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
* ``composed``: ``span_attention(..., backend="composed")`` (the platform's first causal engine plus
  the image-span completion, merged by log-sum-exp); ``composed_<engine>`` forces one engine
  (``composed_cudnn``, ``composed_torch_flash``, ``composed_flash_attn`` on CUDA).
* ``sdpa_causal``: plain causal SDPA with the device's default backend (on CPU: the flash kernel,
  GQA native): NOT our mask, the floor the CPU table compares against.

``--cases cpu`` runs the CPU table (issue 9): Qwen2.5-0.5B (14/2 heads, D 64) and 7B (28/4, D 128)
attention, batch 1, T = 1024..8192 (``--cpu-T``), one 576-token image near the start (at 35) and one
near the end, fp32 and bf16 (``--cpu-dtypes``), providers composed, sdpa_causal, sdpa_dense_mask,
flex_attention (forward only, ``--flex-max-T``), eager_dense_mask (where its T x T fp32 scores fit in
``--reference-max-gb``); time = the fastest of ``--cpu-reps`` calls after a warm-up (the least
disturbed one on a shared machine; the median is kept as ``ms_median``); ratios against
``sdpa_causal`` and the process's peak resident memory
during one call beyond the resident memory before it (``/proc/self`` VmHWM, glibc's mmap threshold
pinned so freed blocks go back to the OS). Writes ``cpu-attention-<device>-<date>.json`` and a PNG.

Effective TFLOP/s count the allowed (query, key) pairs: 4 * D * H * pairs forward, 3.5x that for
forward+backward; causal providers are credited with their own (causal) pairs. Peak memory is the
CUDA allocation peak of one call beyond its inputs. Results: JSON (``--out``, default $OUT or
bench/results) and a PNG plot; a table on stdout with ratios against ``ours``.

``--smoke`` (automatic without CUDA): tiny CPU shapes, reference + SDPA, and ours through the Triton
interpreter when ``TRITON_INTERPRET=1``; one timed call each. Nothing is downloaded; no network.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
import sys
import warnings
from pathlib import Path
from typing import Optional

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
COMPOSED_PROVIDERS = ("composed", "composed_cudnn", "composed_torch_flash", "composed_flash_attn")
PROVIDERS = PROVIDERS + COMPOSED_PROVIDERS
SWEEP_PROVIDERS = ("ours", "sdpa_causal_flash", "sdpa_causal_cudnn", "flash_attn_causal")
CAUSAL = ("sdpa_causal_flash", "sdpa_causal_cudnn", "flash_attn_causal", "sdpa_causal")
CPU_PROVIDERS = ("composed", "sdpa_causal", "sdpa_dense_mask", "flex_attention", "eager_dense_mask")
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
    if name == "composed" or name.startswith("composed_"):
        engine = None if name == "composed" else name[len("composed_"):]
        fn = lambda: span_attention(q, k, v, layout, backend="composed", causal_engine=engine)  # noqa: E731
        return (_with_backward(fn, (q, k, v), grad_bthd) if backward else fn), "span"
    if name == "sdpa_causal":
        qt, kt, vt = _sdpa_inputs(q, k, v, expand=False)
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
        return (_with_backward(fn, (qt, kt, vt), grad_bhtd) if backward else fn), "causal"
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


# ----------------------------------------------------------------------------- CPU table (issue 9)
CPU_MODELS = {"0.5B": dict(H=14, Hkv=2, D=64), "7B": dict(H=28, Hkv=4, D=128)}


def cpu_case(tokens: int) -> dict:
    """Batch 1, one 576-token image near the start and one near the end."""
    return dict(name=f"T{tokens}", B=1, T=tokens, spans=[(35, 576), (tokens - 576 - 35, 576)], providers=None)


def _pin_malloc_mmap_threshold() -> None:
    """Make glibc serve blocks >= 128 KiB by mmap and unmap them on free (no dynamic threshold), so
    the resident set follows what is allocated and its high-water mark measures a call's peak."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except Exception:  # noqa: BLE001 - not glibc: the numbers are then upper bounds
        pass


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_memory_bytes(fn) -> Optional[int]:
    """Peak resident memory during one call beyond the resident memory before it (Linux)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_kb("VmRSS")
        fn()
        return max(0, (_status_kb("VmHWM") - before) * 1024)
    except (OSError, KeyError):
        return None


def run_cpu_table(args) -> list:
    _pin_malloc_mmap_threshold()
    torch.set_num_threads(args.cpu_threads)
    device = torch.device("cpu")
    dtypes = [getattr(torch, d) for d in args.cpu_dtypes.split(",") if d]
    models = [m for m in args.cpu_models.split(",") if m]
    providers = [p for p in args.providers.split(",") if p in CPU_PROVIDERS] if args.providers_given else list(
        CPU_PROVIDERS)
    modes = [m for m in args.modes.split(",") if m]
    records = []
    for model in models:
        dims = CPU_MODELS[model]
        for tokens in [int(t) for t in args.cpu_T.split(",") if t]:
            case = cpu_case(tokens)
            layout = SpanLayout.from_image_mask(image_mask(1, tokens, case["spans"], device))
            span_pairs = int((layout.kv_end - layout.kv_start).sum())
            causal_pairs = tokens * (tokens + 1) // 2
            shape = dict(case=case["name"], model=model, B=1, T=tokens, H=dims["H"], Hkv=dims["Hkv"], D=dims["D"],
                         pairs=span_pairs, threads=args.cpu_threads)
            for dtype in dtypes:
                base = dict(op=OP, shape=shape, dtype=dtype, device=device)
                for mode in modes:
                    for name in providers:
                        skip = None
                        if name == "flex_attention" and (mode != "fwd" or tokens > args.flex_max_T
                                                         or dtype != torch.float32):
                            skip = "skipped: FlexAttention runs forward only on CPU, fp32, T <= --flex-max-T " \
                                   "(one ~1 min compile per shape)"
                        if name in ("sdpa_dense_mask", "eager_dense_mask", "flex_attention") and tokens > args.peers_max_T:
                            skip = f"skipped: peers run up to T = --peers-max-T {args.peers_max_T} (time budget)"
                        scores_gb = dims["H"] * tokens * tokens * 4 * (3 if mode == "fwd+bwd" else 2) / 2**30
                        if name == "eager_dense_mask" and scores_gb > args.reference_max_gb and not skip:
                            skip = f"skipped: the reference needs ~{scores_gb:.0f} GB of T x T scores"
                        if skip:
                            records.append(make_record(provider=name, mode=mode, ms=None, error=skip, **base))
                            continue
                        fn = None
                        try:
                            fn, kind = build_provider(name, case, layout, dims, dtype, device, mode)
                            pairs = span_pairs if kind == "span" else causal_pairs
                            flops = 4 * dims["D"] * dims["H"] * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                            fn()  # warm-up (and compile)
                            times, peaks = [], []
                            for _ in range(max(1, args.cpu_reps)):  # each timed call also gives its peak
                                start = time.perf_counter()
                                peaks.append(cpu_peak_memory_bytes(fn))
                                times.append((time.perf_counter() - start) * 1e3)
                            # min: on a shared machine the fastest call is the one least disturbed
                            ms = min(times)
                            peak = None if None in peaks else max(peaks)
                            records.append(make_record(provider=name, mode=mode, ms=ms, flops=flops,
                                                       peak_memory=peak, ms_median=statistics.median(times),
                                                       reps=len(times), **base))
                        except Exception as exc:  # noqa: BLE001 - a failing provider is a record with its error
                            records.append(make_record(provider=name, mode=mode, ms=None,
                                                       error=f"{type(exc).__name__}: {exc}"[:300], **base))
                        finally:
                            fn = None
                        print(_cpu_line(records[-1]), flush=True)
                        if args.out_partial:
                            save_results(records, "cpu-attention", args.out)
    return records


def _cpu_line(r):
    ms = "n/a" if r["ms"] is None else f"{r['ms']:.1f} ms"
    mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f} MB"
    return f"{r['shape']['model']:>4} T={r['shape']['T']:<5} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<17} {ms:>11} {mem:>8} {r['error'] or ''}"


def cpu_ratio_table(records) -> str:
    """Markdown table: ms and peak MB per provider, and composed / sdpa_causal ratios."""
    key = lambda r: (r["shape"]["model"], r["shape"]["T"], r["dtype"], r["mode"])  # noqa: E731
    rows = {}
    for r in records:
        rows.setdefault(key(r), {})[r["provider"]] = r
    lines = ["| model | T | dtype | mode | composed ms | SDPA causal ms | time ratio | SDPA dense ms | flex ms | "
             "reference ms | composed MB | SDPA causal MB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, f="ms": "" if r is None or r.get(f) is None else (  # noqa: E731
        f"{r[f]:.0f}" if f == "peak_memory_mb" else f"{r[f]:.1f}")
    for (model, tokens, dtype, mode), by in rows.items():
        c, s = by.get("composed"), by.get("sdpa_causal")
        ratio = f"{c['ms'] / s['ms']:.2f}" if c and s and c["ms"] and s["ms"] else ""
        mem = ""
        if c and s and c["peak_memory_mb"] is not None and s["peak_memory_mb"]:
            mem = f"{c['peak_memory_mb'] / s['peak_memory_mb']:.2f}"
        lines.append(f"| {model} | {tokens} | {dtype} | {mode} | {fmt(c)} | {fmt(s)} | {ratio} | "
                     f"{fmt(by.get('sdpa_dense_mask'))} | {fmt(by.get('flex_attention'))} | "
                     f"{fmt(by.get('eager_dense_mask'))} | {fmt(c, 'peak_memory_mb')} | {fmt(s, 'peak_memory_mb')} | {mem} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, one timed call each")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    parser.add_argument("--cases", default="S1,S2,sweep", help="comma list of S1, S2, sweep")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of providers")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd")
    parser.add_argument("--cpu-models", default="0.5B,7B", help="--cases cpu: comma list of 0.5B, 7B")
    parser.add_argument("--cpu-T", default="1024,2048,4096,8192", help="--cases cpu: sequence lengths")
    parser.add_argument("--cpu-dtypes", default="float32,bfloat16", help="--cases cpu: dtypes")
    parser.add_argument("--cpu-reps", type=int, default=2, help="--cases cpu: timed calls per provider (median)")
    parser.add_argument("--flex-max-T", type=int, default=2048, help="--cases cpu: longest T for FlexAttention")
    parser.add_argument("--peers-max-T", type=int, default=8192,
                        help="--cases cpu: longest T for the dense-mask peers and FlexAttention")
    parser.add_argument("--reference-max-gb", type=float, default=6.0, help="--cases cpu: skip the reference above")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="--cases cpu: torch threads (1: on a shared machine a descheduled pool thread "
                             "stalls every parallel op)")
    parser.add_argument("--out-partial", action="store_true", help="--cases cpu: rewrite the JSON after every record")
    args = parser.parse_args(argv)
    args.providers_given = any(a == "--providers" or a.startswith("--providers=") for a in (argv or sys.argv[1:]))
    if args.cases == "cpu":
        records = run_cpu_table(args)
        cpu_ratio_table(records)
        path = save_results(records, "cpu-attention", args.out)
        plot_cpu_results(records, path.with_suffix(".png"))
        print(f"wrote {path}")
        return records
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


def plot_cpu_results(records, path):
    """Time ratio to SDPA causal per provider over T, one panel per (model, dtype, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    ok = [r for r in records if r["ms"]]
    panels = sorted({(r["shape"]["model"], r["dtype"], r["mode"]) for r in ok})
    if not panels:
        return None
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (model, dtype, mode) in zip(axes.flat, panels):
        sel = [r for r in ok if (r["shape"]["model"], r["dtype"], r["mode"]) == (model, dtype, mode)]
        floor = {r["shape"]["T"]: r["ms"] for r in sel if r["provider"] == "sdpa_causal"}
        for p in sorted({r["provider"] for r in sel}):
            pts = sorted((r["shape"]["T"], r["ms"] / floor[r["shape"]["T"]]) for r in sel
                         if r["provider"] == p and r["shape"]["T"] in floor)
            if pts:
                color = f"C{CPU_PROVIDERS.index(p)}" if p in CPU_PROVIDERS else None  # one color per provider
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p, color=color)
        ax.axhline(1.2 if mode == "fwd" else 1.3, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model} {dtype} {mode}", fontsize=9)
        ax.set_xlabel("T")
        ax.set_ylabel("time / SDPA causal")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"span attention on {ok[0]['device']} (dashed: composed target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

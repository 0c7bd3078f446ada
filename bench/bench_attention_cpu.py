"""CPU span attention: the C++ kernel (``backend="cpp"``, csrc/) against PyTorch's causal flash kernel.

    python bench/bench_attention_cpu.py [--models 0.5B,7B] [--lengths 1024,2048,4096] [--dtypes float32,bfloat16]
                                        [--modes fwd,fwd+bwd] [--rep 3] [--out DIR] [--providers cpp,sdpa_causal]

Shapes: Qwen2.5-0.5B attention (14 query heads, 2 KV heads, head dim 64) and Qwen2.5-7B (28 / 4 /
128), batch 1, T tokens, one 576-token image at position 35 and, when T >= 1300, a second one ending
100 tokens before the end (at T = 1024 the two would overlap, so there is one).

Providers, measured interleaved in one run (the same load for both):
* ``cpp``: ``span_attention(q, k, v, layout, backend="cpp")``: the LLaViT mask.
* ``composed``: ``backend="composed"`` (causal flash kernel + image-span completion), same mask.
* ``sdpa_causal``: ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`` on
  [B, H, T, D] inputs: plain causal, NOT our mask (no bidirectional images, slightly less work):
  the speed to match. Ratios in the table are cpp / sdpa_causal.
* ``reference`` (only with ``--providers``): the dense-mask reference, O(T^2) memory.

Time: the fastest of ``--rep`` calls after one warm-up call (``ms``; the median is kept as
``median_ms``): on a shared machine the fastest call is the one least disturbed by other processes. Peak memory (measured after all timings, one more
call per record): the peak growth of the bytes allocated through glibc malloc (``mallinfo2``: heap
plus mmapped chunks, where torch's CPU allocator and the kernel's buffers live) during the call,
sampled every ~0.2 ms by a thread: what the call allocates (outputs, saved tensors, workspaces),
not its inputs; a peak shorter than a sample can be missed, so it is a lower bound. Effective TFLOP/s: 4 * D * H * allowed pairs
forward, 3.5x that forward+backward (causal credited with its own pairs).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import RESULTS_DIR, load_results, make_record, save_results  # noqa: E402

from llavit_kernels import SpanLayout, span_attention  # noqa: E402
from llavit_kernels.ops import _span_attention_cpp  # noqa: E402
from llavit_kernels.ops.span_attention import span_attention_reference  # noqa: E402

OP = "span_attention"
MODELS = {"0.5B": dict(H=14, Hkv=2, D=64), "7B": dict(H=28, Hkv=4, D=128)}
IMAGE = 576


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes currently allocated through glibc malloc (heap + mmapped chunks): torch's CPU
    allocator and the kernel's own buffers all come from there. None without glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


_IN_USE = _malloc_in_use()


def peak_alloc_bytes(fn):
    """Peak growth of the bytes allocated (glibc mallinfo2) during one call of ``fn``, sampled every
    ~0.2 ms by a thread (the ops release the GIL), so a lower bound; None without glibc."""
    if _IN_USE is None:
        return None
    gc.collect()
    base = _IN_USE()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _IN_USE())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
        peak[0] = max(peak[0], _IN_USE())
    finally:
        done.set()
        sampler.join()
    return max(peak[0] - base, 0)


def layout_for(length: int) -> SpanLayout:
    img = torch.zeros(1, length, dtype=torch.bool)
    img[0, 35:35 + IMAGE] = True
    if length >= 1300:
        img[0, length - 100 - IMAGE:length - 100] = True
    return SpanLayout.from_image_mask(img)


def make_fn(provider: str, layout: SpanLayout, dims: dict, dtype, mode: str):
    gen = torch.Generator().manual_seed(0)
    length = layout.num_queries
    q = torch.randn(1, length, dims["H"], dims["D"], generator=gen).to(dtype)
    k = torch.randn(1, length, dims["Hkv"], dims["D"], generator=gen).to(dtype)
    v = torch.randn(1, length, dims["Hkv"], dims["D"], generator=gen).to(dtype)
    grad = torch.randn(1, length, dims["H"], dims["D"], generator=gen).to(dtype)
    backward = mode == "fwd+bwd"
    if provider == "sdpa_causal":
        q, k, v, grad = (t.transpose(1, 2).contiguous() for t in (q, k, v, grad))
        call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    elif provider in ("cpp", "composed"):
        call = lambda q, k, v: span_attention(q, k, v, layout, backend=provider)  # noqa: E731
    elif provider == "reference":
        call = lambda q, k, v: span_attention_reference(q, k, v, layout)  # noqa: E731
    else:
        raise ValueError(f"--providers: unknown provider {provider!r}")
    inputs = tuple(t.requires_grad_(backward) for t in (q, k, v))

    def run():
        out = call(*inputs)
        if backward:
            return torch.autograd.grad(out, inputs, grad)
        return out

    return run


def measure_memory(records) -> None:
    """After all timings (the sampler thread would disturb them): one extra call per record."""
    for r in records:
        model, length = r["shape"]["model"], r["shape"]["T"]
        fn = make_fn(r["provider"], layout_for(length), MODELS[model], getattr(torch, r["dtype"]), r["mode"])
        fn()
        peak = peak_alloc_bytes(fn)
        r["peak_memory_mb"] = None if peak is None else round(peak / 2**20, 2)
        r["peak_memory_method"] = "mallinfo2 sampled"
        del fn


def plot_ratios(records, path) -> None:
    """Grouped bars of each provider's time / sdpa_causal per (model, T, dtype, mode); lines at 1.0 and
    at the 1.1 / 1.2 targets (C++ kernel forward / forward+backward; composed's are 1.2 / 1.3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    key_of = lambda r: (r["shape"]["model"], r["shape"]["T"], r["dtype"], r["mode"])  # noqa: E731
    base = {key_of(r): r["ms"] for r in records if r["provider"] == "sdpa_causal" and r["ms"]}
    keys = list(dict.fromkeys(key_of(r) for r in records if key_of(r) in base))
    providers = list(dict.fromkeys(r["provider"] for r in records if r["provider"] != "sdpa_causal"))
    if not keys or not providers:
        return
    ratio = {(key_of(r), r["provider"]): r["ms"] / base[key_of(r)] for r in records
             if r["provider"] != "sdpa_causal" and r["ms"] and key_of(r) in base}
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(keys) * len(providers)), 4.5))
    for i, provider in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [ratio.get((k, provider), 0.0) for k in keys], width, label=provider)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{m} T{t}\n{d} {mode}" for m, t, d, mode in keys], fontsize=6, rotation=90)
    for y, style in ((1.0, "-"), (1.1, "--"), (1.2, ":")):
        ax.axhline(y, color="black", linestyle=style, linewidth=0.8)
    ax.set_ylabel("time / SDPA causal (lower is better)")
    ax.legend(fontsize=7)
    threads = records[0].get("threads")
    ax.set_title(f"span attention on CPU vs causal SDPA ({records[0]['device']}, {threads} thread(s))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_table(records) -> str:
    """model, T, dtype, mode, provider, ms, TFLOP/s, peak MB, and the time ratio to sdpa_causal."""
    base = {(r["shape"]["model"], r["shape"]["T"], r["dtype"], r["mode"]): r["ms"]
            for r in records if r["provider"] == "sdpa_causal"}
    lines = [f"{'model':<6} {'T':>6} {'dtype':<9} {'mode':<8} {'provider':<12} {'ms':>10} {'GFLOP/s':>8} "
             f"{'peak MB':>8} {'x sdpa_causal':>14}"]
    for r in records:
        key = (r["shape"]["model"], r["shape"]["T"], r["dtype"], r["mode"])
        ratio = f"{r['ms'] / base[key]:.3f}" if key in base and r["ms"] else ""
        mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
        tf = "" if r["tflops"] is None else f"{r['tflops'] * 1e3:.1f}G"
        lines.append(f"{key[0]:<6} {key[1]:>6} {key[2]:<9} {key[3]:<8} {r['provider']:<12} {r['ms']:>10.1f} {tf:>8} "
                     f"{mem:>8} {ratio:>14}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="0.5B,7B")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--providers", default="cpp,sdpa_causal")
    parser.add_argument("--rep", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's); 1 is steadier on a loaded machine")
    parser.add_argument("--skip", default="", help="model:T:mode triples to skip, e.g. 7B:4096:fwd+bwd")
    parser.add_argument("--update-memory", default=None, metavar="JSON",
                        help="only (re)measure peak memory for the records of an earlier run's JSON, in place")
    parser.add_argument("--name", default="bench_attention_cpu", help="file name stem of the JSON / PNG / table")
    parser.add_argument("--out", default=None, help="folder for JSON + PNG (default bench/results/cpu-<date>)")
    args = parser.parse_args(argv)

    if not _span_attention_cpp.load_extension():
        print(f"the C++ kernel is unavailable: {_span_attention_cpp.cpp_unavailable_reason()}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers.split(",")
    skip = set(filter(None, args.skip.split(",")))
    if args.update_memory:
        path = Path(args.update_memory)
        records = load_results(path)
        measure_memory(records)
        path.write_text(json.dumps({"benchmark": json.loads(path.read_text())["benchmark"], "records": records}, indent=1))
        table = ratio_table(records)
        print(table)
        table_path = path.parent / f"{args.name}-table.txt"
        note = table_path.read_text().split("\n\n", 1)[1] if table_path.is_file() and "\n\n" in table_path.read_text() else ""
        table_path.write_text(table + "\n\n" + note)
        return 0
    out_dir = Path(args.out or RESULTS_DIR / f"cpu-{dt.datetime.now(dt.timezone.utc):%Y%m%d}")
    load_before = os.getloadavg()[0]
    records = []
    for model in args.models.split(","):
        dims = MODELS[model]
        for length in (int(t) for t in args.lengths.split(",")):
            layout = layout_for(length)
            span_pairs = int((layout.kv_end - layout.kv_start).sum())
            causal_pairs = length * (length + 1) // 2
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                for mode in args.modes.split(","):
                    if f"{model}:{length}:{mode}" in skip:
                        continue
                    shape = dict(model=model, B=1, T=length, H=dims["H"], Hkv=dims["Hkv"], D=dims["D"])
                    fns = {p: make_fn(p, layout, dims, dtype, mode) for p in providers}
                    for fn in fns.values():
                        fn()  # warm-up (first call: allocations, lazy init)
                    times = {p: [] for p in providers}
                    for _ in range(args.rep):  # interleaved: the providers share the load of the moment
                        for p, fn in fns.items():
                            start = time.perf_counter()
                            fn()
                            times[p].append((time.perf_counter() - start) * 1e3)
                    for p, fn in fns.items():
                        pairs = causal_pairs if p == "sdpa_causal" else span_pairs
                        flops = 4 * dims["D"] * dims["H"] * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                        records.append(make_record(
                            op=OP, provider=p, shape=shape, dtype=dtype, mode=mode, ms=min(times[p]),
                            median_ms=round(statistics.median(times[p]), 3),
                            flops=flops, threads=torch.get_num_threads(),
                            rep=args.rep, times_ms=[round(t, 3) for t in times[p]], images=1 + (length >= 1300),
                        ))
                    del fns
                    print(f"done {model} T={length} {dtype} {mode}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    measure_memory(records)
    for r in records:
        r["loadavg_1min"] = [round(load_before, 2), round(load_after, 2)]
    table = ratio_table(records)
    print(table)
    path = save_results(records, args.name, out_dir)
    (out_dir / f"{args.name}-table.txt").write_text(
        table + f"\n\nload average (1 min) before / after: {load_before:.2f} / {load_after:.2f} on "
        f"{os.cpu_count()} cores; torch threads {torch.get_num_threads()}\n"
    )
    plot_ratios(records, out_dir / f"{args.name}.png")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared benchmark harness: one timing helper, one JSON schema, one table printer, one plot.

Device time on CUDA comes from ``triton.testing.do_bench`` (CUDA events, median); on CPU from
wall-clock timing after warm-up. Every record has the same keys (``RECORD_KEYS``) so results from
all benchmarks and all GPUs can be concatenated and compared.

Import it as ``from harness import ...``: bench/ is on ``sys.path`` both when a script in bench/ runs
and under pytest (bench/conftest.py puts it there).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_KEYS = (
    "op", "provider", "shape", "dtype", "mode", "device", "torch", "triton", "date",
    "ms", "tflops", "peak_memory_mb", "error",
)


def smoke_mode() -> bool:
    """Tiny shapes, one round: on CPU always, or when LLAVIT_BENCH_SMOKE=1."""
    return os.environ.get("LLAVIT_BENCH_SMOKE", "0") == "1" or not torch.cuda.is_available()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_ms(fn: Callable[[], object], device: Optional[torch.device] = None, *, warmup: int = 3,
                 rep: int = 10, cuda_warmup_ms: int = 25, cuda_rep_ms: int = 100) -> float:
    """Median time of one call of ``fn`` in milliseconds (device time on CUDA)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=cuda_warmup_ms, rep=cuda_rep_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(rep, 1)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: Optional[torch.device] = None) -> Optional[int]:
    """Peak CUDA memory allocated during one call beyond what was allocated before it (None on CPU)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def make_record(*, op: str, provider: str, shape: Dict, dtype, ms: Optional[float], mode: str = "fwd",
                flops: Optional[float] = None, peak_memory: Optional[int] = None,
                device: Optional[torch.device] = None, error: Optional[str] = None, **extra) -> Dict:
    """One result row in the shared schema; ``flops`` is the effective work of one call."""
    tflops = None
    if flops is not None and ms is not None and ms > 0:
        tflops = flops / (ms * 1e-3) / 1e12
    record = {
        "op": op,
        "provider": provider,
        "shape": dict(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ms": None if ms is None else round(float(ms), 5),
        "tflops": None if tflops is None else round(tflops, 3),
        "peak_memory_mb": None if peak_memory is None else round(peak_memory / 2**20, 2),
        "error": error,
    }
    record.update(extra)
    return record


def run_provider(fn_factory: Callable[[], Callable[[], object]], *, device=None, **record_kwargs) -> Dict:
    """Build a provider's callable, time it and measure its peak memory; errors become a record too.

    A provider that is unavailable (import error, unsupported shape, out of memory) yields a record
    with ``ms=None`` and the error text, so one broken peer never hides the others' numbers.
    """
    try:
        fn = fn_factory()
        fn()  # first call outside timing: compiles / autotunes
        synchronize(device or default_device())
        ms = benchmark_ms(fn, device)
        peak = peak_memory_bytes(fn, device)
        return make_record(ms=ms, peak_memory=peak, device=device, **record_kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the record, never swallowed silently
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return make_record(ms=None, device=device, error=f"{type(exc).__name__}: {exc}"[:300], **record_kwargs)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def save_results(records: List[Dict], name: str, out_dir: Optional[os.PathLike] = None) -> Path:
    """Write ``<name>-<device>-<date>.json`` to ``out_dir`` (default ``$OUT`` or bench/results)."""
    out = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    device = records[0]["device"] if records else device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    path = out / f"{name}-{_slug(device)}-{date}.json"
    path.write_text(json.dumps({"benchmark": name, "records": records}, indent=1))
    return path


def load_results(path: os.PathLike) -> List[Dict]:
    return json.loads(Path(path).read_text())["records"]


def _shape_text(shape: Dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(records: Iterable[Dict], baseline: Optional[str] = None) -> str:
    """Print (and return) a table; with ``baseline`` a column of time ratios against that provider."""
    records = list(records)
    base_ms = {}
    if baseline is not None:
        for r in records:
            if r["provider"] == baseline and r["ms"]:
                base_ms[(r["op"], _shape_text(r["shape"]), r["mode"], r["dtype"])] = r["ms"]
    header = f"{'op':<18} {'shape':<44} {'mode':<8} {'provider':<22} {'ms':>10} {'TFLOP/s':>8} {'peak MB':>9}"
    if baseline:
        header += f" {'x ' + baseline:>14}"
    lines = [header, "-" * len(header)]
    for r in records:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.4f}"
        tf = "" if r["tflops"] is None else f"{r['tflops']:.1f}"
        mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"
        line = f"{r['op']:<18} {_shape_text(r['shape'])[:44]:<44} {r['mode']:<8} {r['provider']:<22} {ms:>10} {tf:>8} {mem:>9}"
        if baseline:
            key = (r["op"], _shape_text(r["shape"]), r["mode"], r["dtype"])
            ratio = f"{r['ms'] / base_ms[key]:.3f}" if r["ms"] and key in base_ms else ""
            line += f" {ratio:>14}"
        if r.get("error"):
            line += f"  [{r['error'][:60]}]"
        lines.append(line)
    text = "\n".join(lines)
    print(text)
    return text


def plot_results(records: List[Dict], path: os.PathLike, *, title: str = "", x_key: Optional[str] = None) -> Optional[Path]:
    """Bar chart of ms per provider, grouped by shape and mode (or a line plot over ``x_key``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    ok = [r for r in records if r["ms"] is not None]
    if not ok:
        return None
    providers = sorted({r["provider"] for r in ok})
    fig, ax = plt.subplots(figsize=(10, 5))
    if x_key is not None:
        for mode in sorted({r["mode"] for r in ok}):
            for p in providers:
                pts = sorted((r["shape"][x_key], r["ms"]) for r in ok if r["provider"] == p and r["mode"] == mode
                             and x_key in r["shape"])
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{p} ({mode})")
        ax.set_xlabel(x_key)
        ax.set_yscale("log")
    else:
        groups = sorted({(_shape_text(r["shape"]), r["mode"]) for r in ok})
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            values = []
            for g in groups:
                match = [r["ms"] for r in ok if r["provider"] == p and (_shape_text(r["shape"]), r["mode"]) == g]
                values.append(match[0] if match else 0.0)
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=6)
        ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title(title or f"{ok[0]['op']} on {ok[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

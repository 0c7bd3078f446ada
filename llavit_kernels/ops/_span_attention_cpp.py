"""C++ CPU span attention (``csrc/span_attention_cpu.cpp``): ops, build on first use, fallback.

The ops ``llavit::span_attention_cpp_fwd`` / ``llavit::span_attention_cpp_bwd`` have the contract
of the Triton ops (``_span_attention_triton.span_attention_fwd``: ``(out, lse)``, lse fp32 in
natural-log units, ``+inf`` on rows without keys). Their schemas, fake kernels and autograd are
defined here (shared helpers in ``_span_attention_op``), so ``torch.compile`` traces them; the C++
source registers only the CPU kernels (``TORCH_LIBRARY_IMPL(llavit, CPU, ...)``).

They are separate ops from the Triton ones on purpose: the Triton ops also run on CPU tensors (the
interpreter tier), so a C++ CPU kernel under the same name would silently replace what those tests
check.

Build: the first CPU call compiles the source with ``torch.utils.cpp_extension.load`` (ninja) into
a cache directory (``$TORCH_EXTENSIONS_DIR/llavit_kernels``, else ``$XDG_CACHE_HOME`` or
``~/.cache``, then ``llavit_kernels/torch_extensions``), printing one line while it compiles (about
a minute on 2 cores). The build name hashes the source, the flags and the torch/python versions,
so a later process loads the cached library without compiling. ``LLAVIT_NO_CPP=1``, a missing
compiler or any build error makes :func:`cpp_available` False, with one warning.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..layout import SpanLayout
from ._span_attention_op import BWD_SCHEMA, FWD_SCHEMA, register_fake_and_autograd

__all__ = [
    "CPP_DTYPES",
    "bf16_block_products",
    "cpp_available",
    "cpp_unavailable_reason",
    "f32_block_products",
    "load_extension",
    "span_attention_cpp",
    "span_attention_cpp_with_lse",
    "span_attention_cpp_fwd",
    "span_attention_cpp_bwd",
]

CPP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FWD_NAME = "llavit::span_attention_cpp_fwd"
BWD_NAME = "llavit::span_attention_cpp_bwd"
BUILD_MESSAGE = "llavit_kernels: compiling the C++ CPU span-attention kernel (once; about a minute)..."

_LIB = torch.library.Library("llavit", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
_LIB.define("span_attention_cpp_fwd" + FWD_SCHEMA)
_LIB.define("span_attention_cpp_bwd" + BWD_SCHEMA)


def span_attention_cpp_fwd(q, k, v, kv_start, kv_end, q_start, q_end, softmax_scale: float):
    """(out, lse); see the module docstring. CPU tensors, fp32/fp16/bf16, any head dim."""
    return torch.ops.llavit.span_attention_cpp_fwd(q, k, v, kv_start, kv_end, q_start, q_end, softmax_scale)


def span_attention_cpp_bwd(grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale):
    """(dq, dk, dv), deterministic. ``out`` and ``lse`` may come from elsewhere (the composed path
    passes the merged ones); ``grad_lse`` may be None."""
    return torch.ops.llavit.span_attention_cpp_bwd(
        grad_out, grad_lse, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, softmax_scale
    )


register_fake_and_autograd(FWD_NAME, BWD_NAME, span_attention_cpp_bwd)


# ----------------------------------------------------------------------------- build
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "span_attention_cpu.cpp"
_SOURCE_CANDIDATES = (SOURCE, Path(__file__).resolve().parents[2] / "csrc" / "span_attention_cpu.cpp")


def _source_path() -> Optional[Path]:
    """csrc/ next to the package (installed: package data) or at the repository root (checkout)."""
    for path in _SOURCE_CANDIDATES:
        if path.is_file():
            return path
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_flags() -> list:
    """-O3 plus the vector extensions this machine has (the row loops vectorise with them)."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"] + (["-mf16c"] if "f16c" in cpu else [])
        if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= cpu:
            flags += ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=512"]
    return flags


def cache_dir() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / "llavit_kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "llavit_kernels" / "torch_extensions"


def build_name(source: Path, flags: list) -> str:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {sys.platform}".encode())
    return "llavit_span_attention_cpu_" + digest.hexdigest()[:16]


_lock = threading.Lock()
_state = {"loaded": False, "error": None, "warned": False}


def _build() -> None:
    if os.environ.get("LLAVIT_NO_CPP", "0") not in ("", "0"):
        raise RuntimeError("disabled by LLAVIT_NO_CPP=1")
    source = _source_path()
    if source is None:
        raise RuntimeError(f"source not found (looked for {', '.join(str(p) for p in _SOURCE_CANDIDATES)})")
    from torch.utils import cpp_extension

    flags = build_flags()
    name = build_name(source, flags)
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").is_file():
        print(BUILD_MESSAGE, file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def load_extension() -> bool:
    """Build (first call in this environment) or load the C++ kernels; False, with one warning,
    when that is disabled or fails."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            try:
                _build()
                _state["loaded"] = True
            except Exception as exc:  # missing compiler, build error, disabled: all fall back
                _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return _state["loaded"]


def cpp_available() -> bool:
    return load_extension()


def bf16_block_products() -> bool:
    """Whether the loaded kernel multiplies bf16 blocks in bf16 (oneDNN's micro-kernel through
    ``at::native::cpublas::brgemm``: CPUs with AVX-512; not with ``LLAVIT_CPP_NO_BRGEMM=1`` or
    ``torch.backends.mkldnn`` off), rather than converting them to fp32. False when not loaded.
    Inside ``torch.compile`` it returns the last eager answer (no op call in the traced graph)."""
    if not load_extension():
        return False
    if torch.compiler.is_compiling():
        return _state.get("bf16_block_products", False)
    _state["bf16_block_products"] = bool(torch.ops.llavit_cpp.bf16_block_products())
    return _state["bf16_block_products"]


def f32_block_products() -> bool:
    """Whether fp32 blocks (fp32 inputs, fp16 converted) run on oneDNN's fp32 micro-kernel (AVX2 and
    up) rather than ``at::mm_out``; not with ``LLAVIT_CPP_NO_BRGEMM=1`` or oneDNN off."""
    return load_extension() and bool(torch.ops.llavit_cpp.f32_block_products())


def cpp_unavailable_reason() -> Optional[str]:
    return None if load_extension() else _state["error"]


def warn_unavailable(stacklevel: int = 3) -> None:
    """One warning per process that the C++ kernels are not in use, and why."""
    if not _state["warned"] and not torch.compiler.is_compiling():
        _state["warned"] = True
        warnings.warn(
            f"span_attention: the C++ CPU kernel is unavailable ({_state['error']}); using the composed path "
            "(PyTorch's causal flash kernel + the image-span completion) instead. It builds on first use with a "
            "C++ compiler and ninja; LLAVIT_NO_CPP=1 turns it off on purpose.",
            stacklevel=stacklevel,
        )


# ----------------------------------------------------------------------------- public (private-module) API
def check_cpp_inputs(q: torch.Tensor) -> None:
    if q.device.type != "cpu":
        raise ValueError(f"q: backend='cpp' runs on CPU tensors, got a tensor on {q.device}")
    if q.dtype not in CPP_DTYPES:
        raise TypeError(
            f"q: backend='cpp' supports dtypes float16, bfloat16 and float32, got {str(q.dtype).replace('torch.', '')}"
            " (use backend='reference' for float64)"
        )


def span_attention_cpp_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SpanLayout, softmax_scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp; inputs validated by ``span_attention``; the extension must be loaded."""
    check_cpp_inputs(q)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return span_attention_cpp_fwd(q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, scale)


def span_attention_cpp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SpanLayout, softmax_scale: Optional[float] = None
) -> torch.Tensor:
    return span_attention_cpp_with_lse(q, k, v, layout, softmax_scale)[0]

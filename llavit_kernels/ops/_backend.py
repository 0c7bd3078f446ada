"""Per-call backend choice: Triton kernels on CUDA; on CPU, span attention runs the C++ kernel (csrc/)
when it builds, else the composed path (causal engine + completion); the pure-torch reference elsewhere."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "composed", "cpp")


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


# Probed once at import: a plain bool is free to read under torch.compile (an lru_cache is not).
_TRITON_IMPORTABLE = _probe_triton()


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    backend: Optional[str],
    device: torch.device,
    op_name: str,
    allowed: Tuple[str, ...] = ("reference", "triton"),
) -> str:
    """Return the backend name for a call on ``device``; raise with a fix for a bad request.

    ``allowed`` lists the names the op accepts. ``backend=None`` on CPU gives span attention
    "cpu_default": its front door picks between the C++ kernel and the composed path (the one place
    that choice is made, from bench/results/cpu-*); both use O(T) memory, the reference O(T^2)."""
    if backend is None:
        if device.type == "cuda" and triton_importable():
            return "triton"
        return "cpu_default" if device.type == "cpu" and op_name == "span_attention" else "reference"
    if backend not in allowed:
        names = ", ".join(repr(name) for name in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"backend: expected None, {names}, got {backend!r}")
    if backend in ("reference", "composed"):
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"{op_name}: backend='cpp' runs on CPU tensors, got a {device.type} tensor")
        return backend
    if not triton_importable():
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package, which failed to import")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"{op_name}: backend='triton' on a {device.type} tensor needs Triton's interpreter: set the "
            "environment variable TRITON_INTERPRET=1 before importing llavit_kernels (or use a CUDA tensor, "
            "or backend='reference')"
        )
    return backend

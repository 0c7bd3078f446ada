"""Per-call backend choice: Triton kernels on CUDA, the composed path (causal engine + completion) on
CPU, the pure-torch reference elsewhere."""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("reference", "triton", "composed")


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


def resolve_backend(backend: Optional[str], device: torch.device, op_name: str) -> str:
    """Return the backend name for a call on ``device``; raise with a fix for a bad request."""
    if backend is None:
        if device.type == "cuda" and triton_importable():
            return "triton"
        # CPU: the composed path (bench/results/cpu-*.json); the front door may still fall back to
        # the reference for what an op's backend does not cover.
        return "composed" if device.type == "cpu" and op_name == "span_attention" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None, {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend == "composed" and op_name != "span_attention":
        raise ValueError(f"{op_name}: backend='composed' exists for span_attention only, got it for {op_name}")
    if backend in ("reference", "composed"):
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

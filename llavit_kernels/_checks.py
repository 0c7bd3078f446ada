"""Input validation shared by every public entry point.

Every message names the argument, what was expected and what was given, so that a bad call fails at
the boundary instead of inside a kernel.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def should_validate_values() -> bool:
    """Value checks (``any()``/``all()`` on data) need a host sync; skip them where a sync is illegal.

    Shape, dtype and device checks are metadata-only and always run. Checks that read tensor values
    run eagerly, but not while ``torch.compile`` traces or a CUDA graph is being captured.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(
    name: str,
    value,
    *,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    ndims: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(value.dtype).replace('torch.', '')}")
    if ndims is not None and value.dim() not in tuple(ndims):
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(value.shape)}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k}: expected a tensor on {first} (the device of {first_name}), got one on {d}")
    return first


INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
MASK_DTYPES = (torch.bool,) + INTEGER_DTYPES
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

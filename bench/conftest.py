"""pytest-benchmark entry: `pytest bench/` runs every benchmark in smoke mode on CPU (tiny shapes,
one round) and at full size on a GPU. Device time goes into ``benchmark.extra_info``."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from harness import benchmark_ms, smoke_mode, synchronize  # noqa: E402


@pytest.fixture
def timed(benchmark):
    """Run ``fn`` under pytest-benchmark with the device synchronised inside the timed call."""

    def run(fn, device, **info):
        def synced():
            out = fn()
            synchronize(device)
            return out

        if smoke_mode():
            benchmark.pedantic(synced, rounds=1, iterations=1, warmup_rounds=0)
        else:
            benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=2)
        benchmark.extra_info.update(info)
        benchmark.extra_info["device_ms"] = benchmark_ms(fn, device, warmup=0 if smoke_mode() else 3,
                                                         rep=1 if smoke_mode() else 10)
        return benchmark.extra_info["device_ms"]

    return run

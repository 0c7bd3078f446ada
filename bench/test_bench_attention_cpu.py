"""Smoke run of bench_attention_cpu.py (tiny shape, one round): the script keeps working."""

import json

import pytest
import torch

import bench_attention_cpu as bc
from llavit_kernels.ops import _span_attention_cpp


@pytest.mark.skipif(not _span_attention_cpp.cpp_available(), reason="the C++ kernel is unavailable (LLAVIT_NO_CPP?)")
def test_script_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = bc.main(["--models", "0.5B", "--lengths", "128", "--dtypes", "float32", "--rep", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (path,) = tmp_path.glob("bench_attention_cpu-*.json")
    records = json.loads(path.read_text())["records"]
    assert {(r["provider"], r["mode"]) for r in records} == {
        (p, m) for p in ("cpp", "sdpa_causal") for m in ("fwd", "fwd+bwd")
    }
    assert all(r["error"] is None and r["ms"] > 0 for r in records)
    assert (tmp_path / "bench_attention_cpu-table.txt").is_file()

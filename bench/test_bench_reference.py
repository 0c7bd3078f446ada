"""pytest-benchmark view of bench_reference.py (smoke shapes on CPU)."""

import pytest
import torch

import bench_reference as br
from harness import default_device, smoke_mode
from llavit_kernels import SpanLayout, modality_linear, span_attention


@pytest.mark.parametrize("case", br.attention_cases(smoke_mode()), ids=lambda c: f"T{c['T']}")
def test_span_attention_reference(timed, case):
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T, H, Hkv, D = case["B"], case["T"], case["H"], case["Hkv"], case["D"]
    layout = SpanLayout.from_image_mask(br.image_mask(B, T, case["spans"], device))
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, T, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    ms = timed(lambda: span_attention(q, k, v, layout, backend="reference"), device, B=B, T=T, H=H, D=D)
    assert ms > 0


@pytest.mark.parametrize("case", br.linear_cases(smoke_mode()), ids=lambda c: f"M{c['M']}")
def test_modality_linear_reference(timed, case):
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M, K, N = case["M"], case["K"], case["N"]
    is_image = torch.rand(M, device=device) < case["image_share"]
    x = torch.randn(M, K, device=device, dtype=dtype)
    w_t, w_i = (torch.randn(N, K, device=device, dtype=dtype) for _ in range(2))
    ms = timed(lambda: modality_linear(x, is_image, w_t, None, w_i, None, backend="reference"), device, M=M, K=K, N=N)
    assert ms > 0


def test_script_smoke(tmp_path):
    records = br.main(["--smoke", "--out", str(tmp_path)])
    assert {r["provider"] for r in records} >= {"reference", "eager", "sdpa_dense_mask", "index_scatter", "dense_gemm"}
    assert all(r["error"] is None and r["ms"] > 0 for r in records)
    assert list(tmp_path.glob("reference-smoke-*.json")) and list(tmp_path.glob("reference-smoke-*.png"))

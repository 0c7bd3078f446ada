"""bench_attention.py in smoke mode: it runs, writes JSON + PNG, and its providers compute the same thing."""

import pytest
import torch

import bench_attention as ba
from harness import default_device, smoke_mode
from llavit_kernels import SpanLayout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Triton interpreter's numpy warnings


def test_script_smoke(tmp_path):
    records = ba.main(["--smoke", "--out", str(tmp_path)])
    by_key = {(r["provider"], r["mode"]): r for r in records}
    for provider in ("ours", "eager_dense_mask", "sdpa_dense_mask"):
        for mode in ("fwd", "fwd+bwd"):
            record = by_key[(provider, mode)]
            assert record["error"] is None and record["ms"] > 0, record
            assert record["tflops"] is not None
    assert by_key[("ours", "setup")]["ms"] > 0
    assert list(tmp_path.glob("attention-smoke-*.json"))
    assert list(tmp_path.glob("attention-smoke-*.png"))


def test_flops_count_allowed_pairs():
    case = ba.cases(True, ())[0]
    layout = SpanLayout.from_image_mask(ba.image_mask(case["B"], case["T"], case["spans"], "cpu"))
    pairs = int((layout.kv_end - layout.kv_start).sum())
    assert pairs == int(layout.dense_mask().sum())
    causal = case["T"] * (case["T"] + 1) // 2
    assert pairs > causal  # the images add the bidirectional pairs


def test_s1_s2_shapes_match_design():
    full = {c["name"]: c for c in ba.cases(False, ("S1", "S2"))}
    assert (full["S1"]["B"], full["S1"]["T"], full["S1"]["spans"]) == (8, 2048, [(35, 576)])
    assert (full["S2"]["B"], full["S2"]["T"]) == (2, 8192)
    assert full["S2"]["spans"] == [(100, 576), (1500, 576), (3500, 2304), (7000, 576)]
    assert ba.model_dims(False) == dict(H=28, Hkv=4, D=128)
    for case in ba.cases(False, ("sweep",)):
        assert case["B"] * case["T"] == 16384
        assert all(s + n <= case["T"] for s, n in case["spans"])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_providers_agree(mode):
    """Every provider that can run here computes the same attention (the causal ones excepted)."""
    device = default_device()
    smoke = smoke_mode()
    case = ba.cases(smoke, ("S1",))[0]
    dims = ba.model_dims(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = SpanLayout.from_image_mask(ba.image_mask(case["B"], case["T"], case["spans"], device))
    results = {}
    for name in ("ours", "eager_dense_mask", "sdpa_dense_mask", "flex_attention", "composed"):
        if not ba.provider_available(name, device, smoke) or (name == "flex_attention" and device.type != "cuda"):
            continue
        fn, kind = ba.build_provider(name, case, layout, dims, dtype, device, mode)
        out = fn()
        if mode == "fwd":
            out = out.transpose(1, 2) if name in ("sdpa_dense_mask", "flex_attention") else out
            results[name] = out.float()
        else:
            dq = out[0].transpose(1, 2) if name in ("sdpa_dense_mask", "flex_attention") else out[0]
            results[name] = dq.float()
    assert "eager_dense_mask" in results and "sdpa_dense_mask" in results
    ref = results["eager_dense_mask"]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for name, value in results.items():
        torch.testing.assert_close(value, ref, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_pytest_benchmark_ours_forward(timed):
    device = default_device()
    smoke = smoke_mode()
    case = ba.cases(smoke, ("S1",))[0]
    dims = ba.model_dims(smoke)
    if not ba.provider_available("ours", device, smoke):
        pytest.skip("ours needs CUDA or TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = SpanLayout.from_image_mask(ba.image_mask(case["B"], case["T"], case["spans"], device))
    fn, _ = ba.build_provider("ours", case, layout, dims, dtype, device, "fwd")
    ms = timed(fn, device, case=case["name"], provider="ours")
    assert ms > 0


def test_cpu_table_cases_and_ratio_table():
    """The CPU table's shapes (issue 9) and its ratio table from records (no timing here)."""
    case = ba.cpu_case(4096)
    assert case["B"] == 1 and case["spans"] == [(35, 576), (4096 - 611, 576)]
    assert ba.CPU_MODELS == {"0.5B": dict(H=14, Hkv=2, D=64), "7B": dict(H=28, Hkv=4, D=128)}
    shape = dict(model="0.5B", T=4096)
    recs = [dict(provider=p, shape=shape, dtype="float32", mode="fwd", ms=ms, peak_memory_mb=mb)
            for p, ms, mb in (("composed", 110.0, 30.0), ("sdpa_causal", 100.0, 20.0))]
    text = ba.cpu_ratio_table(recs)
    assert "| 0.5B | 4096 | float32 | fwd | 110.0 | 100.0 | 1.10 |" in text and text.rstrip().endswith("1.50 |")

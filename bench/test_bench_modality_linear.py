"""pytest-benchmark view of bench_modality_linear.py (interpreter-sized shapes on CPU, full on GPU)."""

import pytest
import torch

import bench_modality_linear as bml
from harness import default_device, smoke_mode


@pytest.mark.parametrize("provider", ["triton", "triton_pointer", "dense_gemm", "index_scatter"])
def test_modality_linear_providers(timed, provider):
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = bml.main_cases(smoke_mode())[0]
    is_image = bml.image_mask(case["B"], case["T"], case["spans"], device)
    x, w_t, b_t, w_i, b_i = bml.make_linear_inputs(case["B"], case["T"], case["K"], case["N"], device, dtype, False)
    providers, _ = bml.linear_providers(x, is_image, w_t, b_t, w_i, b_i)
    fn = torch.no_grad()(providers[provider])
    ref = providers["where_2gemm"]() if provider != "dense_gemm" else torch.nn.functional.linear(x, w_t, b_t)
    torch.testing.assert_close(fn(), ref, atol=5e-2 if dtype == torch.bfloat16 else 1e-4,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)
    ms = timed(fn, device, provider=provider, M=x.shape[0] * x.shape[1], K=case["K"], N=case["N"])
    assert ms > 0


def test_script_smoke(tmp_path):
    records = bml.main(["--smoke", "--out", str(tmp_path)])
    providers = {r["provider"] for r in records}
    assert providers >= {"triton", "triton_pointer", "dense_gemm", "where_2gemm", "index_scatter", "grouped_mm",
                         "qkv_fused_rope", "qkv_fused_rope_pointer", "qkv_unfused_rope"}
    # grouped_mm may be missing from a torch build; every other provider must produce a time
    assert all(r["error"] is None and r["ms"] > 0 for r in records if r["provider"] != "grouped_mm"), \
        [r for r in records if r["error"]]
    assert {r["mode"] for r in records} == {"fwd", "fwd+bwd", "bwd_dx", "bwd_dw"}
    assert list(tmp_path.glob("modality_linear-smoke-*.json"))


def test_cpu_paths_smoke(tmp_path):
    records = bml.main(["--cpu", "--smoke", "--out", str(tmp_path)])
    assert {r["provider"] for r in records} == {"cpu_grouped", "reference", "dense_gemm"}
    assert all(r["ms"] > 0 for r in records) and {r["mode"] for r in records} == {"fwd", "fwd+bwd"}
    assert list(tmp_path.glob("modality_linear_cpu-smoke-*.json"))


def test_ours_reads_stacked_weights_and_the_pointer_provider_does_not():
    # "triton" must time the one-descriptor kernel and "triton_pointer" the previous pointer kernel
    from llavit_kernels.ops import _modality_linear_triton as mlt

    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = bml.main_cases(True)[0]
    x, w_t, b_t, w_i, b_i = bml.make_linear_inputs(case["B"], case["T"], case["K"], case["N"], device, dtype, False)
    assert mlt.uses_stacked_kernel(x, w_t, w_i)
    _, params = bml.linear_providers(x, bml.image_mask(case["B"], case["T"], case["spans"], device), w_t, b_t, w_i, b_i)
    w_t_sep, w_i_sep = params[-2:]
    assert not mlt.uses_stacked_kernel(x, w_t_sep, w_i_sep)

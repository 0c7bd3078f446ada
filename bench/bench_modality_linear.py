"""modality_linear / modality_qkv (Triton) against the dense-GEMM floor and the peers' ways.

    python bench/bench_modality_linear.py [--smoke] [--out DIR]
    python bench/bench_modality_linear.py --cpu [--out DIR]     # the CPU paths (no GPU needed)

Providers, one run, same inputs (bf16 on CUDA):
  triton          ours: modality-sorted token order + routed GEMM (llavit_kernels, backend="triton"),
                  weights stacked in one [2, N, K] tensor as ModalityLinear holds them: the forward
                  and dX read both through ONE 3-D TMA descriptor (routed_mm_tma_kernel)
  triton_pointer  the same op with the two weights in separate allocations: the pointer kernel
                  (routed_mm_kernel, cp.async weight tiles picked per tile), the previous design
  dense_gemm      one F.linear of the same size: the floor (no routing at all)
  where_2gemm     both GEMMs + torch.where (twice the FLOPs; the reference)
  index_scatter   boolean index + two partial GEMMs + scatter (CogVLM style; host sync)
  grouped_mm      tokens sorted by modality + torch._grouped_mm (+ un-permute), where available
Shapes: Qwen2.5-7B QKV (3584 -> 4608) and 3B (2048 -> 2560) at 16384 tokens = 8 x 2048 with one
576-token image at position 35 per sequence (28% image); the 7B shape again with the same 576 image
tokens per sequence cut into 9 images of 64 (many short runs: edge tiles); sweeps over tokens and
image share (7B).
``--cpu``: the CPU paths side by side, interleaved rep by rep (fp32, Qwen2.5-0.5B and 1.5B QKV
shapes): the default CPU path (one GEMM per modality over gathered rows), the reference (both GEMMs
over all tokens + torch.where) and one dense GEMM (the floor).
Modes: fwd and fwd+bwd (grads of x, both weights, both biases), plus dX and dW alone (bwd_dx,
bwd_dw) against the dense GEMM of the same product, to see which kernel lags. QKV: fused projection writing
q/k/v (+RoPE in the epilogue) vs the unfused sequence (projection, split, reshape, rotary, copies).
FLOPs are the useful work, 2*M*K*N forward (x3 fwd+bwd), for every provider.
On CPU (``--smoke``, the default there) tiny shapes run through Triton's interpreter: a check that
the script works, not a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter flag must be set before the kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (  # noqa: E402
    benchmark_ms,
    default_device,
    make_record,
    peak_memory_bytes,
    plot_results,
    print_table,
    save_results,
    smoke_mode,
    synchronize,
)

from llavit_kernels.ops.modality_linear import apply_rotary, modality_linear, modality_qkv  # noqa: E402

OP = "modality_linear"


# ----------------------------------------------------------------------------- cases
def image_mask(batch, tokens, spans, device):
    m = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for start, length in spans:
        m[:, start:start + length] = True
    return m


def share_mask(batch, tokens, share, device):
    """A few contiguous image spans per sequence covering ``share`` of its tokens."""
    n_img = int(round(tokens * share))
    if n_img >= tokens:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if n_img == 0:
        return torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    spans, per, gap = [], max(n_img // 3, 1), (tokens - n_img) // 4
    pos, left = gap, n_img
    while left > 0:
        length = min(per, left)
        spans.append((pos, length))
        pos, left = pos + length + gap, left - length
    return image_mask(batch, tokens, spans, device)


def main_cases(smoke):
    if smoke:
        return [dict(name="smoke", B=2, T=40, K=32, N=48, spans=[(3, 11)])]
    return [
        dict(name="7B", B=8, T=2048, K=3584, N=4608, spans=[(35, 576)]),
        dict(name="3B", B=8, T=2048, K=2048, N=2560, spans=[(35, 576)]),
        # the same 28% of image tokens as 9 images of 64: many short runs, so many partial tiles
        dict(name="7B-9x64", B=8, T=2048, K=3584, N=4608, spans=[(35 + 200 * i, 64) for i in range(9)]),
    ]


def sweep_cases(smoke):
    if smoke:
        return [dict(name="smoke", B=1, T=48, K=32, N=32, share=s) for s in (0.0, 0.5)]
    # kept short: the whole script must fit the GPU script's ~100 s stage with compiles and autotuning
    cases = [dict(name="7B", B=b, T=2048, K=3584, N=4608, share=0.28) for b in (2, 16)]
    cases += [dict(name="7B", B=8, T=2048, K=3584, N=4608, share=s) for s in (0.0, 0.1, 0.5, 1.0)]
    return cases


def qkv_cases(smoke):
    if smoke:
        return [dict(name="smoke", B=2, T=24, hidden=32, H=2, Hkv=1, D=16, spans=[(2, 9)])]
    return [
        dict(name="7B", B=8, T=2048, hidden=3584, H=28, Hkv=4, D=128, spans=[(35, 576)]),
        dict(name="3B", B=8, T=2048, hidden=2048, H=16, Hkv=2, D=128, spans=[(35, 576)]),
    ]


# ----------------------------------------------------------------------------- providers
def linear_providers(x, is_image, w_t, b_t, w_i, b_i):
    M = is_image.numel()

    def triton_ours():
        return modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")

    # the same weights in two separate allocations: not stacked, so the pointer kernel runs
    w_t_sep = w_t.detach().clone().requires_grad_(w_t.requires_grad)
    w_i_sep = w_i.detach().clone().requires_grad_(w_i.requires_grad)

    def triton_pointer():
        return modality_linear(x, is_image, w_t_sep, b_t, w_i_sep, b_i, backend="triton")

    def dense_gemm():
        return F.linear(x, w_t, b_t)

    def where_2gemm():
        return modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="reference")

    def index_scatter():
        img = is_image.reshape(-1)
        x2 = x.reshape(M, -1)
        y_text = F.linear(x2[~img], w_t, b_t)
        y_img = F.linear(x2[img], w_i, b_i)
        out = torch.zeros(M, w_t.shape[0], device=x.device, dtype=x.dtype)
        out = out.index_put((~img,), y_text).index_put((img,), y_img)  # out-of-place: autograd-safe
        return out.view(*x.shape[:-1], -1)

    # weights stored stacked once (as a model using grouped_mm would), [2, K, N] with K contiguous
    w_stack = torch.stack([w_t.detach(), w_i.detach()]).transpose(-2, -1).requires_grad_(w_t.requires_grad)

    def grouped_mm():
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("torch._grouped_mm not available in this torch")
        img = is_image.reshape(-1)
        perm = torch.argsort(img.to(torch.int8), stable=True)
        n_text = (~img).sum()
        offs = torch.stack([n_text, n_text.new_full((), M)]).to(torch.int32)  # no host sync
        y_sorted = torch._grouped_mm(x.reshape(M, -1)[perm], w_stack, offs=offs)
        y = y_sorted.index_select(0, torch.argsort(perm))
        y = y + torch.where(img[:, None], b_i, b_t)
        return y.view(*x.shape[:-1], -1)

    providers = {"triton": triton_ours, "triton_pointer": triton_pointer, "dense_gemm": dense_gemm,
                 "where_2gemm": where_2gemm, "index_scatter": index_scatter, "grouped_mm": grouped_mm}
    return providers, [x, w_t, b_t, w_i, b_i, w_stack, w_t_sep, w_i_sep]


def _fwd_bwd(fn, params):
    """One training step of the projection: forward, then backward into every parameter it uses.

    Output gradients are made once; ``.grad`` is reset (not accumulated) so no provider pays an add.
    """
    out_grads = []

    def run():
        for p in params:
            p.grad = None
        out = fn()
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if not out_grads:
            out_grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, out_grads)
    return run


def measure(fn, device, smoke, **record):
    try:
        fn()  # compiles / autotunes outside timing
        synchronize(device)
        if smoke:
            ms = benchmark_ms(fn, device, warmup=0, rep=1)
        else:
            ms = benchmark_ms(fn, device)
        peak = peak_memory_bytes(fn, device)
        return make_record(ms=ms, peak_memory=peak, device=device, **record)
    except Exception as exc:  # noqa: BLE001 - an unavailable peer becomes a record with its error
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return make_record(ms=None, device=device, error=f"{type(exc).__name__}: {exc}"[:300], **record)


def make_linear_inputs(B, T, K, N, device, dtype, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, T, K, device=device, dtype=dtype, generator=g)
    # the two weights as halves of one [2, N, K] tensor, as ModalityLinear allocates them
    weights = torch.randn(2, N, K, device=device, dtype=dtype, generator=g) * K ** -0.5
    w_t, w_i = weights[0].detach(), weights[1].detach()
    b_t = torch.randn(N, device=device, dtype=dtype, generator=g)
    b_i = torch.randn(N, device=device, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, w_t, b_t, w_i, b_i)]


def bench_linear_case(case, is_image, device, dtype, smoke, providers=None, op=OP):
    B, T, K, N = case["B"], case["T"], case["K"], case["N"]
    M = B * T
    share = round(float(is_image.float().mean()), 3)
    shape = {"case": case["name"], "share": share, "M": M, "K": K, "N": N}
    records = []
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        x, w_t, b_t, w_i, b_i = make_linear_inputs(B, T, K, N, device, dtype, train)
        flops = 2.0 * M * K * N * (3 if train else 1)
        provs, params = linear_providers(x, is_image, w_t, b_t, w_i, b_i)
        for name, fn in provs.items():
            if providers is not None and name not in providers:
                continue
            run = _fwd_bwd(fn, params) if train else torch.no_grad()(fn)
            records.append(measure(run, device, smoke, op=op, provider=name, shape=shape, dtype=dtype,
                                   mode=mode, flops=flops))
            if name.startswith("triton"):
                records[-1]["autotune"] = _autotune_snapshot()
        del x, w_t, b_t, w_i, b_i, provs, params
    return records


def _autotune_snapshot():
    """The configs the autotuner picked so far (key -> config), recorded with our timings."""
    from llavit_kernels.ops import _modality_linear_kernels as kern

    kernels = (("routed_mm", kern.routed_mm_kernel), ("routed_mm_tma", kern.routed_mm_tma_kernel),
               ("routed_dw", kern.routed_dw_kernel))
    return {name: {str(k): str(v) for k, v in kernel.cache.items()} for name, kernel in kernels}


def bench_backward_parts(case, is_image, device, dtype, smoke):
    """dX and dW alone, ours vs the dense GEMM doing the same product: shows which kernel lags."""
    from llavit_kernels.ops import _modality_linear_triton as mlt

    B, T, K, N = case["B"], case["T"], case["K"], case["N"]
    M = B * T
    x, w_t, _, w_i, _ = make_linear_inputs(B, T, K, N, device, dtype, False)
    x2 = x.reshape(M, K)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    table = mlt.ml_token_order(is_image.reshape(-1))
    shape = {"case": case["name"], "share": round(float(is_image.float().mean()), 3), "M": M, "K": K, "N": N}
    flops = 2.0 * M * K * N
    w_t_sep, w_i_sep = w_t.clone(), w_i.clone()  # separate allocations: the pointer kernel
    jobs = (
        ("bwd_dx", "triton", lambda: mlt.ml_linear_dx(dy, table, w_t, w_i)),
        ("bwd_dx", "triton_pointer", lambda: mlt.ml_linear_dx(dy, table, w_t_sep, w_i_sep)),
        ("bwd_dx", "dense_gemm", lambda: dy @ w_t),
        ("bwd_dw", "triton", lambda: mlt.ml_linear_dw(dy, x2, table)),  # both dW_m and both db_m
        ("bwd_dw", "dense_gemm", lambda: (dy.t() @ x2, dy.sum(0))),
    )
    records = []
    for mode, provider, fn in jobs:
        records.append(measure(fn, device, smoke, op=OP, provider=provider, shape=shape, dtype=dtype, mode=mode,
                               flops=flops))
        if provider.startswith("triton"):
            records[-1]["autotune"] = _autotune_snapshot()
    return records


def rope_tables(T, D, device):
    inv = 1.0 / (1000000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()


def bench_qkv_case(case, device, dtype, smoke):
    B, T, hidden, H, Hkv, D = (case[k] for k in ("B", "T", "hidden", "H", "Hkv", "D"))
    N = (H + 2 * Hkv) * D
    M = B * T
    is_image = image_mask(B, T, case["spans"], device)
    cos, sin = rope_tables(T, D, device)
    cos_b, sin_b = cos.to(dtype), sin.to(dtype)
    shape = {"case": case["name"], "M": M, "hidden": hidden, "H": H, "Hkv": Hkv, "D": D}
    records = []
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        x, w_t, b_t, w_i, b_i = make_linear_inputs(B, T, hidden, N, device, dtype, train)
        flops = 2.0 * M * hidden * N * (3 if train else 1)

        def fused_rope():
            return modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, cos_b, sin_b, backend="triton")

        def fused_no_rope():
            return modality_qkv(x, is_image, w_t, b_t, w_i, b_i, H, Hkv, backend="triton")

        w_t_sep = w_t.detach().clone().requires_grad_(train)
        w_i_sep = w_i.detach().clone().requires_grad_(train)

        def fused_rope_pointer():  # separate weight allocations: the pointer kernel
            return modality_qkv(x, is_image, w_t_sep, b_t, w_i_sep, b_i, H, Hkv, cos_b, sin_b, backend="triton")

        def unfused_rope():  # our projection, then the usual HF sequence: split, view, rotary, copies
            y = modality_linear(x, is_image, w_t, b_t, w_i, b_i, backend="triton")
            q, k, v = y.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rotary(q.reshape(B, T, H, D), cos_b, sin_b)
            k = apply_rotary(k.reshape(B, T, Hkv, D), cos_b, sin_b)
            return q.contiguous(), k.contiguous(), v.reshape(B, T, Hkv, D).contiguous()

        def dense_rope():  # the floor for the whole step: one GEMM + the same rotary sequence
            y = F.linear(x, w_t, b_t)
            q, k, v = y.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rotary(q.reshape(B, T, H, D), cos_b, sin_b)
            k = apply_rotary(k.reshape(B, T, Hkv, D), cos_b, sin_b)
            return q.contiguous(), k.contiguous(), v.reshape(B, T, Hkv, D).contiguous()

        for name, fn in (("qkv_fused_rope", fused_rope), ("qkv_fused_rope_pointer", fused_rope_pointer),
                         ("qkv_fused_no_rope", fused_no_rope), ("qkv_unfused_rope", unfused_rope),
                         ("dense_gemm_rope", dense_rope)):
            run = _fwd_bwd(fn, [x, w_t, b_t, w_i, b_i, w_t_sep, w_i_sep]) if train else torch.no_grad()(fn)
            records.append(measure(run, device, smoke, op="modality_qkv", provider=name, shape=shape,
                                   dtype=dtype, mode=mode, flops=flops))
        del x, w_t, b_t, w_i, b_i
    return records


# ----------------------------------------------------------------------------- CPU paths
def cpu_cases(smoke):
    if smoke:
        return [dict(name="smoke", B=2, T=40, K=32, N=48, spans=[(3, 11)])]
    # Qwen2.5-0.5B fused QKV (896 -> 896 + 2 x 128) and 1.5B (1536 -> 1536 + 2 x 256), 28% image
    return [
        dict(name="0.5B", B=2, T=2048, K=896, N=1152, spans=[(35, 576)]),
        dict(name="1.5B", B=2, T=2048, K=1536, N=2048, spans=[(35, 576)]),
        dict(name="1.5B-9x64", B=2, T=2048, K=1536, N=2048, spans=[(35 + 200 * i, 64) for i in range(9)]),
    ]


def bench_cpu_paths(smoke, reps=7):
    """The CPU paths, each rep running every provider once in turn (fair on a shared machine)."""
    import time

    from llavit_kernels import SpanLayout
    from llavit_kernels.ops.modality_linear import modality_linear_reference

    device, dtype = torch.device("cpu"), torch.float32
    records = []
    for case in cpu_cases(smoke):
        B, T, K, N = case["B"], case["T"], case["K"], case["N"]
        M = B * T
        is_image = image_mask(B, T, case["spans"], device)
        layout = SpanLayout.from_image_mask(is_image)
        shape = {"case": case["name"], "share": round(float(is_image.float().mean()), 3), "M": M, "K": K, "N": N}
        for mode in ("fwd", "fwd+bwd"):
            train = mode == "fwd+bwd"
            x, w_t, b_t, w_i, b_i = make_linear_inputs(B, T, K, N, device, dtype, train)
            params = [x, w_t, b_t, w_i, b_i]
            provs = {
                # backend=None on CPU: one GEMM per modality; the order is cached on the layout
                "cpu_grouped": lambda: modality_linear(x, layout, w_t, b_t, w_i, b_i),
                "reference": lambda: modality_linear_reference(x, is_image, w_t, b_t, w_i, b_i),
                "dense_gemm": lambda: F.linear(x, w_t, b_t),
            }
            runs = {k: (_fwd_bwd(f, params) if train else torch.no_grad()(f)) for k, f in provs.items()}
            times = {k: [] for k in runs}
            for rep in range(1 if smoke else reps + 1):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if rep > 0 or smoke:  # rep 0 warms up
                        times[name].append((time.perf_counter() - start) * 1e3)
            flops = 2.0 * M * K * N * (3 if train else 1)
            for name, ts in times.items():
                ts.sort()
                records.append(make_record(op=OP + "_cpu", provider=name, shape=shape, dtype=dtype, mode=mode,
                                           ms=ts[len(ts) // 2], flops=flops, device=device,
                                           reps=len(ts), threads=torch.get_num_threads()))
            del x, w_t, b_t, w_i, b_i, params, provs, runs
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    parser.add_argument("--cpu", action="store_true", help="time the CPU paths only (see the module doc)")
    args = parser.parse_args(argv)
    if args.cpu:
        smoke = args.smoke
        records = bench_cpu_paths(smoke)
        print_table(records, baseline="reference")
        path = save_results(records, "modality_linear_cpu" + ("-smoke" if smoke else ""), args.out)
        print(f"wrote {path}")
        return records
    device = default_device()
    smoke = args.smoke or smoke_mode()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = "modality_linear" + ("-smoke" if smoke else "")
    records = []
    # most important first, results saved after every case: a time limit leaves what was measured
    for case in main_cases(smoke):
        is_image = image_mask(case["B"], case["T"], case["spans"], device)
        records += bench_linear_case(case, is_image, device, dtype, smoke)
        records += bench_backward_parts(case, is_image, device, dtype, smoke)
        save_results(records, name, args.out)
    for case in qkv_cases(smoke):
        records += bench_qkv_case(case, device, dtype, smoke)
        save_results(records, name, args.out)
    for case in sweep_cases(smoke):
        is_image = share_mask(case["B"], case["T"], case["share"], device)
        records += bench_linear_case(case, is_image, device, dtype, smoke,
                                     providers=("triton", "triton_pointer", "dense_gemm", "grouped_mm"),
                                     op=OP + "_sweep")
        save_results(records, name, args.out)
    print_table([r for r in records if r["op"] == OP], baseline="dense_gemm")
    print_table([r for r in records if r["op"] == OP + "_sweep"], baseline="dense_gemm")
    for r in records:
        if r["provider"] == "triton" and r.get("autotune") and r["op"] == OP and r["mode"] == "bwd_dw":
            print(f"autotune picks after {r['shape']['case']}: {r['autotune']}")
    print_table([r for r in records if r["op"] == "modality_qkv"], baseline="dense_gemm_rope")
    path = save_results(records, name, args.out)
    plot_results([r for r in records if r["op"] == OP], path.with_suffix(".png"),
                 title="modality_linear vs dense GEMM floor and peers")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()

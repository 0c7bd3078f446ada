"""Causal attention engines for the composed span-attention backend: one small private registry.

The composed backend (``_span_attention_composed``) splits the LLaViT mask into the causal prefix
``[document start, q]`` of every query and the image-span completion ``(q, span_end)``. The causal
part is what stock attention engines already do fast; each engine below runs it and returns the
output with its log-sum-exp, and runs the matching backward given an EXTERNAL output and
log-sum-exp (the merged ones: the ring-attention identity).

Contract of every engine (``q``: ``[B, Tq, H, D]`` padded or ``[N, H, D]`` packed; ``k``/``v``:
``[B, Tk, Hkv, D]`` or ``[N, Hkv, D]``; ``kv_start``/``kv_end``: the FULL layout's per-query key
intervals, from which the engine reads document starts and padding):

* ``forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale) -> (out, lse)``: ``out`` of
  q's shape (in q's dtype or fp32), ``lse`` fp32 ``[B, H, Tq]`` / ``[H, N]`` (natural log). Rows of
  valid queries hold causal attention over ``[kv_start, q]``; padding rows may hold anything (the
  caller overwrites them).
* ``backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, cu_seqlens,
  query_offset, scale) -> (dq, dk, dv)``: the causal part's gradients given the merged ``out`` /
  ``lse``; gradients of padding queries and of keys no query sees are 0.
* ``supports(device, dtype, head_dim, groups, packed, query_offset) -> None | str``: ``None`` when
  the engine runs this case, else the reason it does not (used for the choice and for errors).

| engine       | device | dtypes                  | head dims      | GQA      | layouts (varlen)                 | deterministic bwd |
|--------------|--------|-------------------------|----------------|----------|----------------------------------|-------------------|
| ``cpu_flash``| CPU    | fp32, fp64; half natively| any           | native   | all: one batched call when no row | yes               |
|              |        | with CPU support, else  |                |          | needs a shift, else per document  |                   |
|              |        | computed in fp32        |                |          |                                   |                   |
| ``flash_attn``| CUDA  | fp16, bf16              | <= 256 (x8)    | native   | packed, padded (varlen, no sync); | no (atomics)      |
|              |        |                         |                |          | query chunks: not covered         |                   |
| ``cudnn``    | CUDA   | fp16, bf16              | <= 128 (x8)    | expanded | as flash_attn                    | yes               |
| ``torch_flash``| CUDA | fp16, bf16              | <= 256 (x8)    | native   | as flash_attn                    | no (atomics)      |

On CUDA the layouts are flattened to one varlen call: document ``b`` of a padded batch is
``[b*T + valid_start_b, (b+1)*T + valid_start_{b+1})`` (its valid tokens, its right padding and the
next row's left padding; only its valid queries' rows are kept), and ``max_seqlen`` is the upper
bound ``2*T`` (packed: ``N``), so no host sync is needed to launch. Query chunks against a KV cache
(``query_offset > 0``) are not covered on CUDA: the front door routes them to the fused Triton
kernel. The CUDA engines were written against torch 2.11 / 2.13 schemas and are checked here for
presence by schema only; they run only in the GPU tier (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["CausalEngine", "ENGINES", "CPU_ENGINES", "CUDA_ENGINES", "choose_engine", "engine_support_table",
           "cpu_compute_dtype"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CausalEngine:
    name: str
    device_type: str
    supports: Callable[..., Optional[str]]
    forward: Callable[..., Tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# ============================================================================ CPU
def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
# Native half-precision dot products (AVX512-BF16 / AMX); without them bf16 matmul runs several
# times slower than fp32 on CPU, so half inputs are computed in fp32 there and cast back.
CPU_NATIVE_BF16 = bool(_FLAGS & {"avx512_bf16", "amx_bf16"})
CPU_NATIVE_FP16 = bool(_FLAGS & {"avx512_fp16", "amx_fp16"})
# None (default): the composed CPU path runs the flash kernel in the input's half dtype where the
# CPU has native half dot products (measured on an AVX512-BF16 Zen CPU: bf16 flash as fast as fp32,
# and no fp32 copies of q/k/v/out, which kept peak memory within 2x of causal SDPA's), and in fp32
# (cast back) elsewhere. False forces fp32; True is the same as None (native only where supported).
CPU_HALF_NATIVE_ENGINE: Optional[bool] = None


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU composed path computes ``dtype`` inputs in."""
    if dtype not in _HALF:
        return dtype
    native = CPU_NATIVE_BF16 if dtype == torch.bfloat16 else CPU_NATIVE_FP16
    return dtype if (CPU_HALF_NATIVE_ENGINE is not False and native) else torch.float32


_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_supports(device, dtype, head_dim, groups, packed, query_offset) -> Optional[str]:
    if torch.device(device).type != "cpu":
        return "cpu_flash runs on CPU tensors only"
    if _CPU_FWD is None or _CPU_BWD is None:
        return "this torch has no aten._scaled_dot_product_flash_attention_for_cpu (and backward)"
    if dtype not in (torch.float32, torch.float64) + _HALF:
        return f"cpu_flash: dtype {dtype} not supported"
    return None


def _as4(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t


def _as2(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def _lse4(lse: torch.Tensor) -> torch.Tensor:
    """[B, H, T] view of an lse of layout [B, H, T] (padded) or [H, N] (packed)."""
    return lse.unsqueeze(0) if lse.dim() == 2 else lse


def _cpu_segments(kv_start2: torch.Tensor, kv_end2: torch.Tensor, query_offset: int):
    """Host list of causal segments (row, q_begin, q_end, key_begin): maximal runs of valid queries
    sharing one key start (a document / the valid part of a row). On CPU a host sync costs nothing."""
    valid = kv_end2 > kv_start2
    key = torch.where(valid, kv_start2, torch.full_like(kv_start2, -1))
    prev = torch.cat([torch.full_like(key[:, :1], -2), key[:, :-1]], dim=1)
    nxt = torch.cat([key[:, 1:], torch.full_like(key[:, :1], -2)], dim=1)
    starts = valid & (key != prev)
    ends = valid & (key != nxt)
    sb, sa = starts.nonzero(as_tuple=True)
    _, se = ends.nonzero(as_tuple=True)  # row-major order: the i-th start pairs with the i-th end
    ks = kv_start2[sb, sa]
    return list(zip(sb.tolist(), sa.tolist(), (se + 1).tolist(), ks.tolist()))


def _cpu_one_batched_call(kv_start2, kv_end2, query_offset, tq, tk) -> bool:
    """True when every valid query's keys start at 0 with no cache offset: one causal call on the
    whole batch is exact for them (right padding comes after every real query)."""
    if query_offset != 0 or tq != tk:
        return False
    return bool(((kv_start2 == 0) | (kv_start2 >= kv_end2)).all())


def _merge_into(out_a, lse_a, out_b, lse_b):
    """Merge (out_b, lse_b) into (out_a, lse_a) by log-sum-exp; out [.., T, H, D], lse [.., H, T]."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).transpose(-1, -2).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).transpose(-1, -2).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def _cpu_forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale):
    q4, k4, v4 = _as4(q), _as4(k), _as4(v)
    kv_start2, kv_end2 = _as2(kv_start), _as2(kv_end)
    batch, tq, heads, dim = q4.shape
    tk = k4.shape[1]
    if _cpu_one_batched_call(kv_start2, kv_end2, query_offset, tq, tk):
        o, lse = _CPU_FWD(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), 0.0, True, scale=scale)
        out4 = o.transpose(1, 2)
    else:
        out4 = q4.new_zeros(q4.shape)
        lse = torch.full((batch, heads, tq), float("inf"), dtype=torch.float32 if q4.dtype != torch.float64 else q4.dtype)
        for b, qa, qe, ks in _cpu_segments(kv_start2, kv_end2, query_offset):
            pos = query_offset + qa  # key position of the segment's first query
            qs = q4[b:b + 1, qa:qe].transpose(1, 2)
            o, l = _CPU_FWD(qs, k4[b:b + 1, pos:query_offset + qe].transpose(1, 2),
                            v4[b:b + 1, pos:query_offset + qe].transpose(1, 2), 0.0, True, scale=scale)
            o = o.transpose(1, 2)
            if ks < pos:  # cached prefix (query chunk): every query sees all of [ks, pos)
                o2, l2 = _CPU_FWD(qs, k4[b:b + 1, ks:pos].transpose(1, 2), v4[b:b + 1, ks:pos].transpose(1, 2),
                                  0.0, False, scale=scale)
                o, l = _merge_into(o, l, o2.transpose(1, 2), l2)
            out4[b, qa:qe] = o[0]
            lse[b, :, qa:qe] = l[0]
    if q.dim() == 3:
        return out4[0], lse[0]
    return out4, lse


def _cpu_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, cu_seqlens, query_offset, scale):
    q4, k4, v4, o4, do4 = (_as4(t) for t in (q, k, v, out, grad_out))
    lse3 = _lse4(lse)
    kv_start2, kv_end2 = _as2(kv_start), _as2(kv_end)
    batch, tq = q4.shape[:2]
    tk = k4.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, D] <-> [B, H, T, D]
    if _cpu_one_batched_call(kv_start2, kv_end2, query_offset, tq, tk):
        # Padding rows carry out = 0 and lse = +inf: their probabilities are exactly 0.
        dq, dk, dv = _CPU_BWD(t(do4), t(q4), t(k4), t(v4), t(o4), lse3, 0.0, True, scale=scale)
        dq4, dk4, dv4 = t(dq), t(dk), t(dv)
    else:
        dq4, dk4, dv4 = torch.zeros_like(q4), torch.zeros_like(k4), torch.zeros_like(v4)
        for b, qa, qe, ks in _cpu_segments(kv_start2, kv_end2, query_offset):
            pos = query_offset + qa
            sl = slice(qa, qe)
            args = (t(do4[b:b + 1, sl]), t(q4[b:b + 1, sl]))
            o_s, l_s = t(o4[b:b + 1, sl]), lse3[b:b + 1, :, sl]
            for k_lo, k_hi, causal in ((pos, query_offset + qe, True), (ks, pos, False)):
                if k_hi <= k_lo:
                    continue
                dq, dk, dv = _CPU_BWD(args[0], args[1], t(k4[b:b + 1, k_lo:k_hi]), t(v4[b:b + 1, k_lo:k_hi]),
                                      o_s, l_s, 0.0, causal, scale=scale)
                dq4[b, sl] += t(dq)[0]
                dk4[b, k_lo:k_hi] += t(dk)[0]
                dv4[b, k_lo:k_hi] += t(dv)[0]
    if q.dim() == 3:
        return dq4[0], dk4[0], dv4[0]
    return dq4, dk4, dv4


CPU_FLASH = CausalEngine("cpu_flash", "cpu", _cpu_supports, _cpu_forward, _cpu_backward)


# ============================================================================ CUDA (varlen)
def _has_args(op_name: str, *names: str) -> bool:
    """True when ``torch.ops.aten.<op_name>`` exists with (at least) these argument names."""
    op = getattr(torch.ops.aten, op_name, None)
    if op is None:
        return False
    try:
        schema = op.default._schema
    except Exception:  # noqa: BLE001 - an op without a default overload
        return False
    have = {a.name for a in schema.arguments}
    return all(n in have for n in names)


_TORCH_FLASH_OK = _has_args("_flash_attention_forward", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "is_causal") and \
    _has_args("_flash_attention_backward", "out", "logsumexp", "cum_seq_q", "rng_state", "unused")
_CUDNN_OK = _has_args("_cudnn_attention_forward", "cum_seq_q", "cum_seq_k", "compute_log_sumexp") and \
    _has_args("_cudnn_attention_backward", "philox_seed", "philox_offset", "cum_seq_q", "cum_seq_k")


def _flash_attn_functions():
    """(forward, backward) of the flash_attn package's varlen interface, or None."""
    try:
        from flash_attn import flash_attn_interface as fai  # optional dependency
    except Exception:  # noqa: BLE001 - absent or broken install
        return None
    fwd = getattr(fai, "_flash_attn_varlen_forward", None)
    bwd = getattr(fai, "_flash_attn_varlen_backward", None)
    if fwd is None or bwd is None:
        return None
    return fwd, bwd


_FLASH_ATTN = _flash_attn_functions()


def _cuda_supports_common(name, device, dtype, head_dim, packed, query_offset, max_head_dim) -> Optional[str]:
    if torch.device(device).type != "cuda":
        return f"{name} runs on CUDA tensors only"
    if dtype not in _HALF:
        return f"{name}: supports float16 and bfloat16, got {dtype}"
    if head_dim % 8 != 0 or head_dim > max_head_dim:
        return f"{name}: supports head dims that are multiples of 8 up to {max_head_dim}, got {head_dim}"
    if query_offset != 0:
        return f"{name}: query chunks against a KV cache are routed to the Triton kernel"
    return None


def _torch_flash_supports(device, dtype, head_dim, groups, packed, query_offset):
    if not _TORCH_FLASH_OK:
        return "this torch has no varlen aten._flash_attention_forward/_backward"
    return _cuda_supports_common("torch_flash", device, dtype, head_dim, packed, query_offset, 256)


def _cudnn_supports(device, dtype, head_dim, groups, packed, query_offset):
    if not _CUDNN_OK:
        return "this torch has no varlen aten._cudnn_attention_forward/_backward"
    if torch.device(device).type == "cuda" and not torch.backends.cudnn.is_available():
        return "cudnn: cuDNN is not available"
    return _cuda_supports_common("cudnn", device, dtype, head_dim, packed, query_offset, 128)


def _flash_attn_supports(device, dtype, head_dim, groups, packed, query_offset):
    if _FLASH_ATTN is None:
        return "the flash_attn package is not installed (or has no varlen forward/backward)"
    return _cuda_supports_common("flash_attn", device, dtype, head_dim, packed, query_offset, 256)


def _varlen_problem(q, k, v, kv_start, cu_seqlens):
    """Flatten to one varlen call: (q3, k3, v3, cu int32 [docs+1], max_seqlen upper bound, unflatten).

    Packed layouts use their own documents. Padded rows become documents that start at each row's
    first valid token (see the module docstring): no host sync, no copy of contiguous inputs."""
    if q.dim() == 3:
        n = q.shape[0]
        return q, k, v, cu_seqlens.to(torch.int32), max(n, 1), (lambda t: t)
    batch, t = q.shape[:2]
    valid_start = kv_start[:, 0].to(torch.int32)  # every query of a padded row has the row's start
    rows = torch.arange(batch, device=q.device, dtype=torch.int32) * t
    cu = torch.cat([rows + valid_start, torch.full((1,), batch * t, device=q.device, dtype=torch.int32)])
    q3, k3, v3 = (x.reshape(batch * t, x.shape[2], x.shape[3]) for x in (q, k, v))
    return q3, k3, v3, cu, max(2 * t, 1), (lambda x: x.reshape(batch, t, *x.shape[1:]))


def _lse_to_layout(lse, q):
    """Engine lse ([H, total] or [total, H(, 1)]) -> the composed layout [B, H, T] / [H, N]."""
    heads = q.shape[-2]
    total = q.shape[0] * (q.shape[1] if q.dim() == 4 else 1)
    if lse.dim() >= 2 and lse.shape[0] == heads and lse.shape[1] == total:
        lse_ht = lse.reshape(heads, total)
    else:
        lse_ht = lse.reshape(total, heads).transpose(0, 1)
    lse_ht = lse_ht.float()
    if q.dim() == 3:
        return lse_ht
    return lse_ht.reshape(heads, q.shape[0], q.shape[1]).transpose(0, 1)


def _lse_from_layout(lse, q):
    """The composed lse -> [H, total] contiguous (flash varlen's layout)."""
    if q.dim() == 3:
        return lse.contiguous()
    return lse.transpose(0, 1).reshape(lse.shape[1], -1).contiguous()


def _zero_unseen(dq, dk, dv, kv_start, kv_end, q_start, q_end):
    """Rows the varlen call did not cover hold garbage: zero padding queries and unseen keys."""
    valid_q = (kv_end > kv_start)[..., None, None]
    seen_k = (q_end > q_start)[..., None, None]
    return (torch.where(valid_q, dq, torch.zeros_like(dq)), torch.where(seen_k, dk, torch.zeros_like(dk)),
            torch.where(seen_k, dv, torch.zeros_like(dv)))


def _torch_flash_forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale):
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, k, v, kv_start, cu_seqlens)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q3, k3, v3, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
    return unflat(out), _lse_to_layout(lse, q)


def _torch_flash_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, cu_seqlens, query_offset,
                          scale):
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, k, v, kv_start, cu_seqlens)
    flat = lambda x: x.reshape(q3.shape[0], *x.shape[-2:]) if x.dim() == 4 else x  # noqa: E731
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        flat(grad_out).contiguous(), q3, k3, v3, flat(out).contiguous(), _lse_from_layout(lse, q), cu, cu,
        max_len, max_len, 0.0, True, rng_state, unused, scale=scale)
    return _zero_unseen(unflat(dq), unflat(dk), unflat(dv), kv_start, kv_end, q_start, q_end)


def _expand_kv(k, heads):
    groups = heads // k.shape[-2]
    return k if groups == 1 else k.repeat_interleave(groups, dim=-2)


def _fold_kv_grad(dk, kv_heads):
    heads = dk.shape[-2]
    if heads == kv_heads:
        return dk
    return dk.unflatten(-2, (kv_heads, heads // kv_heads)).sum(-2)


def _cudnn_forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale):
    heads = q.shape[-2]
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, _expand_kv(k, heads), _expand_kv(v, heads), kv_start,
                                                      cu_seqlens)
    result = torch.ops.aten._cudnn_attention_forward(
        q3, k3, v3, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale)
    return unflat(result[0]), _lse_to_layout(result[1], q)


def _cudnn_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, cu_seqlens, query_offset, scale):
    heads, kv_heads = q.shape[-2], k.shape[-2]
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, _expand_kv(k, heads), _expand_kv(v, heads), kv_start,
                                                      cu_seqlens)
    flat = lambda x: x.reshape(q3.shape[0], *x.shape[-2:]) if x.dim() == 4 else x  # noqa: E731
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    lse_eng = _lse_from_layout(lse, q).transpose(0, 1).contiguous().unsqueeze(-1)  # [total, H, 1]
    dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
        flat(grad_out).contiguous(), q3, k3, v3, flat(out).contiguous(), lse_eng, seed, seed,
        torch.empty(0, device=q.device), cu, cu, max_len, max_len, 0.0, True, scale=scale)
    dk, dv = unflat(_fold_kv_grad(dk, kv_heads)), unflat(_fold_kv_grad(dv, kv_heads))
    return _zero_unseen(unflat(dq), dk, dv, kv_start, kv_end, q_start, q_end)


def _call_by_name(fn, **kwargs):
    """Call a flash_attn internal with the keyword arguments its installed version accepts."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _flash_attn_forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale):
    fwd, _ = _FLASH_ATTN
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, k, v, kv_start, cu_seqlens)
    res = _call_by_name(fwd, q=q3, k=k3, v=v3, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                        max_seqlen_k=max_len, dropout_p=0.0, softmax_scale=scale, causal=True,
                        window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
                        alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                        seqused_k=None)
    # flash_attn >= 2.6: (out, softmax_lse, S_dmask, rng_state); 2.4-2.5: (out, q, k, v, out_padded,
    # softmax_lse, S_dmask, rng_state).
    out, lse = res[0], (res[5] if len(res) >= 8 else res[1])
    return unflat(out), _lse_to_layout(lse, q)


def _flash_attn_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, cu_seqlens, query_offset,
                         scale):
    _, bwd = _FLASH_ATTN
    q3, k3, v3, cu, max_len, unflat = _varlen_problem(q, k, v, kv_start, cu_seqlens)
    flat = lambda x: x.reshape(q3.shape[0], *x.shape[-2:]) if x.dim() == 4 else x  # noqa: E731
    dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
    _call_by_name(bwd, dout=flat(grad_out).contiguous(), q=q3, k=k3, v=v3, out=flat(out).contiguous(),
                  softmax_lse=_lse_from_layout(lse, q), dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                  max_seqlen_q=max_len, max_seqlen_k=max_len, dropout_p=0.0, softmax_scale=scale, causal=True,
                  window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=False, rng_state=None)
    return _zero_unseen(unflat(dq), unflat(dk), unflat(dv), kv_start, kv_end, q_start, q_end)


FLASH_ATTN = CausalEngine("flash_attn", "cuda", _flash_attn_supports, _flash_attn_forward, _flash_attn_backward)
CUDNN = CausalEngine("cudnn", "cuda", _cudnn_supports, _cudnn_forward, _cudnn_backward)
TORCH_FLASH = CausalEngine("torch_flash", "cuda", _torch_flash_supports, _torch_flash_forward, _torch_flash_backward)

# Preference order per device (first engine that supports the case wins). The CUDA order is not
# yet backed by a GPU measurement of the composed path (see bench/gpu_check.sh).
CPU_ENGINES = (CPU_FLASH,)
CUDA_ENGINES = (FLASH_ATTN, CUDNN, TORCH_FLASH)
ENGINES: Dict[str, CausalEngine] = {e.name: e for e in CPU_ENGINES + CUDA_ENGINES}


def choose_engine(device, dtype, head_dim, groups, packed, query_offset, override: Optional[str] = None) -> str:
    """Name of the causal engine for this case; raise ValueError naming why none / the override fits."""
    device = torch.device(device)
    case = (device, dtype, head_dim, groups, packed, query_offset)
    if override is not None:
        if override not in ENGINES:
            raise ValueError(f"causal_engine: expected None or one of {tuple(ENGINES)}, got {override!r}")
        reason = ENGINES[override].supports(*case)
        if reason is not None:
            raise ValueError(f"causal_engine={override!r} does not cover this call: {reason}")
        return override
    candidates = CPU_ENGINES if device.type == "cpu" else CUDA_ENGINES
    reasons = []
    for engine in candidates:
        reason = engine.supports(*case)
        if reason is None:
            return engine.name
        reasons.append(reason)
    raise ValueError("backend='composed': no causal engine covers this call (" + "; ".join(reasons) + ")")


def engine_support_table() -> Dict[str, bool]:
    """Which engines this torch / install provides at all (schemas present), for scripts and docs."""
    return {"cpu_flash": _CPU_FWD is not None and _CPU_BWD is not None, "flash_attn": _FLASH_ATTN is not None,
            "cudnn": _CUDNN_OK, "torch_flash": _TORCH_FLASH_OK}

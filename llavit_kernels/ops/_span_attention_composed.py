"""Composed span attention: a fast causal engine plus the image-span completion, merged by log-sum-exp.

Under LLaViT's mask the keys of query ``q`` are its causal prefix ``[document start, q]`` plus, for an
image token, the rest of its own image ``(q, span_end)`` (``SpanLayout.causal_part`` and
``SpanLayout.span_completion`` partition the mask exactly). The causal part runs on the platform's
fastest causal engine (``_causal_engines``); the completion, about span^2/2 pairs per image, runs on
our own code: the Triton kernel on CUDA (its block skipping visits only image blocks), on CPU the C++
kernel of csrc/ per image when it is built, else the flash kernel per image (tokens reversed), else
per-span dense blocks (O(span^2) memory, never T x T). With ``(o_c, l_c)`` and ``(o_s, l_s)`` the two parts'
outputs and log-sum-exps::

    l = logaddexp(l_c, l_s)        o = o_c * exp(l_c - l) + o_s * exp(l_s - l)

which is exact. Backward: each part's backward receives the MERGED ``o`` and ``l`` (then
``exp(s - l)`` are the true probabilities of its pairs and ``rowsum(dO * o)`` the true delta: the
identity ring attention uses) and the gradients are summed.

Registered as custom ops ``llavit::span_attention_composed_fwd`` / ``_bwd`` with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them. On CPU the
ops read segment and span boundaries on the host inside the op (free there, and invisible to the
compiler); on CUDA they never sync.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..layout import SpanLayout
from ._span_attention_op import lse_shape as _lse_shape  # one definition for every backend
from . import _causal_engines as E

__all__ = ["span_attention_composed", "span_attention_composed_with_lse", "span_attention_composed_fwd",
           "span_attention_composed_bwd", "covers"]


def covers(q: torch.Tensor, k: torch.Tensor, layout: SpanLayout, causal_engine: Optional[str] = None) -> Optional[str]:
    """None when the composed backend runs this call, else the reason it does not (front door asks)."""
    if q.device.type == "cuda":
        if layout.query_offset != 0:
            return "query chunks against a KV cache are not covered by the CUDA causal engines (use triton)"
        from . import _backend

        if not _backend.triton_importable():
            return "the CUDA completion runs on the Triton kernel, and triton failed to import"
        from .span_attention import TRITON_DTYPES, TRITON_HEAD_DIMS

        if q.dtype not in TRITON_DTYPES or q.shape[-1] not in TRITON_HEAD_DIMS:
            return f"the CUDA completion (Triton) covers dtypes {TRITON_DTYPES} and head dims {TRITON_HEAD_DIMS}"
    try:
        _engine_for(q, k, layout, causal_engine)
    except ValueError as exc:
        return str(exc)
    return None


def _engine_for(q, k, layout, override):
    return E.choose_engine(q.device, q.dtype, q.shape[-1], q.shape[-2] // k.shape[-2], layout.packed,
                           layout.query_offset, override)


# ----------------------------------------------------------------------------- CPU completion
def _spans_host(c_kv_start2: torch.Tensor, kv_end2: torch.Tensor, query_offset: int) -> List[Tuple[int, int, int]]:
    """(row, q_begin, q_end) of every completion block: the queries of one image that have keys after
    them (all but the span's last token). Their keys are [offset + q_begin + 1, offset + q_end + 1)."""
    has = c_kv_start2 < kv_end2
    key = torch.where(has, kv_end2, torch.full_like(kv_end2, -1))
    prev = torch.cat([torch.full_like(key[:, :1], -2), key[:, :-1]], dim=1)
    nxt = torch.cat([key[:, 1:], torch.full_like(key[:, :1], -2)], dim=1)
    sb, sa = (has & (key != prev)).nonzero(as_tuple=True)
    _, se = (has & (key != nxt)).nonzero(as_tuple=True)
    return list(zip(sb.tolist(), sa.tolist(), (se + 1).tolist()))


def _block_views(q4, k4, v4, b, qa, qe, query_offset, dtype):
    """[Hkv, G, L, D] queries and [Hkv, 1, L, D] keys/values of one completion block, in ``dtype``."""
    length = qe - qa
    heads, dim = q4.shape[2], q4.shape[3]
    kv_heads = k4.shape[2]
    k_lo = query_offset + qa + 1
    qh = q4[b, qa:qe].to(dtype).reshape(length, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)
    kh = k4[b, k_lo:k_lo + length].to(dtype).permute(1, 0, 2).unsqueeze(1)
    vh = v4[b, k_lo:k_lo + length].to(dtype).permute(1, 0, 2).unsqueeze(1)
    return qh, kh, vh, k_lo


def _block_scores(qh, kh, scale):
    length = qh.shape[2]
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    # Block query i (key position p) sees block key j (position p_first + 1 + j) iff j >= i.
    below = torch.ones(length, length, dtype=torch.bool, device=qh.device).tril(-1)
    return s.masked_fill_(below, float("-inf")), below


def _to_bthd(x):  # [Hkv, G, L, D] -> [L, H, D]
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1, x.shape[3])


# A completion block is causal attention read backwards: block query i sees block keys j >= i, so
# with both token orders reversed (i' = L-1-i, j' = L-1-j) it is j' <= i', plain top-left causal.
# On CPU the blocks therefore run on the flash kernel too (one fused pass; the dense blocks below
# are the fallback and took ~3x the causal time in elementwise passes over [H, L, L] scores).
USE_FLASH_BLOCKS = True


def _flipped(x4, b, lo, hi, dtype):
    """Tokens lo..hi of row b, reversed, in ``dtype``, as a [1, H, L, D] view for the flash kernel."""
    return x4[b, lo:hi].flip(0).to(dtype).unsqueeze(0).transpose(1, 2)


def _unflip(x):
    """[1, H, L, D] flash output of reversed tokens -> [L, H, D] in token order."""
    return x[0].transpose(0, 1).flip(0)


def _flash_blocks_available(dtype):
    return USE_FLASH_BLOCKS and E.CPU_FLASH.supports("cpu", dtype, 64, 1, False, 0) is None


# When the C++ kernel of csrc/ is built, the completion blocks run on it instead: it visits only the
# keys of each 64-query block ([q + 1, span end)), where the flash kernel skips causal work only at
# 512-key granularity, and it multiplies bf16 blocks natively where oneDNN's micro-kernel runs.
USE_CPP_BLOCKS = True


def _cpp_blocks_available(dtype):
    if not USE_CPP_BLOCKS or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from . import _span_attention_cpp as cpp

    return cpp.load_extension()


def _cpp_block(x4, b, lo, hi):
    """Tokens lo..hi of row b as a contiguous [1, L, H, D] tensor for the C++ kernel."""
    return x4[b:b + 1, lo:hi].contiguous()


def _cpp_block_intervals(length, device):
    """Block query j sees block keys [j, length): the completion of one image, keys shifted by one."""
    start = torch.arange(length, dtype=torch.int32, device=device)[None]
    return start, torch.full_like(start, length)


def _cpp_completion_merge(q4, k4, v4, out4, lse3, spans, query_offset, scale):
    from ._span_attention_cpp import span_attention_cpp_fwd

    acc = lse3.dtype
    for b, qa, qe in spans:
        k_lo, length = query_offset + qa + 1, qe - qa
        ks, ke = _cpp_block_intervals(length, q4.device)
        o_s, l_s = span_attention_cpp_fwd(_cpp_block(q4, b, qa, qe), _cpp_block(k4, b, k_lo, k_lo + length),
                                          _cpp_block(v4, b, k_lo, k_lo + length), ks, ke, ks, ke, scale)
        lse_s = l_s[0]  # [H, L]; every block row has a key: finite
        lse_c = lse3[b, :, qa:qe]
        lse = torch.logaddexp(lse_c, lse_s)
        w_c = torch.exp(lse_c - lse).transpose(0, 1)[..., None]  # [L, H, 1]
        w_s = torch.exp(lse_s - lse).transpose(0, 1)[..., None]
        out_blk = out4[b, qa:qe]
        if out_blk.dtype == acc:
            out_blk.mul_(w_c).add_(o_s[0].mul_(w_s))
        else:
            out_blk.copy_(out_blk.to(acc).mul_(w_c).add_(o_s[0].to(acc).mul_(w_s)))
        lse3[b, :, qa:qe] = lse


def _cpp_completion_backward(do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4, spans, query_offset, scale):
    from ._span_attention_cpp import span_attention_cpp_bwd

    for b, qa, qe in spans:
        k_lo, length = query_offset + qa + 1, qe - qa
        ks, ke = _cpp_block_intervals(length, q4.device)
        lse = lse3[b:b + 1, :, qa:qe].float().contiguous()  # the MERGED lse and out (see the module doc)
        dq, dk, dv = span_attention_cpp_bwd(
            _cpp_block(do4, b, qa, qe), None, _cpp_block(q4, b, qa, qe), _cpp_block(k4, b, k_lo, k_lo + length),
            _cpp_block(v4, b, k_lo, k_lo + length), _cpp_block(o4, b, qa, qe), lse, ks, ke, ks, ke, scale)
        dq4[b, qa:qe] += dq[0]
        dk4[b, k_lo:k_lo + length] += dk[0]
        dv4[b, k_lo:k_lo + length] += dv[0]


def _cpu_completion_merge(q4, k4, v4, out4, lse3, spans, query_offset, scale):
    """Merge every completion block into (out4 [B, T, H, D], lse3 [B, H, T]) in place. The blocks run
    in q4's dtype on the flash kernel (in lse3's, fp32/fp64, on the dense fallback); the merge is done
    in lse3's dtype and written back in out4's."""
    acc = lse3.dtype
    blk = q4.dtype
    if _cpp_blocks_available(blk):
        return _cpp_completion_merge(q4, k4, v4, out4, lse3, spans, query_offset, scale)
    if _flash_blocks_available(blk):
        for b, qa, qe in spans:
            k_lo, k_hi = query_offset + qa + 1, query_offset + qe + 1
            o_s, l_s = E._CPU_FWD(_flipped(q4, b, qa, qe, blk), _flipped(k4, b, k_lo, k_hi, blk),
                                  _flipped(v4, b, k_lo, k_hi, blk), 0.0, True, scale=scale)
            lse_s = l_s[0].flip(-1)  # [H, L]
            lse_c = lse3[b, :, qa:qe]
            lse = torch.logaddexp(lse_c, lse_s)
            w_c = torch.exp(lse_c - lse).transpose(0, 1)[..., None]  # [L, H, 1]
            w_s = torch.exp(lse_s - lse).transpose(0, 1)[..., None]
            out_blk = out4[b, qa:qe]
            if out_blk.dtype == acc:
                out_blk.mul_(w_c).add_(_unflip(o_s).mul_(w_s))  # in place: few [L, H, D] temporaries
            else:  # a half engine: merge in fp32, one rounding back
                out_blk.copy_(out_blk.to(acc).mul_(w_c).add_(_unflip(o_s).to(acc).mul_(w_s)))
            lse3[b, :, qa:qe] = lse
        return
    for b, qa, qe in spans:
        qh, kh, vh, _ = _block_views(q4, k4, v4, b, qa, qe, query_offset, acc)
        s, _ = _block_scores(qh, kh, scale)
        lse_s = torch.logsumexp(s, dim=-1)  # every block row has its diagonal key: finite
        o_s = torch.matmul(torch.exp(s - lse_s[..., None]), vh)
        lse_s = lse_s.reshape(-1, qe - qa)  # [H, L]
        lse_c = lse3[b, :, qa:qe]
        lse = torch.logaddexp(lse_c, lse_s)
        w_c = torch.exp(lse_c - lse).transpose(0, 1)[..., None]  # [L, H, 1]
        w_s = torch.exp(lse_s - lse).transpose(0, 1)[..., None]
        out4[b, qa:qe] = out4[b, qa:qe] * w_c + _to_bthd(o_s) * w_s
        lse3[b, :, qa:qe] = lse


def _cpu_completion_backward(do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4, spans, query_offset, scale):
    """Add the completion's gradients (with the merged out / lse) into dq4, dk4, dv4 (fp32 / fp64
    accumulators). The blocks run in q4's dtype on the flash kernel (a native half engine's dtype:
    fp32 blocks took ~35% of the bf16 causal backward), in the accumulators' on the dense fallback."""
    acc = dq4.dtype
    blk = q4.dtype
    if _cpp_blocks_available(blk):
        return _cpp_completion_backward(do4, q4, k4, v4, o4, lse3, dq4, dk4, dv4, spans, query_offset, scale)
    if _flash_blocks_available(blk):
        for b, qa, qe in spans:
            k_lo, k_hi = query_offset + qa + 1, query_offset + qe + 1
            lse = lse3[b:b + 1, :, qa:qe].flip(-1).to(acc).contiguous()
            dq, dk, dv = E._CPU_BWD(_flipped(do4, b, qa, qe, blk), _flipped(q4, b, qa, qe, blk),
                                    _flipped(k4, b, k_lo, k_hi, blk), _flipped(v4, b, k_lo, k_hi, blk),
                                    _flipped(o4, b, qa, qe, blk), lse, 0.0, True, scale=scale)
            dq4[b, qa:qe] += _unflip(dq)
            dk4[b, k_lo:k_hi] += _unflip(dk)
            dv4[b, k_lo:k_hi] += _unflip(dv)
        return
    for b, qa, qe in spans:
        qh, kh, vh, k_lo = _block_views(q4, k4, v4, b, qa, qe, query_offset, acc)
        length = qe - qa
        kv_heads, groups = qh.shape[0], qh.shape[1]
        s, below = _block_scores(qh, kh, scale)
        lse = lse3[b, :, qa:qe].to(acc).reshape(kv_heads, groups, length, 1)
        p = torch.exp(s - lse)  # the masked entries are exp(-inf) = 0
        dob = do4[b, qa:qe].to(acc).reshape(length, kv_heads, groups, -1).permute(1, 2, 0, 3)
        ob = o4[b, qa:qe].to(acc).reshape(length, kv_heads, groups, -1).permute(1, 2, 0, 3)
        delta = (dob * ob).sum(-1, keepdim=True)
        dv = torch.matmul(p.transpose(-1, -2), dob).sum(1)  # [Hkv, L, D]
        ds = p * (torch.matmul(dob, vh.transpose(-1, -2)) - delta)
        dq = torch.matmul(ds, kh) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qh).sum(1) * scale
        dq4[b, qa:qe] += _to_bthd(dq)
        dk4[b, k_lo:k_lo + length] += dk.transpose(0, 1)
        dv4[b, k_lo:k_lo + length] += dv.transpose(0, 1)


# ----------------------------------------------------------------------------- forward / backward
def _as4(t):
    return t.unsqueeze(0) if t.dim() == 3 else t


def _as2(t):
    return t.unsqueeze(0) if t.dim() == 1 else t


def _lse3(lse):
    return lse.unsqueeze(0) if lse.dim() == 2 else lse


def _compute_dtype(q):
    return E.cpu_compute_dtype(q.dtype) if q.device.type == "cpu" else q.dtype


def _finish_padding(out, lse, kv_start, kv_end):
    """Padding rows (no key at all): output exactly 0, lse +inf (their probabilities are then 0)."""
    padding = kv_end <= kv_start  # [B, T] / [N]; out and lse are this module's own buffers
    out.masked_fill_(padding[..., None, None], 0.0)
    lse.masked_fill_(padding.unsqueeze(-2) if padding.dim() == 2 else padding.unsqueeze(0), float("inf"))
    return out, lse


def _kv_groups(q, k):
    """(query-head slice, kv-head slice) per KV head: the CPU path runs one KV head's query heads at a
    time so its fp32 copies and temporaries are 1/Hkv of the full tensors (peak memory)."""
    heads, kv_heads = q.shape[-2], k.shape[-2]
    groups = heads // kv_heads
    return [(slice(g * groups, (g + 1) * groups), slice(g, g + 1)) for g in range(kv_heads)]


def _cpu_forward(q, k, v, kv_start, kv_end, c_kv_start, cu_seqlens, query_offset, scale, engine):
    compute = _compute_dtype(q)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty(_lse_shape(q), dtype=acc)
    lse3_all = _lse3(lse)
    spans = _spans_host(_as2(c_kv_start), _as2(kv_end), query_offset)
    groups = _kv_groups(q, k)
    for hs, ks in groups:
        qg, kg, vg = q[..., hs, :].to(compute), k[..., ks, :].to(compute), v[..., ks, :].to(compute)
        out_c, lse_c = engine.forward(qg, kg, vg, kv_start, kv_end, cu_seqlens, query_offset, scale)
        # The engine's outputs are fresh tensors: the completion merges into them in place (out4 stays
        # in the compute dtype: a half engine's output is not copied to fp32 as a whole).
        out4, lse3 = _as4(out_c), _lse3(lse_c).to(acc)
        if spans:
            _cpu_completion_merge(_as4(qg), _as4(kg), _as4(vg), out4, lse3, spans, query_offset, scale)
        if len(groups) == 1 and out_c.dtype == q.dtype:  # MQA: the engine's buffer is the result
            return out_c, lse3[0] if q.dim() == 3 else lse3
        _as4(out)[:, :, hs] = out4
        lse3_all[:, hs] = lse3
        del qg, kg, vg, out_c, lse_c, out4, lse3  # free this group before the next one runs (peak memory)
    return out, lse


def _cpu_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, cu_seqlens,
                  query_offset, scale, engine):
    compute = _compute_dtype(q)
    acc = torch.float64 if compute == torch.float64 else torch.float32
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    spans = _spans_host(_as2(c_kv_start), _as2(kv_end), query_offset)
    lse3_all = _lse3(lse).to(acc)
    for hs, ks in _kv_groups(q, k):
        qg, og, dog = (t[..., hs, :].to(compute) for t in (q, out, grad_out))
        kg, vg = k[..., ks, :].to(compute), v[..., ks, :].to(compute)
        lse_g = lse3_all[:, hs] if q.dim() == 4 else lse3_all[0, hs]
        dqg, dkg, dvg = engine.backward(dog, qg, kg, vg, og, lse_g, kv_start, kv_end, q_start, q_end, cu_seqlens,
                                        query_offset, scale)
        dq4 = dk4 = dv4 = None
        if spans:
            dq4, dk4, dv4 = (_as4(t).to(acc) for t in (dqg, dkg, dvg))  # fresh engine outputs: add in place
            _cpu_completion_backward(_as4(dog), _as4(qg), _as4(kg), _as4(vg), _as4(og), _lse3(lse_g), dq4, dk4, dv4,
                                     spans, query_offset, scale)
            dqg, dkg, dvg = (dq4, dk4, dv4) if q.dim() == 4 else (dq4[0], dk4[0], dv4[0])
        dq[..., hs, :] = dqg
        dk[..., ks, :] = dkg
        dv[..., ks, :] = dvg
        del qg, og, dog, kg, vg, dqg, dkg, dvg, dq4, dk4, dv4  # free this group before the next one runs (peak memory)
    return dq, dk, dv


def _forward_impl(q, k, v, kv_start, kv_end, c_kv_start, c_q_start, c_q_end, cu_seqlens, query_offset, scale,
                  engine_name):
    engine = E.ENGINES[engine_name]
    dtype = q.dtype
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if q.numel() == 0:
        return q.new_zeros(q.shape), torch.full(_lse_shape(q), float("inf"), dtype=lse_dtype, device=q.device)
    if q.device.type == "cpu":
        out, lse = _cpu_forward(q, k, v, kv_start, kv_end, c_kv_start, cu_seqlens, query_offset, scale, engine)
    else:
        from ._span_attention_triton import span_attention_fwd

        out_c, lse_c = engine.forward(q, k, v, kv_start, kv_end, cu_seqlens, query_offset, scale)
        out_s, lse_s = span_attention_fwd(q, k, v, c_kv_start, kv_end, c_q_start, c_q_end, scale)
        has = c_kv_start < kv_end
        has_lse = has.unsqueeze(-2) if has.dim() == 2 else has.unsqueeze(0)
        lse_s = torch.where(has_lse, lse_s, torch.full((), float("-inf"), device=q.device))
        lse_c = lse_c.float()
        lse = torch.logaddexp(lse_c, lse_s)
        w = lambda l: torch.exp(l - lse).transpose(-1, -2).unsqueeze(-1)  # noqa: E731  [.., T, H, 1]
        out = (out_c.float() * w(lse_c) + out_s.float() * w(lse_s)).to(dtype)
    out, lse = _finish_padding(out, lse, kv_start, kv_end)
    return out, lse.to(lse_dtype)


def _backward_impl(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end,
                   cu_seqlens, query_offset, scale, engine_name):
    engine = E.ENGINES[engine_name]
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.device.type == "cpu":
        return _cpu_backward(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, cu_seqlens,
                             query_offset, scale, engine)
    from ._span_attention_triton import span_attention_bwd

    dq, dk, dv = engine.backward(grad_out, q, k, v, out, lse.float(), kv_start, kv_end, q_start, q_end, cu_seqlens,
                                 query_offset, scale)
    dq_s, dk_s, dv_s = span_attention_bwd(grad_out, None, q, k, v, out, lse, c_kv_start, kv_end, c_q_start,
                                          c_q_end, scale)
    dq, dk, dv = dq.float() + dq_s.float(), dk.float() + dk_s.float(), dv.float() + dv_s.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("llavit::span_attention_composed_fwd", mutates_args=())
def span_attention_composed_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    q_start: torch.Tensor,
    q_end: torch.Tensor,
    c_kv_start: torch.Tensor,
    c_q_start: torch.Tensor,
    c_q_end: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    query_offset: int,
    softmax_scale: float,
    engine: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) under the full layout (``kv_*``, ``q_*``) whose completion is (``c_kv_start``,
    ``kv_end``, ``c_q_start``, ``c_q_end``). lse: fp32 (fp64 for fp64 inputs), ``[B, H, Tq]`` or
    ``[H, N]``, ``+inf`` on rows without keys (output 0 there), as the Triton op's."""
    return _forward_impl(q, k, v, kv_start, kv_end, c_kv_start, c_q_start, c_q_end, cu_seqlens, query_offset,
                         softmax_scale, engine)


@span_attention_composed_fwd.register_fake
def _fwd_fake(q, k, v, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end, cu_seqlens, query_offset,
              softmax_scale, engine):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=lse_dtype)


@torch.library.custom_op("llavit::span_attention_composed_bwd", mutates_args=())
def span_attention_composed_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    q_start: torch.Tensor,
    q_end: torch.Tensor,
    c_kv_start: torch.Tensor,
    c_q_start: torch.Tensor,
    c_q_end: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    query_offset: int,
    softmax_scale: float,
    engine: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the causal engine's and the completion's backward, each given the merged out / lse."""
    return _backward_impl(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start,
                          c_q_end, cu_seqlens, query_offset, softmax_scale, engine)


@span_attention_composed_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end,
              cu_seqlens, query_offset, softmax_scale, engine):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end, cu_seqlens, query_offset,
     softmax_scale, engine) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end,
                          cu_seqlens)
    ctx.meta = (query_offset, softmax_scale, engine)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_start, kv_end, q_start, q_end, c_kv_start, c_q_start, c_q_end, cu_seqlens = ctx.saved_tensors
    query_offset, softmax_scale, engine = ctx.meta
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = span_attention_composed_bwd(grad_out, q, k, v, out, lse, kv_start, kv_end, q_start, q_end,
                                             c_kv_start, c_q_start, c_q_end, cu_seqlens, query_offset,
                                             softmax_scale, engine)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


span_attention_composed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry points
def span_attention_composed_with_lse(q, k, v, layout: SpanLayout, softmax_scale: Optional[float] = None,
                                     causal_engine: Optional[str] = None):
    """(out, lse); inputs validated by ``span_attention``. The lse is not differentiable."""
    reason = covers(q, k, layout, causal_engine)
    if reason is not None:
        raise ValueError(f"backend='composed': {reason}")
    engine = _engine_for(q, k, layout, causal_engine)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    comp = layout.span_completion()
    return span_attention_composed_fwd(q, k, v, layout.kv_start, layout.kv_end, layout.q_start, layout.q_end,
                                       comp.kv_start, comp.q_start, comp.q_end, layout.cu_seqlens,
                                       layout.query_offset, scale, engine)


def span_attention_composed(q, k, v, layout: SpanLayout, softmax_scale: Optional[float] = None,
                            causal_engine: Optional[str] = None) -> torch.Tensor:
    return span_attention_composed_with_lse(q, k, v, layout, softmax_scale, causal_engine)[0]

"""Ground truth written straight from the rule in DESIGN.md section 2, with Python loops.

Deliberately independent of llavit_kernels.layout: spans are found by walking the tokens, the mask
is evaluated pair by pair, and the ops are computed in float64 per token.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def span_labels(is_image: Sequence[bool], segment_starts: Sequence[bool], span_ids=None) -> List[int]:
    """A span label per token (-1 for text); a new span starts at a text->image edge, a segment start
    or a change of span id."""
    labels, current, prev_img = [], -1, False
    for t, img in enumerate(is_image):
        if not img:
            labels.append(-1)
            prev_img = False
            continue
        new = (not prev_img) or segment_starts[t] or (span_ids is not None and span_ids[t] != span_ids[t - 1])
        if new:
            current += 1
        labels.append(current)
        prev_img = True
    return labels


def padded_mask(is_image, attention_mask=None, span_ids=None, past_length: int = 0) -> torch.Tensor:
    """bool [B, Tq, Tk]: allowed(q, k) for a padded batch (queries at key positions past_length + i)."""
    batch, num_q = is_image.shape
    num_k = past_length + num_q
    valid = [[True] * num_k for _ in range(batch)] if attention_mask is None else (attention_mask != 0).tolist()
    out = torch.zeros(batch, num_q, num_k, dtype=torch.bool)
    for b in range(batch):
        img = [bool(is_image[b, i]) and valid[b][past_length + i] for i in range(num_q)]
        ids = None if span_ids is None else span_ids[b].tolist()
        labels = span_labels(img, [False] * num_q, ids)
        for i in range(num_q):
            qpos = past_length + i
            if not valid[b][qpos]:
                continue
            for kpos in range(num_k):
                if not valid[b][kpos]:
                    continue
                j = kpos - past_length
                same_span = j >= 0 and labels[i] >= 0 and labels[i] == labels[j]
                out[b, i, kpos] = kpos <= qpos or same_span
    return out


def packed_mask(is_image, cu_seqlens, span_ids=None) -> torch.Tensor:
    """bool [N, N]: allowed(q, k) for packed documents."""
    n = is_image.shape[0]
    cu = cu_seqlens.tolist()
    doc = [0] * n
    starts = [False] * n
    for d in range(len(cu) - 1):
        for t in range(cu[d], cu[d + 1]):
            doc[t] = d
        if cu[d] < cu[d + 1]:
            starts[cu[d]] = True
    labels = span_labels(is_image.tolist(), starts, None if span_ids is None else span_ids.tolist())
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if doc[q] == doc[k]:
                out[q, k] = k <= q or (labels[q] >= 0 and labels[q] == labels[k])
    return out


def attention_float64(q, k, v, mask, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention in float64 under a dense bool mask [B, Tq, Tk] (or [N, N] packed)."""
    packed = q.dim() == 3
    if packed:
        q, k, v, mask = q[None], k[None], v[None], mask[None]
    q, k, v = q.double(), k.double(), v.double()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    out = torch.zeros_like(q)
    for h in range(q.shape[2]):
        kh, vh = k[:, :, h // groups], v[:, :, h // groups]
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], kh) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key give 0
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", probs, vh)
    return out[0] if packed else out


def modality_linear_float64(x, is_image, w_t, b_t, w_i, b_i) -> torch.Tensor:
    """Per-token weight pick, float64."""
    flat_x = x.reshape(-1, x.shape[-1]).double()
    flat_img = is_image.reshape(-1).tolist()
    rows = []
    for t, img in enumerate(flat_img):
        w, b = (w_i, b_i) if img else (w_t, b_t)
        y = w.double() @ flat_x[t]
        if b is not None:
            y = y + b.double()
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], w_t.shape[0])

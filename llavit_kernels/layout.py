"""SpanLayout: which tokens are image tokens and which keys every query may attend to.

LLaViT's rule (DESIGN.md section 2)::

    allowed(q, k) = same document and (k <= q or q, k in the same image span)

gives every query ONE contiguous interval of keys and every key one contiguous interval of
queries, so the whole mask is four int32 vectors of the token count:

    kv_start[q], kv_end[q]  keys query q may attend to: [kv_start, kv_end)      (key coordinates)
    q_start[k],  q_end[k]   queries that attend to key k: [q_start, q_end)     (query coordinates)

Empty intervals (start == end) mark padding. The builders below run with tensor ops only (cumsum,
cummax/cummin, searchsorted): no host sync, no Python loop over tokens or spans, so they work under
``torch.compile(fullgraph=True)`` and CUDA-graph capture. The one layout object drives both the
modality routing of the projections (``is_image``) and the attention mask, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ._checks import INTEGER_DTYPES, MASK_DTYPES, check_tensor, should_validate_values

__all__ = ["SpanLayout"]


def _span_bounds(img: torch.Tensor, segment_start: torch.Tensor, span_ids: Optional[torch.Tensor]):
    """Start and end (exclusive) of the image span of every token, along the last dim.

    A span is a maximal run of image tokens that does not cross a segment start (document start)
    and, when span ids are given, has one span id. Values are meaningful only where ``img``.
    """
    length = img.shape[-1]
    idx = torch.arange(length, device=img.device, dtype=torch.int64).expand_as(img)
    false_col = torch.zeros_like(img[..., :1])
    prev_img = torch.cat([false_col, img[..., :-1]], dim=-1)
    continues_prev = img & prev_img & ~segment_start
    if span_ids is not None:
        prev_ids = torch.cat([span_ids[..., :1], span_ids[..., :-1]], dim=-1)
        continues_prev = continues_prev & (span_ids == prev_ids)
    starts = img & ~continues_prev
    next_continues = torch.cat([continues_prev[..., 1:], false_col], dim=-1)
    ends = img & ~next_continues
    span_start = torch.cummax(torch.where(starts, idx, torch.full_like(idx, -1)), dim=-1).values
    end_marks = torch.where(ends, idx + 1, torch.full_like(idx, length + 1))
    span_end = torch.cummin(end_marks.flip(-1), dim=-1).values.flip(-1)
    return span_start, span_end


def _check_span_ids(span_ids, is_image, validate):
    check_tensor("span_ids", span_ids, dtypes=INTEGER_DTYPES, device=is_image.device)
    if span_ids.shape != is_image.shape:
        raise ValueError(
            f"span_ids: expected shape {tuple(is_image.shape)} (the shape of is_image), got {tuple(span_ids.shape)}"
        )
    if validate and should_validate_values():
        if bool(((span_ids != -1) & ~is_image).any()):
            raise ValueError("span_ids: expected -1 on every text token (is_image False), got a span id on a text token")
        if bool(((span_ids < 0) & is_image).any()):
            raise ValueError("span_ids: expected a span id >= 0 on every image token, got a negative id on an image token")


@dataclass(frozen=True, eq=False)
class SpanLayout:
    """Modality and attention intervals of a (padded or packed) batch.

    Padded layouts have ``is_image`` of shape ``[B, Tq]`` and key vectors of shape ``[B, Tk]``;
    ``Tk == Tq`` except for a query chunk against a KV cache, whose queries sit at key positions
    ``query_offset .. query_offset + Tq``. Packed layouts have ``[N]`` vectors and ``cu_seqlens``.
    Use the builders, not the constructor.
    """

    is_image: torch.Tensor  # bool, modality of each query token (routes the projections)
    kv_start: torch.Tensor  # int32, per query, key coordinates
    kv_end: torch.Tensor  # int32, per query, key coordinates (exclusive)
    q_start: torch.Tensor  # int32, per key, query coordinates
    q_end: torch.Tensor  # int32, per key, query coordinates (exclusive)
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [B+1], packed layouts only
    query_offset: int = 0  # key position of query 0 (chunks / decode), padded layouts only
    # values derived from the tensors above, built on first use (see ``derived``); not a field of
    # the layout's identity: copies made by builders / views start empty
    _derived: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ properties
    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def device(self) -> torch.device:
        return self.is_image.device

    @property
    def num_queries(self) -> int:
        return self.is_image.shape[-1]

    @property
    def num_keys(self) -> int:
        return self.q_start.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1 if self.packed else self.is_image.shape[0]

    @property
    def token_shape(self) -> tuple:
        """Leading shape of the activations this layout describes: (B, Tq) or (N,)."""
        return tuple(self.is_image.shape)

    def __repr__(self) -> str:
        kind = f"packed N={self.num_queries} docs={self.batch_size}" if self.packed else (
            f"B={self.batch_size} Tq={self.num_queries} Tk={self.num_keys} offset={self.query_offset}"
        )
        return f"SpanLayout({kind}, device={self.device})"

    def derived(self, key, build: Callable[[], object]):
        """``build()`` once per layout and ``key``; later calls return the stored value.

        For per-batch facts that every layer reuses, e.g. the modality projections' routing table
        (``ops/modality_linear.py``): one layout drives all layers of a forward pass, so the value
        is built once per batch instead of once per projection. Keys should include whatever the
        value depends on besides the layout (device, tile size, ...). The layout is immutable:
        if its tensors are changed in place, make a new layout (callers that cannot rule that out
        put ``is_image._version`` in the key).
        """
        store = self._derived
        if store is None:
            store = {}
            object.__setattr__(self, "_derived", store)  # frozen dataclass: a private memo only
        if key not in store:
            store[key] = build()
        return store[key]

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_image_mask(
        cls,
        is_image: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        span_ids: Optional[torch.Tensor] = None,
        past_length: int = 0,
        validate: bool = True,
    ) -> "SpanLayout":
        """Layout of a padded batch from a ``[B, T]`` bool image mask.

        Args:
            is_image: bool ``[B, T]``, True for image tokens.
            attention_mask: Hugging Face convention, 1 keep / 0 pad, left or right padding, shape
                ``[B, past_length + T]`` (it covers cached tokens too, as in ``generate()``).
            span_ids: integer ``[B, T]``, -1 on text tokens, an id per image; separates adjacent
                images that have no token between them.
            past_length: number of cached keys before these queries (chunked prefill / decode).
                The queries attend causally to every cached token; image spans are bidirectional
                only within these ``T`` tokens, so an image must not be split across chunks.
            validate: check values (padding holes, span ids). Those checks need one host sync;
                pass False on a hot path whose inputs are known good. Shape, dtype and device
                checks always run; value checks are skipped anyway under torch.compile / capture.
        """
        check_tensor("is_image", is_image, dtypes=(torch.bool,), ndims=(2,))
        if not isinstance(past_length, int) or past_length < 0:
            raise ValueError(f"past_length: expected an int >= 0, got {past_length!r}")
        batch, num_q = is_image.shape
        num_k = past_length + num_q
        device = is_image.device
        if span_ids is not None:
            _check_span_ids(span_ids, is_image, validate)
        if attention_mask is None:
            valid_k = torch.ones(batch, num_k, dtype=torch.bool, device=device)
        else:
            check_tensor("attention_mask", attention_mask, dtypes=MASK_DTYPES + (torch.float16, torch.bfloat16, torch.float32), ndims=(2,), device=device)
            if tuple(attention_mask.shape) != (batch, num_k):
                raise ValueError(
                    f"attention_mask: expected shape ({batch}, {num_k}) (batch, past_length + T), "
                    f"got {tuple(attention_mask.shape)}"
                )
            valid_k = attention_mask != 0
            if validate and should_validate_values():
                # One run of ones per row: count 0->1 rises (with a virtual 0 in front).
                padded = torch.cat([torch.zeros_like(valid_k[:, :1]), valid_k], dim=1).to(torch.int8)
                rises = (padded[:, 1:] - padded[:, :-1] == 1).sum(dim=1)
                if bool((rises > 1).any()):
                    raise ValueError(
                        "attention_mask: expected left or right padding (one contiguous run of ones per row), "
                        "got a row with a hole (zeros between ones)"
                    )
        leading_pad = (valid_k.cumsum(dim=1) == 0).sum(dim=1)  # first valid key
        trailing_pad = (valid_k.flip(1).cumsum(dim=1) == 0).sum(dim=1)
        valid_start = leading_pad  # [B]
        valid_end = torch.maximum(num_k - trailing_pad, valid_start)  # [B], exclusive

        valid_q = valid_k[:, past_length:]
        img = is_image & valid_q
        no_segment_start = torch.zeros_like(img)
        span_start, span_end = _span_bounds(img, no_segment_start, span_ids)

        idx_q = torch.arange(num_q, device=device).expand(batch, num_q)
        vs = valid_start[:, None]
        kv_end_valid = past_length + torch.where(img, span_end, idx_q + 1)
        kv_start = torch.where(valid_q, vs.expand(batch, num_q), vs)
        kv_end = torch.where(valid_q, kv_end_valid, vs)

        # Per key, in query coordinates: the valid queries are [qv_start, qv_end).
        qv_start = (valid_start - past_length).clamp(0, num_q)[:, None]
        qv_end = (valid_end - past_length).clamp(0, num_q)[:, None]
        chunk_key_first = torch.where(img, span_start, idx_q)  # for keys inside this chunk
        first_query = torch.cat([torch.zeros(batch, past_length, dtype=torch.int64, device=device), chunk_key_first], 1)
        first_query = torch.maximum(first_query, qv_start)
        q_start = torch.where(valid_k, first_query, qv_end)
        q_end = qv_end.expand(batch, num_k)
        return cls(
            is_image=img,
            kv_start=kv_start.to(torch.int32).contiguous(),
            kv_end=kv_end.to(torch.int32).contiguous(),
            q_start=q_start.to(torch.int32).contiguous(),
            q_end=q_end.to(torch.int32).contiguous(),
            query_offset=past_length,
        )

    @classmethod
    def from_input_ids(
        cls,
        input_ids: torch.Tensor,
        image_token_id: int,
        attention_mask: Optional[torch.Tensor] = None,
        span_ids: Optional[torch.Tensor] = None,
        past_length: int = 0,
        validate: bool = True,
    ) -> "SpanLayout":
        """Layout of a padded batch whose image tokens are ``input_ids == image_token_id``."""
        check_tensor("input_ids", input_ids, dtypes=INTEGER_DTYPES, ndims=(2,))
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
            raise TypeError(f"image_token_id: expected an int, got {type(image_token_id).__name__}")
        return cls.from_image_mask(input_ids == image_token_id, attention_mask, span_ids, past_length, validate)

    @classmethod
    def from_packed(
        cls,
        is_image: torch.Tensor,
        cu_seqlens: torch.Tensor,
        span_ids: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> "SpanLayout":
        """Layout of packed documents: ``is_image[N]`` and ``cu_seqlens[B+1]`` (0 first, N last).

        ``validate=False`` skips the checks that read ``cu_seqlens`` / ``span_ids`` values (a host sync).
        """
        check_tensor("is_image", is_image, dtypes=(torch.bool,), ndims=(1,))
        check_tensor("cu_seqlens", cu_seqlens, dtypes=INTEGER_DTYPES, ndims=(1,), device=is_image.device)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens: expected at least 2 entries (B+1 with B >= 1), got {cu_seqlens.shape[0]}")
        num_tokens = is_image.shape[0]
        if span_ids is not None:
            _check_span_ids(span_ids, is_image, validate)
        if validate and should_validate_values():
            if int(cu_seqlens[0]) != 0:
                raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cu_seqlens[0])}")
            if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
                raise ValueError("cu_seqlens: expected non-decreasing offsets, got a decrease")
            if int(cu_seqlens[-1]) != num_tokens:
                raise ValueError(
                    f"cu_seqlens: expected cu_seqlens[-1] == N == {num_tokens} (the length of is_image), "
                    f"got {int(cu_seqlens[-1])}"
                )
        device = is_image.device
        cu = cu_seqlens.to(torch.int64)
        idx = torch.arange(num_tokens, device=device)
        doc = torch.searchsorted(cu[1:], idx, right=True).clamp(max=cu.shape[0] - 2)
        doc_start = cu[doc]
        doc_end = cu[doc + 1]
        segment_start = idx == doc_start
        span_start, span_end = _span_bounds(is_image, segment_start, span_ids)
        kv_end = torch.where(is_image, span_end, idx + 1)
        q_start = torch.where(is_image, span_start, idx)
        return cls(
            is_image=is_image,
            kv_start=doc_start.to(torch.int32),
            kv_end=kv_end.to(torch.int32),
            q_start=q_start.to(torch.int32),
            q_end=doc_end.to(torch.int32),
            cu_seqlens=cu_seqlens.to(torch.int32),
        )

    # ------------------------------------------------------------------ views
    def query_chunk(self, start: int, length: int, validate: bool = True) -> "SpanLayout":
        """The layout of queries ``start .. start+length`` against keys ``0 .. start+length``.

        For prefill continuation: the keys are what the KV cache holds once this chunk is written.
        Raises if the chunk would cut an image span (a query would need keys after the chunk); that
        check reads values (a host sync): ``validate=False`` skips it.
        """
        if self.packed:
            raise ValueError("query_chunk: expected a padded layout, got a packed one")
        if self.query_offset != 0 or self.num_keys != self.num_queries:
            raise ValueError("query_chunk: expected a full (non-chunk) layout, got a chunk layout")
        if not (isinstance(start, int) and isinstance(length, int)) or start < 0 or length < 1 or start + length > self.num_queries:
            raise ValueError(
                f"query_chunk: expected 0 <= start and 1 <= length with start + length <= {self.num_queries}, "
                f"got start={start!r}, length={length!r}"
            )
        stop = start + length
        kv_start = self.kv_start[:, start:stop]
        kv_end = self.kv_end[:, start:stop]
        if validate and should_validate_values() and bool((kv_end > stop).any()):
            raise ValueError(
                f"query_chunk: the chunk [{start}, {stop}) splits an image span (a query needs keys beyond "
                f"position {stop}); chunk boundaries must not fall inside an image"
            )
        q_start = (self.q_start[:, :stop] - start).clamp(0, length)
        q_end = (self.q_end[:, :stop] - start).clamp(0, length)
        q_start = torch.minimum(q_start, q_end)
        return SpanLayout(
            is_image=self.is_image[:, start:stop],
            kv_start=kv_start.contiguous(),
            kv_end=kv_end.contiguous(),
            q_start=q_start.contiguous(),
            q_end=q_end.contiguous(),
            query_offset=start,
        )

    def span_completion(self) -> "SpanLayout":
        """The image-span completion of this layout: what the mask adds to plain causal attention.

        Query ``q`` (key position ``p``) of an image span ``[s, e)`` gets the keys ``(p, e)``: the rest
        of its own image; text and padding queries get none. Per key, the queries that see an image
        key ``k`` here are the earlier tokens of its span, ``[s, k)``; other keys are seen by none.
        Together with :meth:`causal_part` it partitions the mask exactly (the composed backend runs
        the two parts separately and merges them by log-sum-exp). Tensor ops only, no host sync.
        """
        num_q = self.num_queries
        idx_q = torch.arange(num_q, device=self.device, dtype=torch.int32).expand_as(self.kv_end)
        pos_q = idx_q + self.query_offset  # key position of each query
        has_rest = self.is_image & (self.kv_end > pos_q + 1)
        kv_start = torch.where(has_rest, pos_q + 1, self.kv_end)
        # Keys in query coordinates; cached-prefix keys (negative) are never image keys here.
        idx_k = torch.arange(self.num_keys, device=self.device, dtype=torch.int32) - self.query_offset
        idx_k = idx_k.expand_as(self.q_start)
        prefix = torch.zeros(self.q_start.shape[:-1] + (self.query_offset,), dtype=torch.bool, device=self.device)
        key_is_image = torch.cat([prefix, self.is_image], dim=-1)
        q_end = torch.where(key_is_image, idx_k, self.q_start)
        q_start = torch.minimum(self.q_start, q_end)
        return SpanLayout(
            is_image=self.is_image,
            kv_start=kv_start.to(torch.int32).contiguous(),
            kv_end=self.kv_end,
            q_start=q_start.to(torch.int32).contiguous(),
            q_end=q_end.to(torch.int32).contiguous(),
            cu_seqlens=self.cu_seqlens,
            query_offset=self.query_offset,
        )

    def causal_part(self) -> "SpanLayout":
        """The causal part of this layout: every valid query sees ``[kv_start, p]`` (its document's
        causal prefix, ``p`` its key position); padding stays empty. See :meth:`span_completion`."""
        num_q = self.num_queries
        idx_q = torch.arange(num_q, device=self.device, dtype=torch.int32).expand_as(self.kv_end)
        pos_q = idx_q + self.query_offset
        valid_q = self.kv_end > self.kv_start
        kv_end = torch.where(valid_q, pos_q + 1, self.kv_start)
        idx_k = torch.arange(self.num_keys, device=self.device, dtype=torch.int32) - self.query_offset
        idx_k = idx_k.expand_as(self.q_start)
        # Key k is seen by the valid queries from its own position on (never before: no image rows).
        q_start = torch.maximum(self.q_start, idx_k.clamp(min=0))
        q_start = torch.minimum(q_start, self.q_end)
        return SpanLayout(
            is_image=self.is_image,
            kv_start=self.kv_start,
            kv_end=kv_end.to(torch.int32).contiguous(),
            q_start=q_start.to(torch.int32).contiguous(),
            q_end=self.q_end,
            cu_seqlens=self.cu_seqlens,
            query_offset=self.query_offset,
        )

    def to(self, device) -> "SpanLayout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SpanLayout(
            move(self.is_image), move(self.kv_start), move(self.kv_end), move(self.q_start), move(self.q_end),
            move(self.cu_seqlens), self.query_offset,
        )

    # ------------------------------------------------------------------ debugging / references
    def dense_mask(self) -> torch.Tensor:
        """Bool ``[B, Tq, Tk]`` (padded) or ``[N, N]`` (packed); True = may attend. O(T^2): debug only."""
        keys = torch.arange(self.num_keys, device=self.device)
        return (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])

    def dense_mask_from_key_intervals(self) -> torch.Tensor:
        """The same mask built from the per-key intervals; equals ``dense_mask()`` for a sound layout."""
        queries = torch.arange(self.num_queries, device=self.device)
        by_key = (queries[..., None] >= self.q_start[..., None, :]) & (queries[..., None] < self.q_end[..., None, :])
        return by_key

    def render(self, batch_index: int = 0, max_tokens: int = 48) -> str:
        """ASCII picture of the mask: rows are queries, columns keys; '#' attend, '.' masked."""
        mask = self.dense_mask()
        img = self.is_image
        if not self.packed:
            mask, img = mask[batch_index], img[batch_index]
        mask = mask[:max_tokens, :max_tokens].cpu()
        img = img[:max_tokens].cpu()
        offset = self.query_offset
        keys_img = ["?"] * mask.shape[1]
        for q in range(img.shape[0]):
            if q + offset < len(keys_img):
                keys_img[q + offset] = "I" if bool(img[q]) else "t"
        lines = ["     " + "".join(keys_img)]
        for q in range(mask.shape[0]):
            row = "".join("#" if bool(v) else "." for v in mask[q])
            lines.append(f"{'I' if bool(img[q]) else 't'}{q:>3} " + row)
        return "\n".join(lines)

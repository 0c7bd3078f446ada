"""``SpanLayout.from_packed`` pinned value by value: the four interval vectors of hand-worked packed
batches (empty documents first, in the middle and last; images at document edges; a document that
is one image; one-token documents), and the exact bounds its ``cu_seqlens`` checks accept and refuse.

(test_layout.py fuzzes the packed builder against the brute-force rule; these name the cases, so a
mutant of one bound shows which one, and they cost milliseconds.)
"""

import pytest
import torch

from brute_force import packed_mask
from llavit_kernels import SpanLayout

I32 = torch.int32


def _layout(bits, cu, span_ids=None):
    is_image = torch.tensor([c == "I" for c in bits], dtype=torch.bool)
    cu = torch.tensor(cu, dtype=I32)
    span_ids = None if span_ids is None else torch.tensor(span_ids)
    layout = SpanLayout.from_packed(is_image, cu, span_ids)
    assert torch.equal(layout.dense_mask(), packed_mask(is_image, cu, span_ids))
    assert torch.equal(layout.dense_mask_from_key_intervals(), layout.dense_mask())
    return layout


def test_packed_bounds_with_empty_documents_and_edge_images():
    # documents: [] [t I I] [] [I I t t] [I] [t]  -> tokens 0..8
    #   doc 1 = tokens 0..3 ends with an image, doc 3 = tokens 3..7 starts with one: two spans, never merged
    layout = _layout("tIIIIttIt", [0, 0, 3, 3, 7, 8, 9])
    assert layout.packed and layout.batch_size == 6 and layout.num_queries == layout.num_keys == 9
    for f in (layout.kv_start, layout.kv_end, layout.q_start, layout.q_end, layout.cu_seqlens):
        assert f.dtype == I32
    #                 tokens: 0  1  2  3  4  5  6  7  8
    assert layout.kv_start.tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 8]  # document start
    assert layout.kv_end.tolist() == [1, 3, 3, 5, 5, 6, 7, 8, 9]  # span end (image) or q + 1 (text)
    assert layout.q_start.tolist() == [0, 1, 1, 3, 3, 5, 6, 7, 8]  # span start (image) or k (text)
    assert layout.q_end.tolist() == [3, 3, 3, 7, 7, 7, 7, 8, 9]  # document end
    assert layout.cu_seqlens.tolist() == [0, 0, 3, 3, 7, 8, 9]


def test_packed_bounds_trailing_empty_documents_and_one_image_document():
    # [I I I] [] []: every token in document 0, one span covering it
    layout = _layout("III", [0, 3, 3, 3])
    assert layout.kv_start.tolist() == [0, 0, 0] and layout.kv_end.tolist() == [3, 3, 3]
    assert layout.q_start.tolist() == [0, 0, 0] and layout.q_end.tolist() == [3, 3, 3]


def test_packed_bounds_one_token_documents():
    layout = _layout("tIIt", [0, 1, 2, 3, 4])  # four documents of one token: attends only to itself
    assert layout.kv_start.tolist() == [0, 1, 2, 3] and layout.kv_end.tolist() == [1, 2, 3, 4]
    assert layout.q_start.tolist() == [0, 1, 2, 3] and layout.q_end.tolist() == [1, 2, 3, 4]


def test_packed_bounds_span_ids_split_adjacent_images():
    layout = _layout("tIIIIt", [0, 6], span_ids=[-1, 0, 0, 1, 1, -1])
    assert layout.kv_end.tolist() == [1, 3, 3, 5, 5, 6]
    assert layout.q_start.tolist() == [0, 1, 1, 3, 3, 5]


def test_packed_empty_batch():
    layout = SpanLayout.from_packed(torch.zeros(0, dtype=torch.bool), torch.tensor([0, 0], dtype=I32))
    assert layout.num_queries == 0 and layout.batch_size == 1 and layout.kv_start.numel() == 0


@pytest.mark.parametrize("cu,n,message", [
    ([0], 0, r"cu_seqlens: expected at least 2 entries \(B\+1 with B >= 1\), got 1"),
    ([1, 4], 4, r"cu_seqlens: expected cu_seqlens\[0\] == 0, got 1"),
    ([-1, 4], 4, r"cu_seqlens: expected cu_seqlens\[0\] == 0, got -1"),
    ([0, 3, 2, 4], 4, "cu_seqlens: expected non-decreasing offsets, got a decrease"),
    ([0, 3], 4, r"cu_seqlens: expected cu_seqlens\[-1\] == N == 4 \(the length of is_image\), got 3"),
    ([0, 5], 4, r"cu_seqlens: expected cu_seqlens\[-1\] == N == 4 \(the length of is_image\), got 5"),
])
def test_packed_cu_seqlens_bounds_refused(cu, n, message):
    with pytest.raises(ValueError, match=message):
        SpanLayout.from_packed(torch.zeros(n, dtype=torch.bool), torch.tensor(cu, dtype=I32))


@pytest.mark.parametrize("cu", [[0, 4], [0, 0, 4], [0, 4, 4], [0, 2, 2, 4]])
def test_packed_cu_seqlens_bounds_accepted(cu):
    """The edges of what is allowed: equal neighbours (empty documents), 0 first, N last."""
    layout = SpanLayout.from_packed(torch.zeros(4, dtype=torch.bool), torch.tensor(cu, dtype=I32))
    assert layout.batch_size == len(cu) - 1
    docs = [(cu[d], cu[d + 1]) for d in range(len(cu) - 1) if cu[d] < cu[d + 1]]
    want_start = [s for s, e in docs for _ in range(s, e)]
    want_end = [e for s, e in docs for _ in range(s, e)]
    assert layout.kv_start.tolist() == want_start and layout.q_end.tolist() == want_end


def test_packed_int64_cu_seqlens_give_int32_fields():
    layout = SpanLayout.from_packed(torch.tensor([False, True, True]), torch.tensor([0, 1, 3]))
    assert layout.cu_seqlens.dtype == I32 and layout.kv_end.tolist() == [1, 3, 3]

"""SpanLayout against a brute-force evaluation of the rule (DESIGN.md section 2), fuzzed."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from brute_force import packed_mask, padded_mask
from llavit_kernels import SpanLayout

# ----------------------------------------------------------------------------- strategies


@st.composite
def image_row(draw, length):
    """A row of runs of text / image tokens, with span ids that may split an image run in two."""
    is_image, span_ids, next_id = [], [], 0
    while len(is_image) < length:
        run = draw(st.integers(1, 70))  # runs up to 70 cross the 64- and 128-token boundaries
        img = draw(st.booleans())
        run = min(run, length - len(is_image))
        if img:
            split = draw(st.integers(0, run - 1))  # 0: one image; >0: two adjacent images
            for i in range(run):
                span_ids.append(next_id + (1 if split and i >= split else 0))
            next_id += 2
        else:
            span_ids.extend([-1] * run)
        is_image.extend([img] * run)
    return is_image, span_ids


@st.composite
def padded_batches(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 140))
    rows = [draw(image_row(length)) for _ in range(batch)]
    is_image = torch.tensor([r[0] for r in rows], dtype=torch.bool)
    span_ids = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    side = draw(st.sampled_from(["none", "left", "right"]))
    attention_mask = None
    if side != "none":
        attention_mask = torch.ones(batch, length, dtype=torch.int64)
        for b in range(batch):
            pad = draw(st.integers(0, length))
            if pad:
                if side == "left":
                    attention_mask[b, :pad] = 0
                else:
                    attention_mask[b, length - pad:] = 0
    use_span_ids = draw(st.booleans())
    return is_image, attention_mask, span_ids if use_span_ids else None


@st.composite
def packed_batches(draw):
    docs = draw(st.integers(1, 4))
    lengths = [draw(st.integers(0, 60)) for _ in range(docs)]
    is_image = []
    for n in lengths:
        # images at document edges are common in practice: bias the first / last token
        row, _ = draw(image_row(n)) if n else ([], [])
        is_image.extend(row)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(is_image, dtype=torch.bool).reshape(-1), torch.tensor(cu, dtype=torch.int32)


def assert_sound(layout: SpanLayout, expected: torch.Tensor):
    assert layout.kv_start.dtype == torch.int32 and layout.q_end.dtype == torch.int32
    assert torch.equal(layout.dense_mask(), expected), "per-query intervals disagree with the rule"
    assert torch.equal(layout.dense_mask_from_key_intervals(), expected), "per-key intervals disagree with the rule"
    assert bool((layout.kv_start <= layout.kv_end).all()) and bool((layout.q_start <= layout.q_end).all())


# ----------------------------------------------------------------------------- fuzzed


@given(padded_batches())
def test_padded_layout_matches_rule(batch):
    is_image, attention_mask, span_ids = batch
    if span_ids is not None and attention_mask is not None:
        span_ids = torch.where(is_image, span_ids, -1)
    layout = SpanLayout.from_image_mask(is_image, attention_mask, span_ids)
    assert_sound(layout, padded_mask(is_image, attention_mask, span_ids))
    valid = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
    assert torch.equal(layout.is_image, is_image & valid)


@given(packed_batches(), st.booleans())
def test_packed_layout_matches_rule(batch, with_span_ids):
    is_image, cu_seqlens = batch
    span_ids = None
    if with_span_ids and is_image.numel():
        # every image token its own image: the strictest split
        span_ids = torch.where(is_image, torch.arange(is_image.numel()), -1)
    layout = SpanLayout.from_packed(is_image, cu_seqlens, span_ids)
    assert layout.packed and layout.batch_size == cu_seqlens.numel() - 1
    assert_sound(layout, packed_mask(is_image, cu_seqlens, span_ids))


@given(padded_batches(), st.data())
def test_query_chunk_matches_rows_of_full_mask(batch, data):
    is_image, attention_mask, _ = batch
    full = SpanLayout.from_image_mask(is_image, attention_mask)
    length = is_image.shape[1]
    start = data.draw(st.integers(0, length - 1))
    stop = data.draw(st.integers(start + 1, length))
    if bool((full.kv_end[:, start:stop] > stop).any()):
        with pytest.raises(ValueError, match="splits an image span"):
            full.query_chunk(start, stop - start)
        return
    chunk = full.query_chunk(start, stop - start)
    expected = full.dense_mask()[:, start:stop, :stop]
    assert chunk.query_offset == start and chunk.num_keys == stop
    assert_sound(chunk, expected)
    # The same chunk built from its own tokens plus a past length (what generation does).
    mask_k = None if attention_mask is None else attention_mask[:, :stop]
    rebuilt = SpanLayout.from_image_mask(is_image[:, start:stop], mask_k, past_length=start)
    assert_sound(rebuilt, expected)


# ----------------------------------------------------------------------------- named cases


def test_example_mask_picture():
    is_image = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    layout = SpanLayout.from_image_mask(is_image)
    assert layout.kv_end.tolist() == [[1, 4, 4, 4, 5, 6, 8, 8, 9]]
    assert layout.q_start.tolist() == [[0, 1, 1, 1, 4, 5, 6, 6, 8]]
    picture = layout.render()
    assert picture.splitlines()[2].endswith("####.....")  # image token 1 sees its whole image


@pytest.mark.parametrize("length", [1, 63, 64, 65, 128, 129])
def test_no_images_is_causal(length):
    layout = SpanLayout.from_image_mask(torch.zeros(2, length, dtype=torch.bool))
    causal = torch.ones(length, length, dtype=torch.bool).tril().expand(2, -1, -1)
    assert torch.equal(layout.dense_mask(), causal)


@pytest.mark.parametrize("length", [1, 7, 130])
def test_all_image_is_bidirectional(length):
    layout = SpanLayout.from_image_mask(torch.ones(1, length, dtype=torch.bool))
    assert bool(layout.dense_mask().all())


def test_adjacent_images_need_span_ids():
    is_image = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    merged = SpanLayout.from_image_mask(is_image)
    split = SpanLayout.from_image_mask(is_image, span_ids=torch.tensor([[-1, 0, 0, 1, 1, -1]]))
    assert merged.kv_end.tolist() == [[1, 5, 5, 5, 5, 6]]
    assert split.kv_end.tolist() == [[1, 3, 3, 5, 5, 6]]
    assert not bool(split.dense_mask()[0, 1, 3])  # first image cannot see the second
    assert bool(split.dense_mask()[0, 3, 1])  # the second sees the first causally


def test_packed_image_at_document_edges_does_not_merge():
    # doc 0 ends with an image, doc 1 starts with one: two spans, no attention across documents
    is_image = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)
    layout = SpanLayout.from_packed(is_image, torch.tensor([0, 3, 6], dtype=torch.int32))
    assert layout.kv_start.tolist() == [0, 0, 0, 3, 3, 3]
    assert layout.kv_end.tolist() == [1, 3, 3, 5, 5, 6]


def test_left_padding_rows_are_empty():
    is_image = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool)
    layout = SpanLayout.from_image_mask(is_image, torch.tensor([[0, 0, 1, 1, 1]]))
    assert layout.kv_start.tolist() == [[2, 2, 2, 2, 2]]
    assert layout.kv_end.tolist() == [[2, 2, 4, 4, 5]]
    assert not bool(layout.dense_mask()[0, :2].any())


def test_decode_step_layout():
    """One new text token against 6 cached tokens, left padded by one."""
    layout = SpanLayout.from_image_mask(torch.zeros(1, 1, dtype=torch.bool), torch.tensor([[0, 1, 1, 1, 1, 1, 1]]),
                                        past_length=6)
    assert layout.num_queries == 1 and layout.num_keys == 7 and layout.query_offset == 6
    assert layout.kv_start.tolist() == [[1]] and layout.kv_end.tolist() == [[7]]
    assert layout.q_start.tolist() == [[1, 0, 0, 0, 0, 0, 0]] and layout.q_end.tolist() == [[1] * 7]


def test_from_input_ids():
    ids = torch.tensor([[5, 9, 9, 6, 9]])
    layout = SpanLayout.from_input_ids(ids, image_token_id=9)
    assert layout.is_image.tolist() == [[False, True, True, False, True]]


def test_builders_trace_without_host_sync():
    """fullgraph=True fails on any graph break, so a host sync in a builder would fail here."""
    is_image = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool).repeat(2, 1)
    attention_mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])

    def build(img, am):
        layout = SpanLayout.from_image_mask(img, am)
        return layout.kv_start, layout.kv_end, layout.q_start, layout.q_end

    def build_packed(img, cu):
        layout = SpanLayout.from_packed(img, cu)
        return layout.kv_start, layout.kv_end, layout.q_start, layout.q_end

    torch._dynamo.reset()
    compiled = torch.compile(build, fullgraph=True, backend="eager")
    for got, want in zip(compiled(is_image, attention_mask), build(is_image, attention_mask)):
        assert torch.equal(got, want)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    compiled_packed = torch.compile(build_packed, fullgraph=True, backend="eager")
    for got, want in zip(compiled_packed(is_image.reshape(-1), cu), build_packed(is_image.reshape(-1), cu)):
        assert torch.equal(got, want)

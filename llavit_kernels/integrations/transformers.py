"""Convert Hugging Face models to LLaViT in place (supported families: see ``families/``).

Three lines::

    from llavit_kernels.integrations import apply_llavit
    model = LlavaForConditionalGeneration.from_pretrained(path)
    apply_llavit(model)            # image token id from model.config.image_token_id

What changes:

* every stock attention module of the language model (``Qwen2Attention``, ``LlamaAttention``, ...) is replaced by a
  :class:`HFLlavitAttention` (a :class:`~llavit_kernels.nn.LlavitAttention` with transformers'
  attention-call signature). Text q/k/v/o keep their names (``...self_attn.q_proj.weight``), the
  image q/k/v are new keys (``...self_attn.q_proj_image.weight``), initialised as copies of the text
  ones (the paper's initialisation).
* the model's ``forward`` is wrapped (on the instance, the class is untouched): each call builds ONE
  :class:`LlavitLayoutSource` from ``input_ids == image_token_id`` and the 2-D ``attention_mask``,
  on the device (no host sync in the layers; validating a padding mask costs one per call), and
  passes it to every layer as the ``llavit_layout`` keyword
  (transformers forwards extra keywords to the attention modules, also under gradient
  checkpointing). The layout is built lazily in the first layer, when the number of cached keys is
  known, and shared by the other layers. LLaVA replaces the image tokens' embeddings but
  ``input_ids`` still hold the image token id, so routing and mask see the image tokens.
* ``model.config.llavit`` records the settings, so ``save_pretrained`` writes them to config.json.

Save / load: ``save_pretrained`` of a converted model writes the image weights as extra keys.
``from_pretrained`` of the stock class does not know them (it reports them as unexpected and drops
them); calling ``apply_llavit(model)`` on the loaded model then restores them from the checkpoint
directory (``weights="auto"``: it reads ``*_proj_image.*`` tensors from
``model.config._name_or_path`` when ``config.llavit`` is present). Pass ``weights=path_or_state_dict``
to load from elsewhere, or ``weights=None`` to initialise them as copies of the text weights.

Generation: ``generate()`` works unchanged with transformers' DynamicCache. The prefill step runs
span attention over the whole prompt (images bidirectional); decode steps attend to the cached
keys causally (the layout of a step is built with ``past_length`` = cached keys, read from the key
shape after the cache update: no sync). A prefill split into chunks (several forward calls on one
cache) must not cut an image: the converted forward remembers on the cache whether the last token
of a call was an image token and raises when the next multi-token chunk starts with an image
token. Static caches (fixed-size key buffers) are not supported: the keys must be exactly the
cached plus the new tokens.

Mask-only mode: ``attn_implementation="llavit"`` (registered in transformers' ``AttentionInterface``
and ``AttentionMaskInterface`` on import) keeps the stock attention modules and weights and swaps
only the attention function for span attention; :func:`apply_llavit_mask` wraps the forward so the
layout reaches it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import types
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .._checks import should_validate_values
from ..layout import SpanLayout
from ..nn.attention import LlavitAttention
from ..ops import span_attention

__all__ = [
    "apply_llavit",
    "apply_llavit_mask",
    "load_llavit_weights",
    "llavit_state_dict",
    "register_llavit_attention",
    "llavit_attention_forward",
    "HFLlavitAttention",
    "LlavitLayoutSource",
    "from_pretrained",
    "llavit_peft_modules",
    "LAYOUT_KWARG",
]

LAYOUT_KWARG = "llavit_layout"
IMAGE_KEY_MARKERS = ("q_proj_image.", "k_proj_image.", "v_proj_image.", "qkv_proj_image.")


# ---------------------------------------------------------------------------- the layout of one call
class LlavitLayoutSource:
    """What one model call knows about its tokens; builds the SpanLayout once the key count is known.

    Args:
        is_image: bool ``[B, T]`` of the new tokens (``input_ids == image_token_id``).
        attention_mask: 2-D ``[B, past + T]`` (1 keep / 0 pad) or None.
        span_ids: optional ``[B, T]`` ids separating adjacent images (see SpanLayout).
        cu_seqlens: optional int ``[docs + 1]`` offsets of packed documents in the flattened
            ``B * T`` tokens (padding-free training: several documents per row, no padding).

    ``layout(num_queries, num_keys)`` is memoised, so all layers of a call share one layout.
    """

    def __init__(self, is_image: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 span_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None):
        if not isinstance(is_image, torch.Tensor) or is_image.dtype != torch.bool or is_image.dim() != 2:
            got = f"shape {tuple(is_image.shape)} dtype {is_image.dtype}" if isinstance(is_image, torch.Tensor) else type(is_image).__name__
            raise ValueError(f"image_mask: expected a bool [batch, seq_len] tensor, got {got}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                got = f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(
                    f"attention_mask: a LLaViT-converted model needs a 2-D [batch, past + seq_len] padding mask "
                    f"(1 keep, 0 pad) or None, got {got}; custom 4-D masks cannot be combined with the image layout"
                )
            if attention_mask.shape[0] != is_image.shape[0] or attention_mask.shape[1] < is_image.shape[1]:
                raise ValueError(
                    f"attention_mask: expected shape [{is_image.shape[0]}, past + {is_image.shape[1]}] for input of shape "
                    f"{tuple(is_image.shape)}, got {tuple(attention_mask.shape)}"
                )
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("cu_seqlens: packed documents take no attention_mask (padding-free); got both")
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens: expected a 1-D int tensor of document offsets, got {cu_seqlens!r}")
        self.is_image = is_image
        self.attention_mask = attention_mask
        self.span_ids = span_ids
        self.cu_seqlens = cu_seqlens
        self._layouts: Dict[tuple, SpanLayout] = {}

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def packed_layout(self) -> SpanLayout:
        """The layout of the flattened ``B * T`` tokens as packed documents."""
        cached = self._layouts.get("packed")
        if cached is None:
            span_ids = None if self.span_ids is None else self.span_ids.reshape(-1)
            cached = SpanLayout.from_packed(self.is_image.reshape(-1), self.cu_seqlens.to(self.is_image.device), span_ids)
            self._layouts["packed"] = cached
        return cached

    @property
    def num_queries(self) -> int:
        return self.is_image.shape[1]

    def check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        if tuple(hidden_states.shape[:2]) != tuple(self.is_image.shape):
            raise ValueError(
                f"llavit layout: it covers {tuple(self.is_image.shape)} (batch, tokens) but the hidden states have "
                f"shape {tuple(hidden_states.shape)}; input_ids / image_mask must describe the same tokens as the "
                "hidden states"
            )

    def layout(self, num_queries: int, num_keys: int) -> SpanLayout:
        key = (num_queries, num_keys)
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        if num_queries != self.num_queries:
            raise ValueError(f"llavit layout: it covers {self.num_queries} tokens, the attention got {num_queries} queries")
        past = num_keys - num_queries
        if past < 0:
            raise ValueError(f"llavit layout: got {num_keys} keys for {num_queries} queries (fewer keys than queries)")
        mask = self.attention_mask
        if mask is not None and mask.shape[1] != num_keys:
            raise ValueError(
                f"attention_mask: expected {num_keys} columns (the {past} cached + {num_queries} new tokens the "
                f"attention sees), got {mask.shape[1]}; fixed-size (static) KV caches are not supported"
            )
        built = SpanLayout.from_image_mask(self.is_image, mask, self.span_ids, past_length=past)
        self._layouts[key] = built
        return built


class _ForwardState:
    """The layout source of the call in flight (fallback when keywords do not reach the attention)."""

    def __init__(self):
        self.current: Optional[LlavitLayoutSource] = None


def _find_source(kwargs, state: Optional[_ForwardState]) -> LlavitLayoutSource:
    source = kwargs.pop(LAYOUT_KWARG, None)
    if source is None and state is not None:
        source = state.current
    if source is None:
        raise RuntimeError(
            "llavit: no layout for this call. Call the top-level model converted by apply_llavit / apply_llavit_mask "
            "(its forward builds the layout from input_ids), or pass llavit_layout=LlavitLayoutSource(...)"
        )
    if not isinstance(source, LlavitLayoutSource):
        raise TypeError(f"llavit_layout: expected a LlavitLayoutSource, got {type(source).__name__}")
    return source


def _merge_mrope(table: torch.Tensor, section) -> torch.Tensor:
    """One ``[B, T, D]`` table from the temporal / height / width tables ``[3, B, T, D]``: chunk i of
    the head dim (sizes ``mrope_section`` twice, rotate-half) comes from table ``i % 3``, as
    transformers' ``apply_multimodal_rotary_pos_emb`` does."""
    if section is None:
        raise ValueError("position_embeddings: got [3, B, T, D] multimodal RoPE tables but no mrope_section")
    chunks = table.split(list(section) * 2, dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


# ---------------------------------------------------------------------------- converted attention
class HFLlavitAttention(LlavitAttention):
    """LlavitAttention inside a converted transformers model.

    Its ``forward`` has transformers' attention signature (``hidden_states, position_embeddings,
    attention_mask, cache / past_key_values / past_key_value, **kwargs``; the name of the cache
    argument changed between versions, all are accepted) and returns ``(output, None)``. The 4-D
    ``attention_mask`` transformers builds is ignored: the mask comes from the layout.
    """

    _llavit_state: Optional[_ForwardState] = None
    mrope_section: Optional[list] = None  # set by the Qwen2-VL adapter
    returns_cache: bool = False  # set by adapters whose stock attention returns (output, weights, cache)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, past_key_value=None, **kwargs):
        source = _find_source(kwargs, self._llavit_state)
        source.check_hidden_states(hidden_states)
        kv_cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
        query_is_image = source.is_image
        if source.attention_mask is not None:  # padding tokens are never image tokens
            query_is_image = query_is_image & (source.attention_mask[:, -source.num_queries:] != 0)
        lead = tuple(hidden_states.shape[:-1])
        if position_embeddings is None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise ValueError("HFLlavitAttention: expected position_embeddings (cos, sin) or position_ids from the model")
            position_embeddings = self.rotary(position_ids, hidden_states.dtype)
        cos, sin = position_embeddings
        if cos.dim() == 4:  # multimodal RoPE tables [3, B, T, D] (Qwen2-VL in transformers 4.x)
            cos, sin = _merge_mrope(cos, self.mrope_section), _merge_mrope(sin, self.mrope_section)
        if cos.dim() == 3 and cos.shape[0] == 1 and tuple(cos.shape[:-1]) != lead:
            cos, sin = cos[0], sin[0]
        if source.packed:
            return self._outputs(self._forward_packed(hidden_states, source, cos, sin, kv_cache), kv_cache)
        q, k, v = self.project_qkv(hidden_states, query_is_image, cos, sin)
        if kv_cache is not None:
            # transformers' caches hold [B, Hkv, T, D]; the ops use [B, T, Hkv, D]
            k, v = kv_cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        layout = source.layout(q.shape[1], k.shape[1])
        out = self.attend(q, k, v, layout)
        return self._outputs(self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim)), kv_cache)

    def _outputs(self, out, kv_cache):
        # (output, attention weights) -- or, where the stock decoder layer unpacks three values
        # (Qwen2-VL in transformers 4.x), (output, weights, cache)
        return (out, None, kv_cache) if self.returns_cache else (out, None)

    def _forward_packed(self, hidden_states, source, cos, sin, kv_cache):
        """Padding-free batches: every row holds several documents; attend within documents."""
        batch, tokens, hidden = hidden_states.shape
        layout = source.packed_layout()
        if cos.dim() == 3:
            cos, sin = (t.expand(batch, tokens, t.shape[-1]).reshape(batch * tokens, t.shape[-1]) for t in (cos, sin))
        elif batch != 1:
            cos, sin = (t.repeat(batch, 1) for t in (cos, sin))
        q, k, v = self.project_qkv(hidden_states.reshape(batch * tokens, hidden), layout.is_image, cos, sin)
        if kv_cache is not None:  # keep transformers' cache consistent; a packed call must be the first
            shape = (batch, tokens, self.num_kv_heads, self.head_dim)
            k_all, _ = kv_cache.update(k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), self.layer_idx)
            if k_all.shape[2] != tokens:
                raise NotImplementedError("llavit: packed documents (cu_seqlens) cannot continue a KV cache")
        out = self.attend(q, k, v, layout)
        return self.o_proj(out.reshape(batch, tokens, self.num_heads * self.head_dim))


# ---------------------------------------------------------------------------- mask-only attention function
def llavit_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function ``"llavit"``: span attention with the stock weights.

    ``query [B, H, Tq, D]``, ``key/value [B, Hkv, Tk, D]`` (after the cache update); returns
    ``([B, Tq, H, D], None)`` like transformers' sdpa function. Needs the layout keyword set by a
    forward wrapped by :func:`apply_llavit_mask`; the dense ``attention_mask`` is ignored.
    """
    source = _find_source(kwargs, getattr(module, "_llavit_state", None))
    if dropout and module.training:
        raise NotImplementedError("llavit attention: attention dropout is not supported; set attention_dropout=0")
    if torch.is_autocast_enabled(query.device.type):
        # Under autocast the stock modules hand over mixed dtypes (q/k promoted to float32 by the
        # float32 RoPE tables, v in the autocast dtype); cast them as autocast casts SDPA's inputs.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if source.packed:
        batch, heads, tokens, dim = query.shape
        if key.shape[2] != tokens:
            raise NotImplementedError("llavit: packed documents (cu_seqlens) cannot continue a KV cache")
        flat = lambda t: t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim)  # noqa: E731
        out = span_attention(flat(query), flat(key), flat(value), source.packed_layout(), softmax_scale=scaling)
        return out.view(batch, tokens, heads, dim), None
    layout = source.layout(query.shape[2], key.shape[2])
    out = span_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout,
                         softmax_scale=scaling)
    return out, None


def _llavit_mask(*args, **kwargs):
    """Mask interface for ``"llavit"``: no dense mask is built, the layout carries the mask."""
    return None


def register_llavit_attention() -> None:
    """Register ``"llavit"`` in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("llavit", llavit_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: no mask interface, the dense mask is built and ignored
        return
    AttentionMaskInterface.register("llavit", _llavit_mask)


# ---------------------------------------------------------------------------- model discovery
def _families():
    from . import families

    return families


def _model_kind(model: nn.Module) -> str:
    """"multimodal" or "text"; anything else is refused with the list of supported families."""
    import transformers

    fam = _families()
    groups = (("multimodal", fam.MULTIMODAL_FAMILIES), ("text", fam.TEXT_FAMILIES))
    for kind, families in groups:
        for family in families:
            for name in family.model_classes:
                cls = getattr(transformers, name, None)
                if cls is not None and isinstance(model, cls):
                    return kind
    raise TypeError(
        f"model: got {type(model).__name__}, which apply_llavit does not support. Supported text models: "
        f"{fam.supported_text()} (and their base models); multimodal: {fam.supported_multimodal()} with a "
        "supported text model"
    )


def _check_text_family(model):
    """The family of the text model (its config.model_type), refused with the supported list if none."""
    fam = _families()
    config = _text_config(model)
    family = fam.text_family_of_config(config)
    if family is None:
        raise TypeError(
            f"model: the text model of {type(model).__name__} has model_type={getattr(config, 'model_type', None)!r}, "
            f"which apply_llavit does not support; supported text models: {fam.supported_text()}"
        )
    return family


def _unwrap_peft(model: nn.Module):
    """``(transformers model, PeftModel or None)``: a PEFT model is converted through its base model."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model(), model
    return model, None


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _resolve_image_token_id(model, kind: str, image_token_id: Optional[int]) -> int:
    if image_token_id is None:
        llavit_cfg = getattr(model.config, "llavit", None)
        if isinstance(llavit_cfg, dict) and llavit_cfg.get("image_token_id") is not None:
            image_token_id = llavit_cfg["image_token_id"]
        elif kind == "multimodal":
            image_token_id = getattr(model.config, "image_token_id", None)
            if image_token_id is None:
                image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(
            f"image_token_id: {type(model).__name__} has no image token in its config; pass image_token_id=<id of the "
            "image placeholder token>"
        )
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise TypeError(f"image_token_id: expected an int, got {type(image_token_id).__name__}")
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= image_token_id < vocab:
        raise ValueError(
            f"image_token_id: expected an id in the vocabulary [0, {vocab}), got {image_token_id}; image tokens "
            "must be real token ids that input_ids can carry"
        )
    return image_token_id


def _attention_modules(model, family=None):
    """``(name, module, family)`` of every stock attention module of a supported text family."""
    families = (family,) if family is not None else _families().TEXT_FAMILIES
    found = []
    for name, module in model.named_modules():
        for fam in families:
            if isinstance(module, fam.attention_classes()):
                found.append((name, module, fam))
                break
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@functools.lru_cache(maxsize=None)
def _forward_signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def _llavit_forward(model, *args, **kwargs):
    """The converted model's forward: build the layout source of this call, then run the stock forward."""
    image_mask = kwargs.pop("image_mask", None)
    span_ids = kwargs.pop("span_ids", None)
    original = model.__dict__.get("_llavit_original_forward")
    call = original if original is not None else functools.partial(type(model).forward, model)
    if kwargs.get(LAYOUT_KWARG) is None:
        bound = dict(_forward_signature(type(model).forward).bind_partial(model, *args, **kwargs).arguments)
        extra = bound.pop("kwargs", None)  # names a version takes only through **kwargs (renamed arguments)
        if isinstance(extra, dict):
            for key, value in extra.items():
                bound.setdefault(key, value)
        input_ids = bound.get("input_ids")
        attention_mask = bound.get("attention_mask")
        if image_mask is None:
            if input_ids is None:
                raise ValueError(
                    "llavit: called with inputs_embeds and no input_ids; pass image_mask=<bool [batch, seq_len], "
                    "True on image tokens> so the model knows which tokens are image tokens"
                )
            image_mask = input_ids == model._llavit_image_token_id
            for extra in model.__dict__.get("_llavit_extra_token_ids", ()):  # video tokens: visual too
                image_mask = image_mask | (input_ids == extra)
        cache = next((bound[k] for k in ("cache", "past_key_values", "past_key_value") if bound.get(k) is not None), None)
        cu_seqlens = bound.get("cu_seq_lens_q")
        if cu_seqlens is None and attention_mask is None:
            cu_seqlens = _packed_offsets(bound.get("position_ids"), image_mask, cache)
        kwargs[LAYOUT_KWARG] = LlavitLayoutSource(image_mask, attention_mask, span_ids, cu_seqlens)
        _check_chunk_boundary(cache, image_mask)
    state = model._llavit_state
    previous, state.current = state.current, kwargs[LAYOUT_KWARG]
    try:
        return call(*args, **kwargs)
    finally:
        state.current = previous


def _packed_offsets(position_ids, image_mask, cache) -> Optional[torch.Tensor]:
    """Document offsets of a padding-free batch, detected from position ids that restart.

    transformers does the same (``find_packed_sequence_indices``) when ``attention_mask`` is None
    and no cache object exists; here, whenever no tokens are cached yet (so an empty cache that
    ``use_cache=True`` creates does not silently merge the documents). Finding the offsets reads values (two host
    syncs, once per call); under torch.compile pass ``cu_seq_lens_q`` instead.
    """
    if position_ids is None or position_ids.dim() > 2 or image_mask.shape[1] < 2 or not should_validate_values():
        return None
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        return None
    batch, tokens = image_mask.shape
    positions = position_ids.to(image_mask.device).expand(batch, tokens)
    starts = torch.diff(positions, dim=-1) != 1
    if not bool(starts.any()):
        return None
    starts = torch.cat([torch.ones_like(starts[:, :1]), starts], dim=1).reshape(-1)
    offsets = starts.nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_tensor([batch * tokens])]).to(torch.int32)


def _check_chunk_boundary(cache, image_mask: torch.Tensor) -> None:
    """Raise when a multi-token chunk continues an image that the previous chunk ended inside.

    The image modality of the last token of every call is remembered on the cache object. Such a
    split would make the image causal across the chunk boundary (its first part cannot see the
    second), silently changing the model; chunk boundaries must fall between images. Single-token
    (decode) steps are not checked. The check reads values (one host sync per call, not per layer)
    and is skipped under torch.compile / CUDA-graph capture, like the layout's own value checks.
    """
    if cache is None or image_mask.shape[1] == 0:
        return
    previous_last = getattr(cache, "_llavit_last_is_image", None)
    if (
        previous_last is not None
        and image_mask.shape[1] > 1
        and previous_last.shape[0] == image_mask.shape[0]
        and should_validate_values()
        and bool((previous_last & image_mask[:, 0]).any())
    ):
        raise ValueError(
            "llavit: this prefill chunk starts inside an image that the previous chunk ended in; images are "
            "bidirectional only within one forward call, so chunk boundaries must fall between images "
            "(move the boundary before the image's first token)"
        )
    try:
        cache._llavit_last_is_image = image_mask[:, -1]
    except AttributeError:  # a cache type that refuses new attributes: no check possible
        pass


def _video_token_ids(model, kind: str):
    """Video placeholder ids of a multimodal model (Qwen2-VL, LLaVA-OneVision, ...): video frames are
    visual tokens too (each contiguous run of them is one bidirectional span)."""
    if kind != "multimodal":
        return ()
    vocab = model.get_input_embeddings().num_embeddings
    ids = []
    for attr in ("video_token_id", "video_token_index"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab and value not in ids:
            ids.append(value)
    return tuple(ids)


def _wrap_forward(model, image_token_id: int, state: _ForwardState, extra_token_ids=()) -> None:
    """Bind a layout-building forward to the instance (the class is untouched).

    A bound method (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy. Its
    ``__wrapped__`` is the class forward, so ``inspect.signature(model.forward)`` (which
    ``generate()`` uses to validate keywords) still shows the stock arguments.
    """
    if "_llavit_original_forward" not in model.__dict__:
        existing = model.__dict__.get("forward")  # e.g. a hook some other library installed
        model._llavit_original_forward = existing
    model._llavit_image_token_id = image_token_id
    model._llavit_extra_token_ids = tuple(extra_token_ids)
    model._llavit_state = state

    def forward(self, *args, **kwargs):
        return _llavit_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, type(model).forward)
    model.forward = types.MethodType(forward, model)


# ---------------------------------------------------------------------------- weights
_ADAPTER_KEY_PARTS = ("lora_", ".modules_to_save.")


def _canonical_key(key: str) -> str:
    """A PEFT-wrapped projection's base key under the plain name (``q_proj_image.base_layer.weight``
    -> ``q_proj_image.weight``); PEFT's own prefix (``base_model.model.``) is dropped."""
    key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def _image_base_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        _canonical_key(k): v for k, v in model.named_parameters()
        if any(m in k for m in IMAGE_KEY_MARKERS) and not any(a in k for a in _ADAPTER_KEY_PARTS)
    }


def llavit_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the image q/k/v tensors of a converted model (what a stock from_pretrained drops). Under
    PEFT: the base image weights under their plain names (adapters are saved by PEFT)."""
    return {
        _canonical_key(k): v for k, v in model.state_dict().items()
        if any(m in k for m in IMAGE_KEY_MARKERS) and not any(a in k for a in _ADAPTER_KEY_PARTS)
    }


def _read_checkpoint_image_tensors(path: str) -> Dict[str, torch.Tensor]:
    files = []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = [os.path.join(path, "model.safetensors")]
    tensors: Dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if any(m in key for m in IMAGE_KEY_MARKERS):
                        tensors[key] = f.get_tensor(key)
        return tensors
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if any(m in k for m in IMAGE_KEY_MARKERS)}
    raise FileNotFoundError(f"weights: no model.safetensors(.index.json) or pytorch_model.bin in {path!r}")


def _local_checkpoint_dir(name_or_path: Optional[str]) -> Optional[str]:
    """A local directory for ``from_pretrained``'s source: the path itself, or a Hub snapshot already
    in the local cache (no download)."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not a repo id, or not cached
        return None


def _layer_suffix(key: str) -> str:
    """``...layers.3.self_attn.q_proj_image.weight`` -> ``layers.3.self_attn.q_proj_image.weight``."""
    start = key.rfind("layers.")
    return key[start:] if start >= 0 else key


def load_llavit_weights(model: nn.Module, weights: Union[str, os.PathLike, Dict[str, torch.Tensor]]) -> int:
    """Load image q/k/v weights into a converted model from a checkpoint directory or a state dict.

    Keys are matched by name, or by their ``layers.<i>.self_attn.<x>_proj_image.<param>`` suffix
    (checkpoint prefixes differ between transformers versions). Raises if any image parameter of
    the model is not found. Returns the number of tensors loaded.
    """
    if isinstance(weights, (str, os.PathLike)):
        tensors = _read_checkpoint_image_tensors(os.fspath(weights))
    elif isinstance(weights, dict):
        tensors = {k: v for k, v in weights.items() if any(m in k for m in IMAGE_KEY_MARKERS)}
    else:
        raise TypeError(f"weights: expected a directory path or a state dict, got {type(weights).__name__}")
    by_suffix: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        by_suffix.setdefault(_layer_suffix(key), value)
    params = _image_base_params(model)
    if not params:
        raise ValueError("model: has no image q/k/v parameters; convert it with apply_llavit first")
    missing = []
    with torch.no_grad():
        for name, param in params.items():
            value = tensors.get(name)
            if value is None:
                value = by_suffix.get(_layer_suffix(name))
            if value is None:
                missing.append(name)
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"weights: {name} expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
            param.copy_(value.to(param.dtype))
    if missing:
        raise KeyError(f"weights: {len(missing)} image parameters not found, e.g. {missing[:3]}")
    return len(params)


# ---------------------------------------------------------------------------- config, PEFT, frozen state
def _own_config(model: nn.Module) -> None:
    """Give the model (and every submodule that shares them) its own copies of its config objects, so a
    conversion never changes another model built from the same config object."""
    from transformers import PretrainedConfig

    old = model.config
    new = copy.deepcopy(old)
    pairs = {id(old): new}
    stack = [(old, new)]
    while stack:  # sub-configs (text_config, vision_config, ...) pair up by attribute name
        a, b = stack.pop()
        for key, value in vars(a).items():
            if isinstance(value, PretrainedConfig) and id(value) not in pairs:
                pairs[id(value)] = getattr(b, key)
                stack.append((value, getattr(b, key)))
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in pairs:
            module.config = pairs[id(config)]


def _extend_peft_config(peft_model, names: Dict[str, str]) -> None:
    """Wrap-then-convert: the image copies of targeted projections carry their own adapters; add their
    names to the adapter config so PEFT saves, loads and merges them."""
    for config in getattr(peft_model, "peft_config", {}).values():
        for field in ("target_modules", "modules_to_save"):
            current = getattr(config, field, None)
            if current is None or isinstance(current, str):
                if isinstance(current, str) and field == "target_modules":
                    warnings.warn(
                        "apply_llavit: the adapter's target_modules is a regular expression; make sure it also matches "
                        f"the image projections ({', '.join(sorted(set(names.values())))}), or an adapter loaded later "
                        "will not cover them", stacklevel=3,
                    )
                continue
            extra = {names[t] for t in current if t in names}
            if extra - set(current):
                updated = list(current) + sorted(extra - set(current))
                setattr(config, field, type(current)(updated) if isinstance(current, (set, list)) else updated)


def llavit_peft_modules(
    model: nn.Module,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    image_qkv: str = "lora",
    modules_to_save=None,
) -> Dict[str, list]:
    """``target_modules`` and ``modules_to_save`` for a PEFT config of a CONVERTED model.

    Args:
        model: converted by :func:`apply_llavit` (or a PEFT model of one).
        target_modules: the text modules to put adapters on (``q_proj``... or ``qkv_proj`` for Phi-3).
        image_qkv: what happens to the image q/k/v: ``"lora"`` (default): the image projection of each
            targeted text projection gets its own adapter; ``"full"``: the image projections are trained
            in full and saved with the adapter (``modules_to_save``; LLaViT trains its visual QKV from
            the first stage on); ``"frozen"``: neither.
        modules_to_save: other modules to save in full (e.g. ``["multi_modal_projector"]``).

    Returns ``{"target_modules": [...], "modules_to_save": [...]}`` for ``LoraConfig(**...)``.
    """
    if image_qkv not in ("lora", "full", "frozen"):
        raise ValueError(f"image_qkv: expected 'lora', 'full' or 'frozen', got {image_qkv!r}")
    if isinstance(target_modules, str):
        raise TypeError("target_modules: expected a list of module names, got a string (a regular expression "
                        "cannot be extended with the image projections)")
    base, _ = _unwrap_peft(model)
    attention = [m for m in base.modules() if isinstance(m, HFLlavitAttention)]
    if not attention:
        raise ValueError("model: has no LLaViT attention modules; convert it with apply_llavit first")
    targets = list(dict.fromkeys(target_modules))
    saved = list(dict.fromkeys(modules_to_save or ()))
    image_names = sorted({n for m in attention for n in m.image_projection_names})
    text_to_image = {n[: -len("_image")]: n for n in image_names}
    if image_qkv == "lora":
        targets += [text_to_image[t] for t in list(targets) if t in text_to_image and text_to_image[t] not in targets]
    elif image_qkv == "full":
        targets = [t for t in targets if t not in image_names]
        saved += [n for n in image_names if n not in saved]
    return {"target_modules": targets, "modules_to_save": saved}


# ---------------------------------------------------------------------------- public entry points
def apply_llavit(
    model: nn.Module,
    image_token_id: Optional[int] = None,
    *,
    separate_image_qkv: Optional[bool] = None,
    bidirectional_image: Optional[bool] = None,
    weights: Union[str, os.PathLike, Dict[str, torch.Tensor], None] = "auto",
    feature_layers: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Convert a supported causal LM or multimodal model to LLaViT in place; returns the model.

    Args:
        model: a text model of a supported family (Qwen2 / Qwen2.5, Qwen3, Llama, Mistral, Phi-3:
            ``...ForCausalLM`` or the base model), ``LlavaForConditionalGeneration`` whose text side is
            one of them, or a PEFT model of any of these (wrap then convert: the adapters on q/k/v are
            copied to the image projections and the adapter config is extended to name them).
        image_token_id: the placeholder token of image patches; default: LLaVA's
            ``config.image_token_id`` (``image_token_index``) or a previous conversion's
            ``config.llavit``. Must be inside the vocabulary.
        separate_image_qkv, bidirectional_image: the paper's ablation switches (default True, or
            the values saved in ``config.llavit``).
        weights: image q/k/v weights to load. ``"auto"``: from the checkpoint directory the model
            was loaded from, when its config records a LLaViT conversion, otherwise copies of the
            text weights; a path or state dict: load from there; None: copies of the text weights.
        feature_layers: LLaVA-family models only: the vision tower's hidden states to concatenate
            (the paper: ``(5, 15, 23)`` of CLIP-L's 24 layers; 0 = embeddings, i = output of layer
            i, negatives from the end as in ``config.vision_feature_layer``). Sets
            ``config.vision_feature_layer`` to the list and swaps in a new projector of input width
            ``len(feature_layers) * vision hidden size``, randomly initialised (train it in stage 1),
            on the old projector's device and dtype, with its ``requires_grad``. None (default):
            keep the model's own (LLaVA-1.5: ``-2``). A model that already uses exactly these layers
            (a reload of a converted checkpoint) keeps its projector.

    ``requires_grad`` of every existing parameter is left as it is; the image copies take the flag of
    the text projection they copy (so a frozen model stays frozen). The model gets its own copy of
    its config (other models built from the same config object are untouched).

    Extra keywords the converted forward accepts: ``image_mask`` (bool ``[B, T]``, needed with
    ``inputs_embeds`` and no ``input_ids``) and ``span_ids`` (separate adjacent images).
    """
    outer = model
    model, peft_model = _unwrap_peft(model)
    kind = _model_kind(model)
    family = _check_text_family(model)
    saved = getattr(model.config, "llavit", None)
    saved = saved if isinstance(saved, dict) else {}
    image_token_id = _resolve_image_token_id(model, kind, image_token_id)
    layers = _check_feature_layers(model, kind, feature_layers, peft_model is not None)
    if separate_image_qkv is None:
        separate_image_qkv = bool(saved.get("separate_image_qkv", True))
    if bidirectional_image is None:
        bidirectional_image = bool(saved.get("bidirectional_image", True))
    modules = _attention_modules(model, family)
    for module in model.modules():  # modules converted by an earlier call
        if isinstance(module, HFLlavitAttention) and module.separate_image_qkv != separate_image_qkv:
            raise ValueError(
                "separate_image_qkv: the model was converted with separate_image_qkv="
                f"{module.separate_image_qkv}; convert a fresh model to change it"
            )
    if not modules and not any(isinstance(m, HFLlavitAttention) for m in model.modules()):
        raise TypeError(f"model: found no {family.name} attention modules to convert in {type(model).__name__}")

    _own_config(model)
    if layers is not None:
        _swap_projector(model, layers)
    state = getattr(model, "_llavit_state", None) or _ForwardState()
    image_names: Dict[str, str] = {}
    for name, module, fam in modules:
        if float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
            warnings.warn(
                f"apply_llavit: {name} has attention_dropout={module.attention_dropout}; span attention has no "
                "attention-probability dropout, so it is not applied", stacklevel=2,
            )
        new = fam.convert(module, separate_image_qkv=separate_image_qkv, bidirectional_image=bidirectional_image)
        new.config = module.config  # some transformers code reads self_attn.config
        new.train(module.training)
        for text_name, image_name in zip(new.text_projection_names, new.image_projection_names):
            if type(getattr(new, text_name)) is not nn.Linear:
                image_names[text_name] = image_name
        _set_submodule(model, name, new)
    for module in model.modules():
        if isinstance(module, HFLlavitAttention):
            module._llavit_state = state
            module.bidirectional_image = bidirectional_image
    if peft_model is not None and image_names:
        _extend_peft_config(peft_model, image_names)
    model._llavit_state = state
    _wrap_forward(model, image_token_id, state, _video_token_ids(model, kind))
    _remove_load_guard(model)
    # The converted modules take their mask from the layout; with "llavit" as the text model's
    # attention implementation, transformers builds no dense mask (and skips the host sync its
    # sdpa mask path does to look for padding).
    register_llavit_attention()
    _text_config(model)._attn_implementation = "llavit"
    for module in model.modules():  # transformers 4.x: the language model holds its own text-config copy
        if isinstance(module, HFLlavitAttention) and module.config is not None:
            module.config._attn_implementation = "llavit"

    if separate_image_qkv:
        if isinstance(weights, str) and weights == "auto":
            if saved:  # the config records a conversion: its image weights are in the checkpoint
                source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
                source_dir = _local_checkpoint_dir(source)
                if source_dir is None:
                    warnings.warn(
                        f"apply_llavit: the config records a LLaViT conversion but its checkpoint {source!r} was not "
                        "found locally, so the image q/k/v weights start as copies of the text weights; pass "
                        "weights=<checkpoint dir or state dict> to load the trained ones", stacklevel=2,
                    )
                else:
                    load_llavit_weights(model, source_dir)
        elif weights is not None:
            load_llavit_weights(model, weights)
    model.config.llavit = {
        "image_token_id": image_token_id,
        "separate_image_qkv": separate_image_qkv,
        "bidirectional_image": bidirectional_image,
    }
    if layers is not None or "feature_layers" in saved:
        model.config.llavit["feature_layers"] = layers if layers is not None else saved["feature_layers"]
    return outer


def _projector_holder(model: nn.Module) -> Optional[nn.Module]:
    return next((m for m in model.modules() if isinstance(getattr(m, "multi_modal_projector", None), nn.Module)), None)


def _check_feature_layers(model, kind: str, feature_layers, wrapped_by_peft: bool) -> Optional[List[int]]:
    """``feature_layers`` as a list of ints, validated against the vision tower (None stays None)."""
    if feature_layers is None:
        return None
    if kind != "multimodal" or _projector_holder(model) is None or not hasattr(model.config, "vision_feature_layer"):
        raise ValueError(
            f"feature_layers: only for LLaVA-family models (a multi_modal_projector and config.vision_feature_layer); "
            f"got {type(model).__name__}"
        )
    if isinstance(feature_layers, (int, str, bytes)) or not hasattr(feature_layers, "__iter__"):
        raise TypeError(f"feature_layers: expected a sequence of ints such as (5, 15, 23), got {feature_layers!r}")
    layers = list(feature_layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise TypeError(f"feature_layers: expected a non-empty sequence of ints such as (5, 15, 23), got {feature_layers!r}")
    depth = int(model.config.vision_config.num_hidden_layers)  # hidden_states: embeddings + one per layer
    bad = [i for i in layers if not -(depth + 1) <= i <= depth]
    if bad:
        raise ValueError(
            f"feature_layers: the vision tower has {depth} layers, so indices must be in [{-(depth + 1)}, {depth}] "
            f"(0 = embeddings); got {bad}"
        )
    current = model.config.vision_feature_layer
    current = [current] if isinstance(current, int) else list(current)
    if wrapped_by_peft and current != layers:
        raise ValueError(
            "feature_layers: changing the feature layers swaps the projector; call apply_llavit(..., feature_layers=...) "
            "before wrapping the model with PEFT"
        )
    return layers


def _swap_projector(model: nn.Module, layers: List[int]) -> None:
    """config.vision_feature_layer = layers, and a projector of the matching input width (new, random)."""
    holder = _projector_holder(model)
    old = holder.multi_modal_projector
    width = len(layers) * int(model.config.vision_config.hidden_size)
    current = model.config.vision_feature_layer
    current = [current] if isinstance(current, int) else list(current)
    first = next((m for m in old.modules() if isinstance(m, nn.Linear)), None)
    if current == layers and first is not None and first.in_features == width:
        return  # already this model's layers (a reload of a converted checkpoint): keep the trained projector
    model.config.vision_feature_layer = layers
    new = type(old)(model.config)
    first_new = next((m for m in new.modules() if isinstance(m, nn.Linear)), None)
    if first_new is None or first_new.in_features != width:
        model.config.vision_feature_layer = current[0] if len(current) == 1 else current
        raise TypeError(
            f"feature_layers: {type(old).__name__} built from the config does not take {width} input features "
            f"({len(layers)} x vision hidden size); this model's projector cannot be resized this way"
        )
    ref = next(old.parameters(), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype).requires_grad_(ref.requires_grad)
    new.train(old.training)
    holder.multi_modal_projector = new


def apply_llavit_mask(model: nn.Module, image_token_id: Optional[int] = None) -> nn.Module:
    """Mask-only LLaViT: stock modules and weights, span attention (``attn_implementation="llavit"``).

    Sets the language model's attention implementation to ``"llavit"`` (on the model's own config
    copy) and wraps the forward so the image layout reaches the attention function. No parameters
    are added.
    """
    outer = model
    model, _ = _unwrap_peft(model)
    kind = _model_kind(model)
    family = _check_text_family(model)
    image_token_id = _resolve_image_token_id(model, kind, image_token_id)
    register_llavit_attention()
    _own_config(model)
    _text_config(model)._attn_implementation = "llavit"
    state = getattr(model, "_llavit_state", None) or _ForwardState()
    modules = _attention_modules(model, family)
    for name, module, _ in modules:  # span attention has no sliding window: refuse one that binds
        window = getattr(module, "sliding_window", None)
        if window is None and family.model_types[0] in ("mistral", "phi3"):
            window = getattr(module.config, "sliding_window", None)
        _families().check_sliding_window(window, module.config, family.name)
    for _, module, _ in modules:
        module._llavit_state = state
    model._llavit_state = state
    _wrap_forward(model, image_token_id, state, _video_token_ids(model, kind))
    return outer


def from_pretrained(model_class, path: Union[str, os.PathLike], *args, **kwargs) -> nn.Module:
    """Load a checkpoint saved from a converted model and convert it again, image weights included.

    ``from_pretrained(LlavaForConditionalGeneration, "ckpt", torch_dtype=torch.bfloat16)`` is
    ``model_class.from_pretrained(path, *args, **kwargs)`` followed by :func:`apply_llavit` with the
    saved settings (``config.llavit``) and the image q/k/v read from ``path``. A checkpoint without
    ``config.llavit`` (a stock model) is converted fresh (image weights = copies of the text ones).
    """
    model = model_class.from_pretrained(path, *args, **kwargs)
    saved = getattr(model.config, "llavit", None)
    local = _local_checkpoint_dir(os.fspath(path))
    weights = local if (isinstance(saved, dict) and saved.get("separate_image_qkv", True) and local) else "auto"
    if not isinstance(saved, dict):
        weights = None
    return apply_llavit(model, weights=weights)


# ---------------------------------------------------------------------------- plain loads of converted checkpoints
_LOAD_GUARD = "_llavit_load_guard"


def _remove_load_guard(model: nn.Module) -> None:
    for module in model.modules():
        hook_id = module.__dict__.pop(_LOAD_GUARD, None)
        if hook_id is not None:  # by id on this module's own dicts (a deep copy shares no handle)
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def _guard_hook(module, args, kwargs):
    config = module.config
    if _LOAD_GUARD in module.__dict__:
        _remove_load_guard(module)
        if "_llavit_state" not in module.__dict__:
            warnings.warn(
                f"{type(module).__name__}: this model was loaded from a LLaViT-converted checkpoint (config.llavit = "
                f"{config.llavit}) without converting it: its image q/k/v weights were dropped and image tokens "
                "run through the text weights with a causal mask, so outputs differ from the trained model. Load it "
                "with llavit_kernels.integrations.from_pretrained(ModelClass, path) or call apply_llavit(model) after "
                "loading.", UserWarning, stacklevel=2,
            )
    return None


def _install_load_guard() -> None:
    """Make every transformers model built from a config that records a LLaViT conversion warn on its
    first forward unless it was converted (``post_init`` runs in every model's constructor, also in
    ``from_pretrained``). Installed once when this module is imported; a plain model pays nothing."""
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel.post_init, "_llavit_guard", False):
        return
    original = PreTrainedModel.post_init

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        config = getattr(self, "config", None)
        if isinstance(getattr(config, "llavit", None), dict) and _LOAD_GUARD not in self.__dict__:
            self.__dict__[_LOAD_GUARD] = self.register_forward_pre_hook(_guard_hook, with_kwargs=True).id
        return result

    post_init._llavit_guard = True
    PreTrainedModel.post_init = post_init


register_llavit_attention()  # attn_implementation="llavit" is available as soon as this module is imported
_install_load_guard()

"""Convert Hugging Face Qwen2 / Llama / LLaVA models to LLaViT in place.

Three lines::

    from llavit_kernels.integrations import apply_llavit
    model = LlavaForConditionalGeneration.from_pretrained(path)
    apply_llavit(model)            # image token id from model.config.image_token_id

What changes:

* every ``Qwen2Attention`` / ``LlamaAttention`` of the language model is replaced by a
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

import functools
import inspect
import json
import os
import types
import warnings
from typing import Dict, Optional, Union

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
    "LAYOUT_KWARG",
]

LAYOUT_KWARG = "llavit_layout"
IMAGE_KEY_MARKERS = ("q_proj_image.", "k_proj_image.", "v_proj_image.")


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


# ---------------------------------------------------------------------------- converted attention
class HFLlavitAttention(LlavitAttention):
    """LlavitAttention inside a converted transformers model.

    Its ``forward`` has transformers' attention signature (``hidden_states, position_embeddings,
    attention_mask, cache / past_key_values / past_key_value, **kwargs``; the name of the cache
    argument changed between versions, all are accepted) and returns ``(output, None)``. The 4-D
    ``attention_mask`` transformers builds is ignored: the mask comes from the layout.
    """

    _llavit_state: Optional[_ForwardState] = None

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
        if cos.dim() == 3 and cos.shape[0] == 1 and tuple(cos.shape[:-1]) != lead:
            cos, sin = cos[0], sin[0]
        if source.packed:
            return self._forward_packed(hidden_states, source, cos, sin, kv_cache), None
        q, k, v = self.project_qkv(hidden_states, query_is_image, cos, sin)
        if kv_cache is not None:
            # transformers' caches hold [B, Hkv, T, D]; the ops use [B, T, Hkv, D]
            k, v = kv_cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        layout = source.layout(q.shape[1], k.shape[1])
        out = self.attend(q, k, v, layout)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim)), None

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
def _supported_attention_classes():
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return (Qwen2Attention, LlamaAttention)


def _model_kind(model: nn.Module) -> str:
    import transformers

    names = {
        "llava": ("LlavaForConditionalGeneration", "LlavaModel"),
        "text": ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen2Model", "LlamaModel"),
    }
    for kind, class_names in names.items():
        for name in class_names:
            cls = getattr(transformers, name, None)
            if cls is not None and isinstance(model, cls):
                return kind
    raise TypeError(
        f"model: expected Qwen2ForCausalLM, LlamaForCausalLM or LlavaForConditionalGeneration (or their base "
        f"models), got {type(model).__name__}"
    )


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _resolve_image_token_id(model, kind: str, image_token_id: Optional[int]) -> int:
    if image_token_id is None:
        llavit_cfg = getattr(model.config, "llavit", None)
        if isinstance(llavit_cfg, dict) and llavit_cfg.get("image_token_id") is not None:
            image_token_id = llavit_cfg["image_token_id"]
        elif kind == "llava":
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


def _attention_modules(model):
    classes = _supported_attention_classes()
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, classes)]
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
    if position_ids is None or image_mask.shape[1] < 2 or not should_validate_values():
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


def _wrap_forward(model, image_token_id: int, state: _ForwardState) -> None:
    """Bind a layout-building forward to the instance (the class is untouched).

    A bound method (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy. Its
    ``__wrapped__`` is the class forward, so ``inspect.signature(model.forward)`` (which
    ``generate()`` uses to validate keywords) still shows the stock arguments.
    """
    if "_llavit_original_forward" not in model.__dict__:
        existing = model.__dict__.get("forward")  # e.g. a hook some other library installed
        model._llavit_original_forward = existing
    model._llavit_image_token_id = image_token_id
    model._llavit_state = state

    def forward(self, *args, **kwargs):
        return _llavit_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, type(model).forward)
    model.forward = types.MethodType(forward, model)


# ---------------------------------------------------------------------------- weights
def llavit_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the image q/k/v tensors of a converted model (what a stock from_pretrained drops)."""
    return {k: v for k, v in model.state_dict().items() if any(m in k for m in IMAGE_KEY_MARKERS)}


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
    params = {k: v for k, v in model.named_parameters() if any(m in k for m in IMAGE_KEY_MARKERS)}
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


# ---------------------------------------------------------------------------- public entry points
def apply_llavit(
    model: nn.Module,
    image_token_id: Optional[int] = None,
    *,
    separate_image_qkv: Optional[bool] = None,
    bidirectional_image: Optional[bool] = None,
    weights: Union[str, os.PathLike, Dict[str, torch.Tensor], None] = "auto",
) -> nn.Module:
    """Convert a Qwen2 / Llama causal LM or a LLaVA model to LLaViT in place; returns the model.

    Args:
        model: ``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ``LlavaForConditionalGeneration`` (text side
            Qwen2 or Llama), or their base models.
        image_token_id: the placeholder token of image patches; default: LLaVA's
            ``config.image_token_id`` (``image_token_index``) or a previous conversion's
            ``config.llavit``. Must be inside the vocabulary.
        separate_image_qkv, bidirectional_image: the paper's ablation switches (default True, or
            the values saved in ``config.llavit``).
        weights: image q/k/v weights to load. ``"auto"``: from the checkpoint directory the model
            was loaded from, when its config records a LLaViT conversion, otherwise copies of the
            text weights; a path or state dict: load from there; None: copies of the text weights.

    Extra keywords the converted forward accepts: ``image_mask`` (bool ``[B, T]``, needed with
    ``inputs_embeds`` and no ``input_ids``) and ``span_ids`` (separate adjacent images).
    """
    kind = _model_kind(model)
    saved = getattr(model.config, "llavit", None)
    saved = saved if isinstance(saved, dict) else {}
    image_token_id = _resolve_image_token_id(model, kind, image_token_id)
    if separate_image_qkv is None:
        separate_image_qkv = bool(saved.get("separate_image_qkv", True))
    if bidirectional_image is None:
        bidirectional_image = bool(saved.get("bidirectional_image", True))
    text_model_type = getattr(_text_config(model), "model_type", None)
    if kind == "llava" and text_model_type not in ("qwen2", "llama"):
        raise TypeError(f"model: LLaVA's text side must be Qwen2 or Llama, got model_type={text_model_type!r}")

    state = getattr(model, "_llavit_state", None) or _ForwardState()
    converted = 0
    for name, module in _attention_modules(model):
        if float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0:
            warnings.warn(
                f"apply_llavit: {name} has attention_dropout={module.attention_dropout}; span attention has no "
                "attention-probability dropout, so it is not applied", stacklevel=2,
            )
        new = HFLlavitAttention.from_attention(
            module, separate_image_qkv=separate_image_qkv, bidirectional_image=bidirectional_image
        )
        new.config = module.config  # some transformers code reads self_attn.config
        new._llavit_state = state
        _set_submodule(model, name, new)
        converted += 1
    for module in model.modules():  # modules converted by an earlier call
        if isinstance(module, HFLlavitAttention):
            module._llavit_state = state
            if module.separate_image_qkv != separate_image_qkv:
                raise ValueError(
                    "separate_image_qkv: the model was converted with separate_image_qkv="
                    f"{module.separate_image_qkv}; convert a fresh model to change it"
                )
            module.bidirectional_image = bidirectional_image
    if converted == 0 and not any(isinstance(m, HFLlavitAttention) for m in model.modules()):
        raise TypeError(f"model: found no Qwen2/Llama attention modules to convert in {type(model).__name__}")
    model._llavit_state = state
    _wrap_forward(model, image_token_id, state)
    # The converted modules take their mask from the layout; with "llavit" as the text model's
    # attention implementation, transformers builds no dense mask (and skips the host sync its
    # sdpa mask path does to look for padding).
    register_llavit_attention()
    _text_config(model)._attn_implementation = "llavit"

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
    return model


def apply_llavit_mask(model: nn.Module, image_token_id: Optional[int] = None) -> nn.Module:
    """Mask-only LLaViT: stock modules and weights, span attention (``attn_implementation="llavit"``).

    Sets the language model's attention implementation to ``"llavit"`` and wraps the forward so
    the image layout reaches the attention function. No parameters are added.
    """
    kind = _model_kind(model)
    image_token_id = _resolve_image_token_id(model, kind, image_token_id)
    register_llavit_attention()
    text_config = _text_config(model)
    text_config._attn_implementation = "llavit"
    state = getattr(model, "_llavit_state", None) or _ForwardState()
    for _, module in _attention_modules(model):
        module._llavit_state = state
    model._llavit_state = state
    _wrap_forward(model, image_token_id, state)
    return model


try:  # make attn_implementation="llavit" available as soon as this module is imported
    register_llavit_attention()
except Exception:  # pragma: no cover - transformers missing or too old
    pass

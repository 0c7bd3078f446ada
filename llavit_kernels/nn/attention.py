"""LlavitAttention: GQA attention with modality-specific QKV and bidirectional image spans.

One :class:`~llavit_kernels.layout.SpanLayout` drives both the per-token choice of the q/k/v
weights (text or image) and the attention mask, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..layout import SpanLayout
from ..ops import modality_qkv, span_attention

__all__ = ["LlavitAttention", "LlavitKVCache", "causal_mask_layout"]


class LlavitKVCache:
    """The key/value cache of ONE :class:`LlavitAttention` layer (keep one per layer).

    Holds ``key`` and ``value`` of shape ``[B, Tk, Hkv, D]`` (the attention layout, RoPE already
    applied to keys). ``LlavitAttention.forward(..., kv_cache=cache)`` appends the new tokens'
    keys/values and attends over everything cached; build the layout of each step with
    ``past_length=cache.length`` (``SpanLayout.from_input_ids(..., past_length=cache.length)``).
    An image must lie entirely inside one step (prefill chunk): image spans are bidirectional only
    within a step, so a chunk boundary inside an image would silently make it causal across chunks.
    """

    def __init__(self):
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        """Number of cached tokens (a Python int read from the shape: no host sync)."""
        return 0 if self.key is None else self.key.shape[1]

    def update(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``key, value [B, T, Hkv, D]``; return the whole cache ``[B, length, Hkv, D]``."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            if key.shape[0] != self.key.shape[0] or key.shape[2:] != self.key.shape[2:]:
                raise ValueError(
                    f"key: expected shape [{self.key.shape[0]}, T, {self.key.shape[2]}, {self.key.shape[3]}] "
                    f"(that of the cache), got {tuple(key.shape)}"
                )
            self.key = torch.cat([self.key, key], dim=1)
            self.value = torch.cat([self.value, value], dim=1)
        return self.key, self.value

    def reset(self) -> None:
        self.key = self.value = None

    def __repr__(self) -> str:
        return f"LlavitKVCache(length={self.length})"


def causal_mask_layout(layout: SpanLayout) -> SpanLayout:
    """The same documents, padding and query offset with every image span made causal.

    Equals the layout of a text-only batch (``is_image`` all False): used as the MASK when
    ``bidirectional_image=False`` while the routing keeps the real ``is_image``. Tensor ops only.
    """
    device = layout.device
    if layout.packed:
        idx = torch.arange(layout.num_queries, device=device, dtype=torch.int32)
        return SpanLayout(
            is_image=torch.zeros_like(layout.is_image), kv_start=layout.kv_start, kv_end=idx + 1,
            q_start=idx, q_end=layout.q_end, cu_seqlens=layout.cu_seqlens,
        )
    offset = layout.query_offset
    idx_q = torch.arange(layout.num_queries, device=device, dtype=torch.int32)
    idx_k = (torch.arange(layout.num_keys, device=device, dtype=torch.int32) - offset).clamp(min=0)
    valid_q = layout.kv_end > layout.kv_start
    valid_k = layout.q_start < layout.q_end
    kv_end = torch.where(valid_q, offset + idx_q + 1, layout.kv_end)
    q_start = torch.where(valid_k, torch.maximum(layout.q_start, idx_k), layout.q_start)
    return SpanLayout(
        is_image=torch.zeros_like(layout.is_image), kv_start=layout.kv_start, kv_end=kv_end.contiguous(),
        q_start=q_start.contiguous(), q_end=layout.q_end, query_offset=offset,
    )


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class LlavitAttention(nn.Module):
    """Attention of a LLaViT decoder layer (arXiv 2511.10301).

    Text tokens use ``q_proj/k_proj/v_proj``; image tokens use ``q_proj_image/k_proj_image/
    v_proj_image`` (when ``separate_image_qkv``); ``o_proj`` is shared. Submodule names are those of
    Hugging Face Qwen2/Llama attention, so their state dicts load by name. Image tokens of one image
    span attend to each other bidirectionally (when ``bidirectional_image``), everything else is
    causal; grouped-query attention when ``num_kv_heads < num_heads``.

    Args:
        hidden_size, num_heads: model width and query heads.
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        head_dim: default ``hidden_size // num_heads``.
        qkv_bias, o_bias: biases of the q/k/v projections (Qwen2: True) and of o_proj.
        separate_image_qkv: False shares the text q/k/v with image tokens (ablation; no image
            projections are created).
        bidirectional_image: False makes attention fully causal (ablation); routing is unchanged.
        rope_theta: base of the rotary embedding used when ``position_embeddings`` is not given.
        layer_idx: index of the layer (used by Hugging Face caches).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        qkv_bias: bool = True,
        o_bias: bool = False,
        separate_image_qkv: bool = True,
        bidirectional_image: bool = True,
        rope_theta: float = 10000.0,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _positive_int("hidden_size", hidden_size)
        _positive_int("num_heads", num_heads)
        _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"head_dim: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pass head_dim"
                )
            head_dim = hidden_size // num_heads
        _positive_int("head_dim", head_dim)
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim: expected an even number (rotary embeddings), got {head_dim}")
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"rope_theta: expected a positive number, got {rope_theta!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.separate_image_qkv = bool(separate_image_qkv)
        self.bidirectional_image = bool(bidirectional_image)
        self.rope_theta = float(rope_theta)
        self.layer_idx = layer_idx
        self.scaling = head_dim ** -0.5
        # None: the ops pick (Triton on CUDA, reference elsewhere); "reference" / "triton" force one
        self.backend: Optional[str] = None
        self.cache_fused_weights = True  # reuse the concatenated q|k|v weights in inference (see _fused_weights)
        factory = {"device": device, "dtype": dtype}
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, q_out, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(q_out, hidden_size, bias=o_bias, **factory)
        if self.separate_image_qkv:
            self.q_proj_image = nn.Linear(hidden_size, q_out, bias=qkv_bias, **factory)
            self.k_proj_image = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
            self.v_proj_image = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
            self.init_image_from_text()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_image_from_text(self) -> None:
        """Copy the text q/k/v weights (and biases) into the image ones (the paper's initialisation)."""
        if not self.separate_image_qkv:
            return
        for name in ("q_proj", "k_proj", "v_proj"):
            text, image = getattr(self, name), getattr(self, name + "_image")
            image.weight.copy_(text.weight)
            if text.bias is not None:
                image.bias.copy_(text.bias)

    def _qkv_params(self):
        image = ("q_proj_image", "k_proj_image", "v_proj_image") if self.separate_image_qkv else ()
        names = ("q_proj", "k_proj", "v_proj") + image
        for name in names:
            # The projections are read as weights (concatenated for the fused op), never called: a
            # wrapper such as a PEFT LoRA layer would be silently ignored, so refuse anything else.
            if type(getattr(self, name)) is not nn.Linear:
                raise TypeError(
                    f"{name}: LlavitAttention reads q/k/v as plain nn.Linear weights (fused projection); got "
                    f"{type(getattr(self, name)).__name__}. Adapters (e.g. LoRA) on q/k/v are not applied; merge them "
                    "into the weights first, or target other modules"
                )
        return [p for name in names for p in (getattr(self, name).weight, getattr(self, name).bias) if p is not None]

    def _fused_weights(self, dtype: Optional[torch.dtype]):
        """Text and image q|k|v weights (and biases) concatenated, as ``modality_qkv`` takes them.

        With autograd recording, concatenated per call (gradients flow back to q_proj & co).
        Without (inference, ``torch.no_grad``), the concatenation is kept and reused until a
        weight changes (tracked by storage pointer and version counter), so decode steps do not copy
        the weights every token; set ``cache_fused_weights = False`` to save that memory.
        """
        params = self._qkv_params()
        cacheable = (
            self.cache_fused_weights
            and not torch.compiler.is_compiling()  # a compiled graph re-derives it anyway
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        )
        if cacheable:
            # inference-mode tensors must not be reused outside it (autograd cannot save them)
            key = (dtype, torch.is_inference_mode_enabled()) + tuple(
                (p.data_ptr(), p._version, p.dtype, p.device) for p in params)
            cached = self.__dict__.get("_fused_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        else:
            self.__dict__.pop("_fused_cache", None)

        def fuse(q, k, v):
            weight = torch.cat([q.weight, k.weight, v.weight], dim=0)
            bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias], dim=0)
            if dtype is not None and weight.dtype != dtype:
                weight = weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            return weight, bias

        text = fuse(self.q_proj, self.k_proj, self.v_proj)
        image = fuse(self.q_proj_image, self.k_proj_image, self.v_proj_image) if self.separate_image_qkv else text
        if cacheable:
            self.__dict__["_fused_cache"] = (key, (text, image))
        return text, image

    @classmethod
    def from_attention(cls, module: nn.Module, **overrides) -> "LlavitAttention":
        """Build from a transformers Qwen2/Llama attention module: text weights copied, image = copies.

        ``overrides`` are passed to the constructor (e.g. ``separate_image_qkv=False``,
        ``bidirectional_image=False``). The result lives on the module's device and dtype.
        """
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise TypeError(
                    f"module: expected a Qwen2/Llama-style attention with nn.Linear {name}, got "
                    f"{type(module).__name__} without it"
                )
        config = getattr(module, "config", None)
        if config is None:
            raise TypeError(f"module: expected a transformers attention module with .config, got {type(module).__name__}")
        if getattr(module, "sliding_window", None) is not None:
            raise NotImplementedError(
                f"module: sliding-window attention (sliding_window={module.sliding_window}) is not supported by LlavitAttention"
            )
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kwargs = dict(
            hidden_size=module.q_proj.in_features,
            num_heads=module.q_proj.out_features // head_dim,
            num_kv_heads=module.k_proj.out_features // head_dim,
            head_dim=head_dim,
            qkv_bias=module.q_proj.bias is not None,
            o_bias=module.o_proj.bias is not None,
            rope_theta=_rope_theta(config),
            layer_idx=getattr(module, "layer_idx", None),
            device=module.q_proj.weight.device,
            dtype=module.q_proj.weight.dtype,
        )
        kwargs.update(overrides)
        new = cls(**kwargs)
        new.scaling = float(getattr(module, "scaling", new.scaling))
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(new, name).load_state_dict(getattr(module, name).state_dict())
        new.init_image_from_text()
        return new

    # ------------------------------------------------------------------ rotary
    def default_position_ids(self, layout: SpanLayout) -> torch.Tensor:
        """Position of each token inside its sequence, counted from its first non-padding token
        (left padding) or document start (packed); the query offset counts for chunks."""
        idx = torch.arange(layout.num_queries, device=layout.device, dtype=torch.int64)
        return (idx + layout.query_offset - layout.kv_start.to(torch.int64)).clamp(min=0)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Default (unscaled) RoPE tables ``cos, sin [..., D]`` in the Hugging Face convention."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 as Hugging Face does
        inv_freq = 1.0 / (
            self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=compute) / self.head_dim)
        )
        freqs = position_ids[..., None].to(compute) * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # ------------------------------------------------------------------ pieces
    def project_qkv(self, hidden_states, is_image, cos=None, sin=None):
        """Modality-routed q, k, v in the attention layout ``[..., T, H(kv), D]`` with RoPE applied.

        ``is_image``: the SpanLayout (its routing table is then built once per batch) or a bool mask."""
        dtype = None
        if torch.is_autocast_enabled(hidden_states.device.type):
            dtype = torch.get_autocast_dtype(hidden_states.device.type)
            hidden_states = hidden_states.to(dtype)
        (w_t, b_t), (w_i, b_i) = self._fused_weights(hidden_states.dtype)
        return modality_qkv(hidden_states, is_image, w_t, b_t, w_i, b_i, self.num_heads, self.num_kv_heads, cos, sin,
                            backend=self.backend)

    def attend(self, q, k, v, layout: SpanLayout) -> torch.Tensor:
        mask_layout = layout if self.bidirectional_image else causal_mask_layout(layout)
        return span_attention(q, k, v, mask_layout, softmax_scale=self.scaling, backend=self.backend)

    def _check_inputs(self, hidden_states, layout, kv_cache):
        if not isinstance(layout, SpanLayout):
            raise TypeError(f"layout: expected a SpanLayout, got {type(layout).__name__}")
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        want_ndim = 2 if layout.packed else 3
        if hidden_states.dim() != want_ndim or hidden_states.shape[-1] != self.hidden_size:
            what = "[N, hidden_size] for a packed layout" if layout.packed else "[B, T, hidden_size] for a padded layout"
            raise ValueError(
                f"hidden_states: expected {what} with hidden_size={self.hidden_size}, got shape {tuple(hidden_states.shape)}"
            )
        if tuple(hidden_states.shape[:-1]) != layout.token_shape:
            raise ValueError(
                f"layout: expected token shape {tuple(hidden_states.shape[:-1])} (the leading dims of hidden_states), "
                f"got a layout of token shape {layout.token_shape}"
            )
        if layout.device != hidden_states.device:
            raise ValueError(f"layout: expected tensors on {hidden_states.device} (that of hidden_states), got {layout.device}")
        if kv_cache is None:
            if layout.num_keys != layout.num_queries or layout.query_offset != 0:
                raise ValueError(
                    f"layout: a chunk layout (query_offset={layout.query_offset}, num_keys={layout.num_keys}) needs "
                    "kv_cache holding the earlier keys; got kv_cache=None"
                )
        else:
            if not isinstance(kv_cache, LlavitKVCache):
                raise TypeError(f"kv_cache: expected a LlavitKVCache, got {type(kv_cache).__name__}")
            if layout.packed:
                raise ValueError("kv_cache: expected a padded layout with a KV cache, got a packed layout")
            if layout.query_offset != kv_cache.length or layout.num_keys != kv_cache.length + layout.num_queries:
                raise ValueError(
                    f"layout: expected past_length={kv_cache.length} (the cache length) and num_keys="
                    f"{kv_cache.length + layout.num_queries}, got query_offset={layout.query_offset}, "
                    f"num_keys={layout.num_keys}; build it with past_length=kv_cache.length"
                )

    def _rope_tables(self, hidden_states, layout, position_embeddings, position_ids):
        if position_embeddings is not None:
            if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
                raise TypeError("position_embeddings: expected a (cos, sin) pair")
            cos, sin = position_embeddings
        else:
            if position_ids is None:
                position_ids = self.default_position_ids(layout)
            elif tuple(position_ids.shape) not in (layout.token_shape, layout.token_shape[-1:], (1,) + layout.token_shape[-1:]):
                raise ValueError(
                    f"position_ids: expected shape {layout.token_shape} or {layout.token_shape[-1:]}, got {tuple(position_ids.shape)}"
                )
            cos, sin = self.rotary(position_ids.to(hidden_states.device), hidden_states.dtype)
        # Hugging Face builds [1, T, D] tables for a batch; the op wants [B, T, D] or [T, D].
        lead = layout.token_shape
        if cos.dim() == len(lead) + 1 and cos.shape[0] == 1 and tuple(cos.shape[:-1]) != lead:
            cos, sin = cos[0], sin[0]
        return cos, sin

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: SpanLayout,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[LlavitKVCache] = None,
    ) -> torch.Tensor:
        """Args:
            hidden_states: ``[B, T, hidden]`` (padded layout) or ``[N, hidden]`` (packed layout).
            layout: the batch's SpanLayout (routing and mask); with ``kv_cache`` it is the chunk
                layout built with ``past_length=kv_cache.length``.
            position_embeddings: ``(cos, sin)`` of shape ``[B, T, D]`` / ``[1, T, D]`` / ``[T, D]``
                (packed: ``[N, D]``), Hugging Face rotate-half convention.
            position_ids: used when ``position_embeddings`` is None, with this module's rotary
                (``rope_theta``); default: position inside each sequence (see ``default_position_ids``).
            kv_cache: a :class:`LlavitKVCache` that this call appends to.

        Returns: a tensor of ``hidden_states``' shape.
        """
        self._check_inputs(hidden_states, layout, kv_cache)
        cos, sin = self._rope_tables(hidden_states, layout, position_embeddings, position_ids)
        # the layout itself (not its is_image): the routing table is cached on it, once for all layers
        q, k, v = self.project_qkv(hidden_states, layout, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = self.attend(q, k, v, layout)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"separate_image_qkv={self.separate_image_qkv}, bidirectional_image={self.bidirectional_image}"
        )

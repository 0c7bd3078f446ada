"""LlavitAttention: GQA attention with modality-specific QKV and bidirectional image spans.

One :class:`~llavit_kernels.layout.SpanLayout` drives both the per-token choice of the q/k/v
weights (text or image) and the attention mask, so the two cannot disagree.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ..layout import SpanLayout
from ..ops import apply_rotary, modality_qkv, span_attention

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


def base_linear(module: nn.Module) -> Optional[nn.Linear]:
    """The ``nn.Linear`` holding the frozen base weight of a projection: the module itself, or the one
    a wrapper (a PEFT LoRA layer's ``base_layer``, a ``ModulesToSaveWrapper``'s original) wraps; None
    when there is none."""
    for _ in range(8):  # wrappers of wrappers, bounded
        if isinstance(module, nn.Linear):
            return module
        if hasattr(module, "get_base_layer"):
            inner = module.get_base_layer()
        else:
            inner = getattr(module, "base_layer", None) or getattr(module, "original_module", None)
        if inner is None or inner is module:
            return None
        module = inner
    return None


def _is_peft(module: nn.Module, *parts: str) -> bool:
    name = type(module).__module__
    return name.startswith("peft.") and all(p in name for p in parts)


def projection_plan(module: nn.Module):
    """How a q/k/v projection runs inside the fused routed op.

    Returns ``(linear, terms)``: the plain ``nn.Linear`` whose weight goes into the fused GEMM and the
    low-rank terms ``(lora_A, lora_B, dropout, scaling)`` to add to its output (PEFT LoRA, the active
    adapters), or None when the module must be called as it is (any other wrapper, a LoRA variant such
    as DoRA, a LoRA layer with forward hooks or a mixed-adapter batch). Reads only Python attributes.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return None  # hooks (e.g. PEFT's per-call adapter_names) must see the call
    if type(module) is nn.Linear:
        return module, ()
    if _is_peft(module) and hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = list(module.active_adapters)
        if module.disable_adapters or not active or any(a not in module._adapters for a in active):
            inner = module.original_module
        else:
            inner = module.modules_to_save[active[0]]
        return projection_plan(inner)
    if _is_peft(module, "lora") and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        base = module.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        if module.merged:
            # enabled: peft runs the base layer alone; disabled: peft unmerges first (let it)
            return None if module.disable_adapters else (base, ())
        if module.disable_adapters:
            return base, ()
        terms = []
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if name in getattr(module, "lora_variant", {}):
                return None  # DoRA & co: their own forward
            terms.append((module.lora_A[name], module.lora_B[name], module.lora_dropout[name], module.scaling[name]))
        return base, tuple(terms)
    return None


def _low_rank_delta(x: torch.Tensor, plans) -> Optional[torch.Tensor]:
    """Sum of the low-rank terms of a group of projections, concatenated like their outputs; None if none."""
    if not any(terms for _, terms in plans):
        return None
    parts = []
    for linear, terms in plans:
        delta = None
        for lora_a, lora_b, dropout, scaling in terms:
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(lora_a.weight.dtype)
            term = lora_b(lora_a(dropout(xa))) * scaling
            delta = term if delta is None else delta + term
        parts.append(delta if delta is not None else x.new_zeros(*x.shape[:-1], linear.out_features))
    dtype = torch.promote_types(x.dtype, parts[0].dtype)
    return torch.cat([p.to(dtype) for p in parts], dim=-1)


def _image_copy(module: nn.Module) -> nn.Module:
    """The image copy of a text projection: a new ``nn.Linear`` with the same weights and
    ``requires_grad`` flags, or a deep copy of a wrapper (PEFT adapters included)."""
    if type(module) is not nn.Linear:
        import copy

        return copy.deepcopy(module)
    new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.weight.requires_grad_(module.weight.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return new


_UNFUSED_WARNED = set()


def _warn_unfused(owner: str, modules) -> None:
    kinds = tuple(sorted({type(m).__name__ for m in modules}))
    if kinds in _UNFUSED_WARNED:
        return
    _UNFUSED_WARNED.add(kinds)
    warnings.warn(
        f"{owner}: q/k/v projections of type {', '.join(kinds)} cannot run inside the fused routed projection "
        "(only nn.Linear and PEFT LoRA layers can), so they are called as modules: both the text and the "
        "image projections run on every token and torch.where picks per token (correct, about twice the "
        "projection cost). Shown once per kind.", stacklevel=3,
    )


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
        fused_qkv: one ``qkv_proj`` (rows q | k | v, Phi-3's layout) instead of three projections; the
            image copy is ``qkv_proj_image``.

    q/k/v may be PEFT LoRA layers (wrapping the ``nn.Linear``): their base weights still run in the
    fused routed projection and each modality adds its own adapters' low-rank terms (see
    :meth:`project_qkv`).
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
        fused_qkv: bool = False,
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
        self.fused_qkv = bool(fused_qkv)
        if self.fused_qkv:  # Phi-3 style: one qkv_proj whose rows are q | k | v
            self.qkv_proj = nn.Linear(hidden_size, q_out + 2 * kv_out, bias=qkv_bias, **factory)
        else:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=qkv_bias, **factory)
            self.k_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
            self.v_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(q_out, hidden_size, bias=o_bias, **factory)
        if self.separate_image_qkv:
            if self.fused_qkv:
                self.qkv_proj_image = nn.Linear(hidden_size, q_out + 2 * kv_out, bias=qkv_bias, **factory)
            else:
                self.q_proj_image = nn.Linear(hidden_size, q_out, bias=qkv_bias, **factory)
                self.k_proj_image = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
                self.v_proj_image = nn.Linear(hidden_size, kv_out, bias=qkv_bias, **factory)
            self.init_image_from_text()

    # ------------------------------------------------------------------ weights
    @property
    def text_projection_names(self) -> Tuple[str, ...]:
        return ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")

    @property
    def image_projection_names(self) -> Tuple[str, ...]:
        """Names of the image q/k/v modules (empty without ``separate_image_qkv``)."""
        if not self.separate_image_qkv:
            return ()
        return tuple(name + "_image" for name in self.text_projection_names)

    def _qkv_modules(self):
        text = tuple(getattr(self, name) for name in self.text_projection_names)
        image = tuple(getattr(self, name) for name in self.image_projection_names) or text
        return text, image

    @torch.no_grad()
    def init_image_from_text(self) -> None:
        """Copy the text q/k/v weights (and biases) into the image ones (the paper's initialisation).

        With wrapped projections (PEFT), the base weights are copied; adapters are left alone."""
        for text_name, image_name in zip(self.text_projection_names, self.image_projection_names):
            text, image = base_linear(getattr(self, text_name)), base_linear(getattr(self, image_name))
            if text is None or image is None:
                got = type(getattr(self, text_name)).__name__
                raise TypeError(f"{text_name}: expected an nn.Linear or a wrapper of one, got {got}")
            image.weight.copy_(text.weight)
            if text.bias is not None:
                image.bias.copy_(text.bias)

    def _fused_weights(self, dtype: Optional[torch.dtype], text_linears=None, image_linears=None):
        """Text and image q|k|v weights (and biases) concatenated, as ``modality_qkv`` takes them.

        ``text_linears`` / ``image_linears``: the plain ``nn.Linear`` of each projection (default:
        the projections themselves). With autograd recording a trainable weight, concatenated per
        call (gradients flow back to q_proj & co). Otherwise (inference, or frozen base weights under
        PEFT), the concatenation is kept and reused until a weight changes (tracked by storage pointer
        and version counter), so decode steps do not copy the weights every token; set
        ``cache_fused_weights = False`` to save that memory.
        """
        if text_linears is None:
            text_linears, image_linears = self._qkv_modules()
        params = [p for lin in text_linears + image_linears for p in (lin.weight, lin.bias) if p is not None]
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

        def fuse(linears):
            if len(linears) == 1:
                weight, bias = linears[0].weight, linears[0].bias
            else:
                weight = torch.cat([lin.weight for lin in linears], dim=0)
                bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears], dim=0)
            if dtype is not None and weight.dtype != dtype:
                weight = weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            return weight, bias

        def fuse_pair(text_linears, image_linears):
            # text q|k|v rows then image q|k|v rows in ONE concatenation (the same bytes as two): the
            # halves are one [2, N, K] tensor, which the Triton backend reads through one TMA descriptor
            weight = torch.cat([lin.weight for lin in text_linears + image_linears], dim=0)
            bias = None
            if text_linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in text_linears + image_linears], dim=0)
            if dtype is not None and weight.dtype != dtype:
                weight = weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            n = weight.shape[0] // 2
            return (weight[:n], None if bias is None else bias[:n]), (weight[n:], None if bias is None else bias[n:])

        pairable = (
            image_linears is not text_linears and len(text_linears) > 1 and len(image_linears) == len(text_linears)
            and all(t.weight.shape == i.weight.shape and t.weight.dtype == i.weight.dtype
                    and t.weight.device == i.weight.device and (t.bias is None) == (i.bias is None)
                    for t, i in zip(text_linears, image_linears))
            and all((lin.bias is None) == (text_linears[0].bias is None) for lin in text_linears)
        )
        if pairable:
            text, image = fuse_pair(text_linears, image_linears)
        else:
            text = fuse(text_linears)
            image = fuse(image_linears) if image_linears is not text_linears else text
        if cacheable:
            self.__dict__["_fused_cache"] = (key, (text, image))
        return text, image

    @classmethod
    def from_attention(cls, module: nn.Module, **overrides) -> "LlavitAttention":
        """Build from a transformers attention module (Qwen2/Llama style q/k/v/o, or Phi-3 style
        ``qkv_proj``): the text projections and ``o_proj`` are TAKEN OVER (the same module objects,
        so ``requires_grad``, device, dtype and any PEFT wrapper stay as they are); the image ones are
        copies of the text ones (a plain ``nn.Linear`` with the text weight's ``requires_grad``, or a
        deep copy of a wrapper with its adapters).

        ``overrides`` are passed to the constructor (e.g. ``separate_image_qkv=False``,
        ``bidirectional_image=False``). The result lives on the module's device and dtype.
        """
        fused = getattr(module, "qkv_proj", None) is not None and getattr(module, "q_proj", None) is None
        names = ("qkv_proj", "o_proj") if fused else ("q_proj", "k_proj", "v_proj", "o_proj")
        bases = {}
        for name in names:
            sub = getattr(module, name, None)
            bases[name] = None if sub is None else base_linear(sub)
            if bases[name] is None:
                got = "without it" if sub is None else f"whose {name} is a {type(sub).__name__}"
                raise TypeError(
                    f"module: expected an attention module with q_proj/k_proj/v_proj/o_proj (or qkv_proj/o_proj), "
                    f"each an nn.Linear or a PEFT wrapper of one; got {type(module).__name__} {got}"
                )
        config = getattr(module, "config", None)
        if config is None:
            raise TypeError(f"module: expected a transformers attention module with .config, got {type(module).__name__}")
        if getattr(module, "sliding_window", None) is not None:
            raise NotImplementedError(
                f"module: sliding-window attention (sliding_window={module.sliding_window}) is not supported by LlavitAttention"
            )
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_heads = config.num_attention_heads if fused else bases["q_proj"].out_features // head_dim
        num_kv_heads = (
            (bases["qkv_proj"].out_features // head_dim - num_heads) // 2 if fused else bases["k_proj"].out_features // head_dim
        )
        first = bases["qkv_proj" if fused else "q_proj"]
        kwargs = dict(
            hidden_size=first.in_features,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            qkv_bias=first.bias is not None,
            o_bias=bases["o_proj"].bias is not None,
            rope_theta=_rope_theta(config),
            layer_idx=getattr(module, "layer_idx", None),
            fused_qkv=fused,
            device="meta",  # every parameter is replaced below: allocate nothing
            dtype=first.weight.dtype,
        )
        kwargs.update(overrides)
        new = cls(**kwargs)
        new.scaling = float(getattr(module, "scaling", new.scaling))
        for name in names:
            setattr(new, name, getattr(module, name))
        for text_name, image_name in zip(new.text_projection_names, new.image_projection_names):
            setattr(new, image_name, _image_copy(getattr(module, text_name)))
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

        Plain ``nn.Linear`` projections: one fused routed op (RoPE in its epilogue). PEFT LoRA layers:
        the same fused op on their base weights, plus each modality's low-rank terms (text tokens get
        the text projections' adapters, image tokens the image ones'), then RoPE. Per-head q/k norms
        (``q_norm``/``k_norm`` submodules, as Qwen3 has) are applied before RoPE. Any other wrapper is
        called as a module (unfused, warned once).

        ``is_image``: the SpanLayout (its routing table is then built once per batch) or a bool mask.
        """
        image_mask = is_image.is_image if isinstance(is_image, SpanLayout) else is_image
        if torch.is_autocast_enabled(hidden_states.device.type):
            hidden_states = hidden_states.to(torch.get_autocast_dtype(hidden_states.device.type))
        text_modules, image_modules = self._qkv_modules()
        text_plans = [projection_plan(m) for m in text_modules]
        image_plans = text_plans if image_modules is text_modules else [projection_plan(m) for m in image_modules]
        qk_norm = getattr(self, "q_norm", None) is not None
        lead = hidden_states.shape[:-1]
        if any(p is None for p in text_plans + image_plans):
            _warn_unfused(type(self).__name__, [m for m, p in zip(text_modules + image_modules, text_plans + image_plans)
                                                if p is None])
            y_text = torch.cat([m(hidden_states) for m in text_modules], dim=-1)
            y_image = y_text if image_modules is text_modules else torch.cat([m(hidden_states) for m in image_modules], dim=-1)
            y = torch.where(image_mask[..., None], y_image, y_text)
            q, k, v = y.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                               self.num_kv_heads * self.head_dim], dim=-1)
            q = q.reshape(*lead, self.num_heads, self.head_dim)
            k = k.reshape(*lead, self.num_kv_heads, self.head_dim)
            v = v.reshape(*lead, self.num_kv_heads, self.head_dim)
            return self._finish_qk(q, k, v, cos, sin, qk_norm)
        text_linears = tuple(p[0] for p in text_plans)
        image_linears = text_linears if image_plans is text_plans else tuple(p[0] for p in image_plans)
        (w_t, b_t), (w_i, b_i) = self._fused_weights(hidden_states.dtype, text_linears, image_linears)
        delta_text = _low_rank_delta(hidden_states, text_plans)
        delta_image = delta_text if image_plans is text_plans else _low_rank_delta(hidden_states, image_plans)
        if delta_text is None and delta_image is None and not qk_norm:
            return modality_qkv(hidden_states, is_image, w_t, b_t, w_i, b_i, self.num_heads, self.num_kv_heads, cos, sin,
                                backend=self.backend)
        q, k, v = modality_qkv(hidden_states, is_image, w_t, b_t, w_i, b_i, self.num_heads, self.num_kv_heads,
                               backend=self.backend)
        if delta_text is not None or delta_image is not None:
            if delta_image is delta_text:
                delta = delta_text
            else:
                delta = torch.where(image_mask[..., None], 0.0 if delta_image is None else delta_image,
                                    0.0 if delta_text is None else delta_text)
            d_q, d_k, d_v = delta.to(q.dtype).split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], dim=-1)
            q = q + d_q.reshape(q.shape)
            k = k + d_k.reshape(k.shape)
            v = v + d_v.reshape(v.shape)
        return self._finish_qk(q, k, v, cos, sin, qk_norm)

    def _finish_qk(self, q, k, v, cos, sin, qk_norm):
        if qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q.contiguous(), k.contiguous(), v.contiguous()

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
            + (", fused_qkv=True" if self.fused_qkv else "")
        )

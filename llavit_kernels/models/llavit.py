"""LLaViT in one file: CLIP vision tower -> multi-layer features -> MLP projector -> Qwen2-style decoder.

The decoder is our own (RMSNorm, SwiGLU MLP, ``LlavitAttention`` in every layer) and loads Hugging
Face Qwen2 / Qwen2.5 checkpoints by a name mapping (``load_hf_qwen2_state_dict``). Ablation switches
live in :class:`LlavitConfig`: ``separate_image_qkv``, ``bidirectional_image``, ``feature_layers``.
Switching all three off (``feature_layers=[-2]``) gives LLaVA-1.5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layout import SpanLayout

from ..nn import LlavitAttention, LlavitKVCache

__all__ = [
    "TextConfig", "LlavitConfig", "RMSNorm", "Qwen2Decoder", "LlavitForConditionalGeneration",
    "default_feature_layers", "load_hf_qwen2_state_dict",
]

CONFIG_NAME = "llavit_config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------- config
@dataclass
class TextConfig:
    """The Qwen2 fields the decoder needs (names as in transformers' Qwen2Config)."""

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # Qwen2 has q/k/v biases

    @classmethod
    def from_hf(cls, hf_config) -> "TextConfig":
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope: only the default RoPE is supported, got rope_type={rope.get('rope_type')!r}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", True)),
        )


def default_feature_layers(num_vision_layers: int) -> List[int]:
    """Hidden-state indices (0 = embeddings, i = output of layer i) for LLaViT's local + global features.

    ViT-L/14 (24 layers): 5, 15, 23 as in the paper. 23 is the PENULTIMATE block, the global
    feature LLaVA-1.5 uses on its own (``[-2]``), so for other depths n the last index is n - 1 and
    the first two scale 5/24 and 15/24 of the depth: a 6-layer tiny tower gets 1, 4, 5 and a
    4-layer one 1, 2, 3. (The final block is never used, as in CLIP-based LLaVA.)
    """
    n = int(num_vision_layers)
    if n < 1:
        raise ValueError(f"num_vision_layers: expected >= 1, got {n}")
    if n == 24:
        return [5, 15, 23]
    top = max(1, n - 1)
    picked = [max(1, min(top, round(i * n / 24))) for i in (5, 15)] + [top]
    return sorted(set(picked))


@dataclass
class LlavitConfig:
    vision: dict = field(default_factory=dict)  # CLIPVisionConfig.to_dict() (or the kwargs of one)
    text: TextConfig = field(default_factory=TextConfig)
    feature_layers: Optional[List[int]] = None  # None: default_feature_layers(depth); [-2]: LLaVA-1.5
    separate_image_qkv: bool = True
    bidirectional_image: bool = True
    # Positive control of the ablation (the paper's "no LLM-side update of visual tokens"): each
    # image token attends to itself only, never to other image tokens; text attends as usual.
    block_image_to_image: bool = False
    image_token_id: int = 3
    pad_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)

    @property
    def num_vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", 24))

    @property
    def resolved_feature_layers(self) -> List[int]:
        layers = self.feature_layers or default_feature_layers(self.num_vision_layers)
        n = self.num_vision_layers
        for i in layers:
            if not -(n + 1) <= i <= n:
                raise ValueError(f"feature_layers: index {i} out of range for a {n}-layer vision tower "
                                 f"(hidden states 0..{n}, or negative)")
        return list(layers)

    @property
    def num_image_tokens(self) -> int:
        return (int(self.vision["image_size"]) // int(self.vision["patch_size"])) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vision"] = {k: v for k, v in self.vision.items() if _jsonable(v)}
        return d

    def save(self, directory: str):
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "LlavitConfig":
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return cls(**json.load(f))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, separate_image_qkv: bool, bidirectional_image: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlavitAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            qkv_bias=cfg.attention_bias, o_bias=False, separate_image_qkv=separate_image_qkv,
            bidirectional_image=bidirectional_image, rope_theta=cfg.rope_theta, layer_idx=layer_idx,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, layout, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), layout, position_embeddings=(cos, sin), kv_cache=kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Holds the names of transformers' ``Qwen2Model`` (embed_tokens, layers, norm)."""

    def __init__(self, cfg: TextConfig, separate_image_qkv: bool, bidirectional_image: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, separate_image_qkv, bidirectional_image) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2Decoder(nn.Module):
    """Qwen2-style causal LM whose state-dict keys equal transformers' ``Qwen2ForCausalLM`` keys."""

    def __init__(self, cfg: TextConfig, separate_image_qkv: bool = True, bidirectional_image: bool = True):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg, separate_image_qkv, bidirectional_image)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Qwen2's initialisation (normal(0, 0.02), zero biases, unit norms); image QKV copied from text."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for layer in self.model.layers:
            layer.self_attn.init_image_from_text()

    def rotary(self, position_ids: torch.Tensor, dtype):
        """RoPE tables of the decoder: the attention module's (one implementation; frequencies in
        float32 from ``rope_theta`` on every call, so ``model.to(torch.bfloat16)`` cannot round them)."""
        return self.model.layers[0].self_attn.rotary(position_ids, dtype)

    def forward(self, inputs_embeds: torch.Tensor, layout: SpanLayout, position_ids: torch.Tensor,
                kv_caches: Optional[List[LlavitKVCache]] = None) -> torch.Tensor:
        """Hidden states ``[B, T, d]`` or packed ``[N, d]`` -> logits of the same leading shape.

        ``kv_caches``: one :class:`LlavitKVCache` per layer for incremental decoding (padded only;
        ``layout`` then has ``past_length`` = the cache length).
        """
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            # (no checkpointing without autograd, nor with KV caches: generate() in training mode must fill them)
            if self.gradient_checkpointing and self.training and kv_caches is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, cos, sin, use_reentrant=False)
            else:
                x = layer(x, layout, cos, sin, None if kv_caches is None else kv_caches[i])
        return self.lm_head(self.model.norm(x))


def load_hf_qwen2_state_dict(decoder: Qwen2Decoder, hf_state: dict, strict: bool = True):
    """Copy a transformers Qwen2ForCausalLM state dict into ``decoder`` by name; init image QKV from text.

    The names already match (``model.layers.{i}.self_attn.q_proj.weight`` ...), so the mapping is the
    identity plus: ``lm_head.weight`` comes from ``embed_tokens`` when tied, and the image copies
    (``*_proj_image``) are initialised from the text projections.
    """
    own = decoder.state_dict()
    mapped, unexpected = {}, []
    for name, tensor in hf_state.items():
        name = name[len("language_model."):] if name.startswith("language_model.") else name
        if name in own:
            mapped[name] = tensor
        elif "rotary_emb" not in name:
            unexpected.append(name)
    if "lm_head.weight" not in mapped and "model.embed_tokens.weight" in mapped:
        mapped["lm_head.weight"] = mapped["model.embed_tokens.weight"]
    missing = [n for n in own if n not in mapped and "_proj_image." not in n]
    if strict and (missing or unexpected):
        raise ValueError(f"Qwen2 checkpoint does not match the decoder: missing {missing[:8]}, unexpected {unexpected[:8]}")
    decoder.load_state_dict(mapped, strict=False)
    for layer in decoder.model.layers:
        layer.self_attn.init_image_from_text()
    return missing, unexpected


# ---------------------------------------------------------------------------------------- LLaViT
class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _clip_vision_model(vision: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**vision))


class LlavitForConditionalGeneration(nn.Module):
    def __init__(self, config: LlavitConfig, vision_tower: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower if vision_tower is not None else _clip_vision_model(config.vision)
        d_vision = int(config.vision["hidden_size"])
        self.projector = Projector(d_vision * len(config.resolved_feature_layers), config.text.hidden_size)
        self.language_model = Qwen2Decoder(config.text, config.separate_image_qkv,
                                           config.bidirectional_image or config.block_image_to_image)
        if config.block_image_to_image:
            # the blocked mask is not an interval per KEY (image key k is seen by k itself and by the
            # text after its image): only the dense reference backend, which reads the per-query
            # intervals, computes it exactly
            for layer in self.language_model.model.layers:
                layer.self_attn.backend = "reference"

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_pretrained(cls, vision_path: str, llm_path: str, **switches) -> "LlavitForConditionalGeneration":
        """LLaViT from a local CLIP directory and a local Qwen2 directory (transformers format).

        ``switches`` are LlavitConfig fields (feature_layers, separate_image_qkv, bidirectional_image,
        image_token_id, ...). The projector is freshly initialised.
        """
        from safetensors.torch import load_file
        from transformers import AutoConfig, CLIPVisionModel

        vision_tower = CLIPVisionModel.from_pretrained(vision_path)
        hf_text = AutoConfig.from_pretrained(llm_path)
        switches.setdefault("eos_token_id", _first_int(getattr(hf_text, "eos_token_id", None), 2))
        switches.setdefault("pad_token_id", _first_int(getattr(hf_text, "pad_token_id", None), switches["eos_token_id"]))
        config = LlavitConfig(vision=vision_tower.config.to_dict(), text=TextConfig.from_hf(hf_text), **switches)
        model = cls(config, vision_tower=vision_tower)
        state = {}
        for fname in sorted(os.listdir(llm_path)):
            if fname.endswith(".safetensors"):
                state.update(load_file(os.path.join(llm_path, fname)))
        if not state:
            raise FileNotFoundError(f"llm_path: no *.safetensors weights in {llm_path}")
        load_hf_qwen2_state_dict(model.language_model, state)
        return model

    def save_pretrained(self, directory: str):
        """``llavit_config.json`` + ``model.safetensors`` (tied lm_head stored once)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.text.tie_word_embeddings:
            state.pop("language_model.lm_head.weight", None)
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str, map_location="cpu", **overrides) -> "LlavitForConditionalGeneration":
        """Load a checkpoint written by ``save_pretrained``; ``overrides`` change config switches."""
        from safetensors.torch import load_file

        config = LlavitConfig.load(directory)
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "language_model.lm_head.weight" and config.text.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int):
        """Grow (or shrink) the vocabulary, e.g. after adding ``<image>`` to a tokenizer; new rows ~ N(0, 0.02)."""
        lm, old = self.language_model, self.config.text.vocab_size
        if vocab_size == old:
            return
        emb = lm.model.embed_tokens
        new_emb = nn.Embedding(vocab_size, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        new_emb.weight.normal_(0.0, 0.02)
        n = min(old, vocab_size)
        new_emb.weight[:n] = emb.weight[:n]
        lm.model.embed_tokens = new_emb
        if self.config.text.tie_word_embeddings:
            lm.lm_head = nn.Linear(emb.embedding_dim, vocab_size, bias=False, device=emb.weight.device)
            lm.lm_head.weight = new_emb.weight
        else:
            head = nn.Linear(emb.embedding_dim, vocab_size, bias=False, device=emb.weight.device, dtype=emb.weight.dtype)
            head.weight.normal_(0.0, 0.02)
            head.weight[:n] = lm.lm_head.weight[:n]
            lm.lm_head = head
        self.config.text.vocab_size = vocab_size
        lm.config.vocab_size = vocab_size

    def set_gradient_checkpointing(self, enabled: bool = True):
        self.language_model.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n_images, 3, H, W]`` -> ``[n_images, patches, d_text]`` (CLS dropped)."""
        vision_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(vision_trainable and torch.is_grad_enabled()):
            out = self.vision_tower(pixel_values=pixel_values.to(self.vision_dtype), output_hidden_states=True)
            feats = torch.cat([out.hidden_states[i][:, 1:] for i in self.config.resolved_feature_layers], dim=-1)
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))

    @property
    def vision_dtype(self):
        return next(self.vision_tower.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        is_image = input_ids == self.config.image_token_id
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.language_model.model.embed_tokens(text_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = self.image_features(pixel_values).to(embeds.dtype)
            n_img_tokens = int(is_image.sum())  # one host sync per step, to give a clear error
            if n_img_tokens != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"input_ids have {n_img_tokens} image tokens but {feats.shape[0]} images give "
                                 f"{feats.shape[0] * feats.shape[1]} ({feats.shape[1]} per image)")
            embeds = embeds.masked_scatter(is_image[..., None], feats.reshape(-1, feats.shape[-1]))
        elif self.training and torch.is_grad_enabled() and any(
                p.requires_grad for m in (self.projector, self.vision_tower) for p in m.parameters()):
            # A text-only batch (LLaVA data has some): run one blank image through the vision path with
            # weight 0, so every trainable parameter still takes part in the step. DDP (no
            # find_unused_parameters) fails on the next step when a trainable parameter got no gradient.
            size = int(self.config.vision["image_size"])
            blank = torch.zeros(1, 3, size, size, device=embeds.device)
            embeds = embeds + 0.0 * self.image_features(blank).sum().to(embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, cu_seqlens=None,
                labels=None):
        """Logits (and the mean loss over ``labels != -100`` when given).

        Padded: ``input_ids [B, T]`` with ``attention_mask [B, T]`` (left or right padding).
        Packed: ``input_ids [N]`` with ``cu_seqlens [B+1]`` and ``position_ids [N]`` restarting per
        document. ``labels`` are per-token targets already aligned to the next token (the collators
        shift them), so padded and packed batches give the same loss.
        """
        is_image = input_ids == self.config.image_token_id
        if cu_seqlens is not None:
            layout = SpanLayout.from_packed(is_image, cu_seqlens)
            if self.config.block_image_to_image:
                layout = block_image_to_image(layout)
            if position_ids is None:
                raise ValueError("position_ids: required with cu_seqlens (positions restart per document)")
        else:
            layout = SpanLayout.from_image_mask(is_image, attention_mask)
            if self.config.block_image_to_image:
                layout = block_image_to_image(layout)
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                else:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.language_model(self.embed(input_ids, pixel_values), layout, position_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 16,
                 eos_token_id: Optional[int] = None):
        """Greedy decoding with the attention modules' KV cache.

        ``input_ids [B, T]`` left-padded (``attention_mask`` 1 keep / 0 pad). The prompt (images
        included) is one prefill step, so every image span stays bidirectional. Returns the new
        tokens ``[B, <= max_new_tokens]``; rows that finished hold ``pad_token_id`` after their eos.
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm = self.language_model
        caches = [LlavitKVCache() for _ in lm.model.layers]
        is_image = input_ids == self.config.image_token_id
        mask = attention_mask.long()
        layout = SpanLayout.from_image_mask(is_image, mask)
        if self.config.block_image_to_image:
            layout = block_image_to_image(layout)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm(self.embed(input_ids, pixel_values), layout, pos, caches)[:, -1]
        out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).masked_fill(done, pad)
            out.append(nxt)
            done = done | (nxt == eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            # the mask only grew by a column of ones since the prompt's was validated: skip the sync
            layout = SpanLayout.from_image_mask(torch.zeros_like(nxt[:, None], dtype=torch.bool), mask,
                                                past_length=caches[0].length, validate=False)
            pos = pos[:, -1:] + 1
            emb = lm.model.embed_tokens(nxt.masked_fill(nxt == self.config.image_token_id, 0))[:, None]
            logits = lm(emb, layout, pos, caches)[:, -1]
        return torch.stack(out, 1)


def block_image_to_image(layout: SpanLayout) -> SpanLayout:
    """The ablation's positive control: every image query attends to itself only (no other image
    token, nor the text before its image); text queries keep their intervals.

    Only the per-QUERY intervals are exact (what the dense reference backend reads); the per-key
    intervals are left as they were (a superset), since the blocked mask is not an interval per key.
    """
    n = layout.num_queries
    idx = torch.arange(n, device=layout.device, dtype=torch.int32) + layout.query_offset
    if not layout.packed:
        idx = idx.expand_as(layout.kv_start)
    kv_start = torch.where(layout.is_image, idx, layout.kv_start).contiguous()
    kv_end = torch.where(layout.is_image, idx + 1, layout.kv_end).contiguous()
    return dataclasses.replace(layout, kv_start=kv_start, kv_end=kv_end)


def _first_int(value, default):
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)

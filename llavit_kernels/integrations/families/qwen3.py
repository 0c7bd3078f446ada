"""Qwen3: Llama-style q/k/v/o plus per-head RMSNorms of q and k (``q_norm``/``k_norm``) before RoPE.

The converted module keeps the stock norms (shared by text and image tokens, like o_proj): the
routed projection runs fused without RoPE, then the norms, then RoPE (see LlavitAttention.project_qkv).
"""

from . import TextFamily


def _convert(module, **switches):
    from ..transformers import HFLlavitAttention

    new = HFLlavitAttention.from_attention(module, **switches)
    new.q_norm, new.k_norm = module.q_norm, module.k_norm
    return new


def _qwen3():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    return (Qwen3Attention,)


FAMILIES = (TextFamily("Qwen3", ("qwen3",), ("Qwen3ForCausalLM", "Qwen3Model"), _qwen3, _convert),)

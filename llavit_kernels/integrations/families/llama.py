"""Llama, Qwen2, Mistral: separate q/k/v/o projections, RoPE from the model's rotary embedding."""

from . import TextFamily, check_sliding_window


def _convert(module, **switches):
    from ..transformers import HFLlavitAttention

    return HFLlavitAttention.from_attention(module, **switches)


def _convert_mistral(module, **switches):
    check_sliding_window(getattr(module.config, "sliding_window", None), module.config, "Mistral")
    return _convert(module, **switches)


def _llama():
    from transformers.models.llama.modeling_llama import LlamaAttention

    return (LlamaAttention,)


def _qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return (Qwen2Attention,)


def _mistral():
    from transformers.models.mistral.modeling_mistral import MistralAttention

    return (MistralAttention,)


FAMILIES = (
    TextFamily("Qwen2 / Qwen2.5", ("qwen2",), ("Qwen2ForCausalLM", "Qwen2Model"), _qwen2, _convert),
    TextFamily("Llama", ("llama",), ("LlamaForCausalLM", "LlamaModel"), _llama, _convert),
    TextFamily("Mistral", ("mistral",), ("MistralForCausalLM", "MistralModel"), _mistral, _convert_mistral),
)

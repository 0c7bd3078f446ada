"""Phi-3 / Phi-3.5: one fused ``qkv_proj`` (rows q | k | v); its image copy is ``qkv_proj_image``.

The fused weight goes into the routed projection as it is (no concatenation). Partial rotary
(``partial_rotary_factor < 1``, Phi-4-mini) is refused; a sliding window longer than the context
(Phi-3.5-mini) never binds and is ignored, a shorter one (Phi-3-mini-4k: 2047) is refused.
"""

from . import TextFamily, check_sliding_window


def _convert(module, **switches):
    from ..transformers import HFLlavitAttention

    config = module.config
    check_sliding_window(getattr(config, "sliding_window", None), config, "Phi-3")
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if factor is not None and float(factor) != 1.0:
        raise NotImplementedError(
            f"model: Phi-3 with partial_rotary_factor={factor} is not supported (RoPE on part of the head dim)"
        )
    return HFLlavitAttention.from_attention(module, **switches)


def _phi3():
    from transformers.models.phi3.modeling_phi3 import Phi3Attention

    return (Phi3Attention,)


FAMILIES = (TextFamily("Phi-3 / Phi-3.5", ("phi3",), ("Phi3ForCausalLM", "Phi3Model"), _phi3, _convert),)

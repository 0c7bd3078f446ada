"""Converting Hugging Face models in place (see ``families`` for the supported ones). Needs
transformers >= MIN_TRANSFORMERS (its AttentionInterface and masking utilities)."""

MIN_TRANSFORMERS = "4.53"  # the floor setup.py declares (tests/test_integration_transformers.py checks they agree)


def _check_transformers() -> None:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"llavit_kernels.integrations needs transformers>={MIN_TRANSFORMERS}; it is not installed "
            "(pip install 'llavit-kernels[train]')"
        ) from error
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import create_causal_mask  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"llavit_kernels.integrations needs transformers>={MIN_TRANSFORMERS} (AttentionInterface and "
            f"masking_utils.create_causal_mask); found transformers {transformers.__version__}. Upgrade with "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'"
        ) from error


_check_transformers()

from . import transformers as _hf  # noqa: E402
from .transformers import (  # noqa: E402
    HFLlavitAttention,
    LlavitLayoutSource,
    apply_llavit,
    apply_llavit_mask,
    from_pretrained,
    llavit_attention_forward,
    llavit_peft_modules,
    llavit_state_dict,
    load_llavit_weights,
    register_llavit_attention,
)

__all__ = [name for name in _hf.__all__ if name != "LAYOUT_KWARG"] + ["MIN_TRANSFORMERS"]

"""The MPDiT model family (pure torch.nn)."""
from .layers import ATTENTION_BACKENDS, flash_attn_available
from .mpdit import MODEL_CONFIGS, MPDiT, ModelArgs, Stage, count_parameters, create_model, model_args

__all__ = [
    "ATTENTION_BACKENDS",
    "MODEL_CONFIGS",
    "MPDiT",
    "ModelArgs",
    "Stage",
    "count_parameters",
    "create_model",
    "flash_attn_available",
    "load_official",
    "model_args",
]


def load_official(*args, **kwargs):
    """See ``mpdit_dist.models.official.load_official``."""
    from .official import load_official as _load

    return _load(*args, **kwargs)

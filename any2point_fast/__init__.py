"""any2point-fast: frozen pretrained transformers of any modality as 3D point-cloud models.

The public API is what this module exports; everything else may change.

- :class:`Any2PointModel` wraps a Hugging Face backbone (CLIP text, BERT/RoBERTa/MiniLM,
  ViT/DeiT, DINOv2, AST): tokenizer + virtual projection + frozen blocks with one guided adapter
  each + head; ``from_pretrained`` / ``save_pretrained`` (adapter-only safetensors checkpoints).
- :class:`Any2PointAdapter`, :class:`VirtualProjection` and :class:`ViewAttention`: the pieces,
  as drop-in modules for your own transformer block loop.
- :class:`Any2PointConfig`: every hyper-parameter, with the three published recipes as presets.
- :func:`set_backend` / :func:`use_backend`: ``"auto" | "triton" | "torch" | "reference"`` for the
  fused ops; :func:`available_backends` tells which run here and why not.
- :class:`StandInModel` / :class:`ReferenceModel`: the whole method on a small random frozen
  stand-in transformer, on the fused ops, or in the oracle's code (:mod:`any2point_fast.reference`,
  imported only when ``ReferenceModel`` is first asked for: the library itself never runs it).
"""

from importlib import import_module

from .adapter import Any2PointAdapter
from .config import Any2PointConfig, ConfigError
from .ops import BackendError, available_backends, get_backend, set_backend, use_backend
from .projection import VirtualProjection
from .validation import InputError
from .view_attention import ViewAttention

__version__ = "0.1.0"

# Importing transformers takes seconds: the Hugging Face side loads on first use; so does the oracle.
_LAZY = {
    "ReferenceModel": "reference",
    "Any2PointModel": "model",
    "StandInModel": "model",
    "UnsupportedBackboneError": "backbones",
    "register_backbone": "backbones",
    "supported_model_types": "backbones",
    "BackboneMismatchError": "checkpoint",
    "CheckpointError": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Any2PointAdapter",
    "Any2PointConfig",
    "BackendError",
    "ConfigError",
    "InputError",
    "VirtualProjection",
    "ViewAttention",
    "__version__",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    *_LAZY,
]

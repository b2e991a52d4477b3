"""Backbone attention: xformers ``memory_efficient_attention`` on CUDA in fp16/bf16, PyTorch SDPA elsewhere.

Integrated through transformers' attention-function registry, not by patching model code: two
functions are registered with :class:`transformers.AttentionInterface` (and the SDPA mask builder
with :class:`transformers.AttentionMaskInterface`, so the model's own forward still builds
padding/causal masks under these names):

- ``"any2point"`` — chooses per call: xformers when it can run the call (see
  :func:`xformers_not_supported_reasons`), otherwise transformers' own SDPA function;
- ``"any2point_xformers"`` — xformers only; a call it cannot run raises, listing why.

Every HF attention module this library wraps calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)``, so selecting an
implementation is setting the model's ``attn_implementation`` (``from_pretrained(...,
attn_implementation=...)`` or ``model.set_attn_implementation(...)``), which
:func:`set_attention_implementation` does with the user-facing names of :data:`ATTN_IMPLEMENTATIONS`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

#: User-facing choices: ``auto`` (xformers on CUDA fp16/bf16, SDPA elsewhere), ``xformers`` (only),
#: and transformers' own ``sdpa`` / ``eager``. Any other name registered with transformers
#: (e.g. ``"flash_attention_2"``) is passed through unchanged.
ATTN_IMPLEMENTATIONS = ("auto", "xformers", "sdpa", "eager")
AUTO_NAME = "any2point"
XFORMERS_NAME = "any2point_xformers"
XFORMERS_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """The requested attention implementation cannot run (the message lists why)."""


@functools.lru_cache(maxsize=1)
def _xformers_ops() -> Any | str:
    """``xformers.ops``, or why it cannot be imported."""
    try:
        return importlib.import_module("xformers.ops")
    except Exception as error:  # ImportError, or a broken build raising at import time
        return f"xformers is not importable ({type(error).__name__}: {error})"


def xformers_available() -> bool:
    return not isinstance(_xformers_ops(), str)


def xformers_not_supported_reasons(query: torch.Tensor, key: torch.Tensor | None = None,
                                   attention_mask: torch.Tensor | None = None, **kwargs: Any) -> list[str]:
    """Why the xformers path cannot run this call (empty when it can).

    ``query``/``key`` are in transformers' layout ``[B, heads, T, head_dim]``.
    """
    reasons = []
    if query.device.type != "cuda":
        reasons.append(f"tensors on {query.device.type}; xformers runs on CUDA")
    if query.dtype not in XFORMERS_DTYPES:
        reasons.append(f"dtype {query.dtype}; the xformers path is for float16/bfloat16")
    if attention_mask is not None:
        reasons.append("an attention mask was given (masked calls go to SDPA)")
    if key is not None and key.shape[1] != query.shape[1]:
        reasons.append(f"grouped key/value heads ({key.shape[1]} vs {query.shape[1]} query heads)")
    if kwargs.get("output_attentions"):
        reasons.append("output_attentions was requested (xformers returns no weights)")
    if not reasons and not xformers_available():  # import only when it would be used
        reasons.append(_xformers_ops())
    return reasons


def select_kernel(query: torch.Tensor, key: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                  **kwargs: Any) -> str:
    """``"xformers"`` or ``"sdpa"``: what ``"auto"`` runs for this call."""
    return "sdpa" if xformers_not_supported_reasons(query, key, attention_mask, **kwargs) else "xformers"


def xformers_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature on xformers: ``[B, H, T, D]`` in, ``[B, T, H, D]`` out."""
    reasons = xformers_not_supported_reasons(query, key, attention_mask, **kwargs)
    if reasons:
        raise AttentionBackendError("attn_implementation='xformers' cannot run this call: " + "; ".join(reasons))
    ops = _xformers_ops()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    bias = ops.LowerTriangularMask() if causal and query.shape[2] > 1 else None
    out = ops.memory_efficient_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_bias=bias, p=dropout, scale=scaling)
    return out, None


def _sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention function (indirection kept so tests can observe the dispatch)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def any2point_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attn_implementation="auto"``: xformers where :func:`select_kernel` allows it, SDPA otherwise."""
    if select_kernel(query, key, attention_mask, **kwargs) == "xformers":
        return xformers_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
    return _sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)


def register() -> None:
    """Register both functions (and the SDPA mask builder for them) with transformers. Idempotent."""
    for name, function in ((AUTO_NAME, any2point_attention_forward), (XFORMERS_NAME, xformers_attention_forward)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def resolve_attn_implementation(name: str | None) -> str:
    """The transformers registry name for a user-facing choice (``None`` = ``"auto"``).

    Raises:
        AttentionBackendError: ``"xformers"`` requested but xformers does not import.
    """
    register()
    name = "auto" if name is None else name
    if name == "auto":
        return AUTO_NAME
    if name == "xformers":
        if not xformers_available():
            raise AttentionBackendError(f"attn_implementation='xformers' requested but {_xformers_ops()}; "
                                        "install any2point-fast[cuda] or use 'auto'")
        return XFORMERS_NAME
    return name


def set_attention_implementation(model: nn.Module, name: str | None) -> str:
    """Select ``name`` (see :data:`ATTN_IMPLEMENTATIONS`) on an HF ``PreTrainedModel``; returns the registry name."""
    resolved = resolve_attn_implementation(name)
    if getattr(model.config, "_attn_implementation", None) != resolved:
        model.set_attn_implementation(resolved)
    return resolved


register()

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "AUTO_NAME",
    "AttentionBackendError",
    "XFORMERS_NAME",
    "any2point_attention_forward",
    "register",
    "resolve_attn_implementation",
    "select_kernel",
    "set_attention_implementation",
    "xformers_attention_forward",
    "xformers_available",
    "xformers_not_supported_reasons",
]

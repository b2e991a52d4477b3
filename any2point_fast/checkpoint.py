"""Adapter-only checkpoints, PEFT-style: ``adapter_model.safetensors`` + ``adapter_config.json``.

The weights file holds every trainable parameter and the buffers of the trainable BatchNorm
layers (running statistics), each tensor once: the view attention shared by all adapters is
stored under its canonical name ``view_attention.*``. Nothing of the frozen backbone is stored;
``adapter_config.json`` names it (``base_model_name_or_path``, ``model_type``, ``revision``,
``commit_hash``) and fingerprints it (width, depth, PE shape and a hash of the PE values), so a
checkpoint restored onto a different backbone is refused instead of silently producing garbage.

Each file is written atomically (a temporary file beside it, fsynced, then :func:`os.replace`), so a
save killed at any point leaves each file either as it was or complete. The weights file's metadata
holds the sha256 of its tensors, checked on load: a truncated or modified file is refused.

Only safetensors is read or written; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .atomic_io import atomic_write_bytes

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FORMAT = "any2point-adapter"
FORMAT_VERSION = 1
#: ``head.type`` of ``adapter_config.json`` -> the loader of such checkpoints. A checkpoint without a
#: ``head`` (saved before head types were recorded) holds a classification head.
HEAD_LOADERS = {
    "classification": "Any2PointModel.from_pretrained",
    "partseg": "PartSegmentationModel.from_pretrained",
}


class CheckpointError(ValueError):
    """A checkpoint (adapter-only or training) is missing, truncated, tampered with, malformed, or does
    not fit the model. The message names the file."""


class BackboneMismatchError(CheckpointError):
    """An adapter checkpoint is being restored onto a backbone other than the one it was trained on."""


def fingerprint(pe_table: torch.Tensor, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """What identifies a backbone to its adapters.

    The PE hash is taken over the values rounded to bfloat16, so the same pretrained weights loaded
    in float32 or bfloat16 give the same fingerprint, while other weights do not.
    """
    values = pe_table.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    return {
        "hidden_size": int(hidden_size),
        "num_layers": int(num_layers),
        "pe_shape": list(pe_table.shape),
        "pe_sha256": hashlib.sha256(values.numpy().tobytes()).hexdigest(),
    }


def compare_fingerprints(saved: dict[str, Any], found: dict[str, Any] | str) -> list[str]:
    """Human-readable differences (empty when the backbones match); ``found`` may be a reason string."""
    if isinstance(found, str):
        return [found]
    labels = {"hidden_size": "hidden size", "num_layers": "layers", "pe_shape": "PE shape", "pe_sha256": "PE values"}
    problems = []
    for key, label in labels.items():
        if saved.get(key) != found.get(key):
            if key == "pe_sha256":
                problems.append("PE values differ (different pretrained weights)")
            else:
                problems.append(f"{label} {saved.get(key)} in the checkpoint, {found.get(key)} in the backbone")
    return problems


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + buffers of trainable BatchNorm layers, each shared tensor once.

    Names are those of ``model.named_parameters()`` / ``named_modules()``, which list a shared
    tensor or module under the first name it was registered with.
    """
    state = {name: param for name, param in model.named_parameters() if param.requires_grad}
    for module_name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and all(p.requires_grad for p in own):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                state[f"{module_name}.{buffer_name}"] = buffer
    return state


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of the name, dtype, shape and bytes of each tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_config: dict[str, Any]) -> None:
    """Write ``adapter_model.safetensors``, then ``adapter_config.json``, atomically into ``directory`` (created).

    The weights' metadata records :func:`tensors_sha256` of the tensors under ``sha256``. The config
    records the head under ``head`` (``{"type": "classification"}`` unless ``adapter_config`` has one).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in adapter_state_dict(model).items()}
    metadata = {"format": "pt", "producer": FORMAT, "sha256": tensors_sha256(tensors)}
    atomic_write_bytes(directory / ADAPTER_WEIGHTS_NAME, safetensors_save(tensors, metadata=metadata))
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "head": {"type": "classification"},
               **adapter_config}
    atomic_write_bytes(directory / ADAPTER_CONFIG_NAME, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_adapter_config(directory: str | os.PathLike, head_type: str = "classification") -> dict[str, Any]:
    """The checked content of ``adapter_config.json``, whose head must be of ``head_type`` (a key of
    :data:`HEAD_LOADERS`; the error names the loader of the head it holds)."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else f"none, a JSON {type(data).__name__}"
        raise CheckpointError(f"{path} is not an Any2Point adapter config (format {found!r})")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this library reads up to {FORMAT_VERSION}")
    missing = [k for k in ("config", "backbone_fingerprint", "base_model_name_or_path", "model_type") if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    malformed = [k for k in ("config", "backbone_fingerprint") if not isinstance(data[k], dict)]
    if malformed:
        raise CheckpointError(f"{path}: {malformed} must be JSON objects")
    head = data.setdefault("head", {"type": "classification"})
    if not isinstance(head, dict) or head.get("type") not in HEAD_LOADERS:
        raise CheckpointError(f"{path}: 'head' must be a JSON object whose 'type' is one of {list(HEAD_LOADERS)}, "
                              f"found {head!r}")
    if head["type"] != head_type:
        raise CheckpointError(f"{path} holds a {head['type']} head, not a {head_type} one: load it with "
                              f"{HEAD_LOADERS[head['type']]}")
    return data


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy ``adapter_model.safetensors`` into ``model``'s adapter state, strictly (same names, same shapes)."""
    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    loaded = _read_weights(path)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    wrong = sorted(k for k in set(expected) & set(loaded) if expected[k].shape != loaded[k].shape)
    if missing or unexpected or wrong:
        details = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                   "shape mismatch " + ", ".join(f"{k}: {tuple(loaded[k].shape)} saved vs "
                                                 f"{tuple(expected[k].shape)} in the model" for k in wrong)
                   if wrong else ""]
        raise CheckpointError(f"{path} does not fit this model: " + "; ".join(d for d in details if d))
    with torch.no_grad():
        for name, tensor in loaded.items():
            expected[name].copy_(tensor)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, checked against the ``sha256`` of its metadata (files saved before
    this check existed have none)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            loaded = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from error
    if "sha256" in metadata and tensors_sha256(loaded) != metadata["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the weights were modified or corrupted after saving")
    return loaded


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BackboneMismatchError",
    "CheckpointError",
    "HEAD_LOADERS",
    "adapter_state_dict",
    "compare_fingerprints",
    "fingerprint",
    "load_adapter_weights",
    "read_adapter_config",
    "save_adapter",
    "tensors_sha256",
]

"""Training checkpoints: safetensors + JSON only, written atomically, verified on load.

A checkpoint is a directory::

    checkpoints/epoch-0003-step-000114/
        model.safetensors            trainable weights and BatchNorm buffers
        training_state.safetensors   optimizer tensors (AdamW moments, steps) and RNG state tensors
        manifest.json                everything else: format, sha256 and size of each file, epoch, step,
                                     optimizer structure, scheduler/scaler state, Python/NumPy RNG,
                                     the run config and its metrics; written last

Nothing is ever read with ``torch.load`` or ``pickle``: a checkpoint file cannot execute code.
Every file is written to a temporary file in its own directory, flushed, fsynced and moved into
place with :func:`os.replace`; the directory is assembled under a temporary name and renamed
when complete; the ``latest`` and ``best`` names are symbolic links swapped atomically (on
systems without symbolic links, a one-line ``<name>.ref`` file replaced atomically). A save
interrupted at any point leaves the previous ``latest`` untouched.

On load, the manifest's sha256 and size of every file are checked before it is parsed, and a
file that is not valid safetensors is refused: both raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .atomic_io import atomic_write, atomic_write_bytes, fsync_dir
from .checkpoint import CheckpointError

FORMAT = "any2point-fast/train-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.safetensors"


# ----------------------------------------------------------------------------------- safetensors files
def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` atomically as a safetensors file; returns the file's sha256 (hex)."""
    digest: list[str] = []

    def write(handle: BinaryIO) -> None:
        data = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        digest.append(hashlib.sha256(data).hexdigest())
        handle.write(data)

    atomic_write(path, write)
    return digest[0]


def read_safetensors(path: str | Path, sha256: str | None = None, size: int | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its ``size`` and ``sha256`` first when given.

    Raises:
        CheckpointError: the file is missing, its size or checksum differs, or it does not parse.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint file ({error})") from error
    if size is not None and len(data) != size:
        raise CheckpointError(f"{path}: truncated or modified checkpoint file ({len(data)} bytes, expected {size})")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path}: checksum mismatch, the checkpoint file was modified or corrupted")
    try:
        return safetensors_load(data)
    except Exception as error:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from error


# ---------------------------------------------------------------------------------- optimizer, RNG state
def flatten_optimizer_state(state_dict: dict[str, Any], prefix: str = "optimizer") -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for param_id, entries in state_dict["state"].items():
        slot: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{param_id}.{key}"] = value
                slot[key] = {"tensor": f"{prefix}.state.{param_id}.{key}"}
            else:
                slot[key] = {"value": value}
        state[str(param_id)] = slot
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(structure: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state = {}
    for param_id, slot in structure["state"].items():
        state[int(param_id)] = {
            key: tensors[entry["tensor"]] if "tensor" in entry else entry["value"] for key, entry in slot.items()
        }
    return {"state": state, "param_groups": structure["param_groups"]}


def capture_rng_state(device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch CPU (and CUDA ``device``) as tensors, Python and NumPy as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }


def restore_rng_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any],
                      device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    if device is not None and device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    version, internal, gauss = structure["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = structure["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    """A loaded, verified checkpoint: the manifest and the tensors of its two files."""

    path: Path
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def _checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory named by ``path``: itself, or a run directory's ``latest``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = resolve_pointer(path, "latest")
    if latest is not None:
        return latest
    if path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}) and no 'latest' checkpoint inside")
    raise CheckpointError(f"{path}: checkpoint not found")


def save_checkpoint(checkpoints_dir: str | Path, name: str, model: dict[str, torch.Tensor],
                    state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write checkpoint ``checkpoints_dir/name`` atomically and return its path.

    The files are written into a hidden temporary directory, the manifest (with each file's
    sha256 and size) last, and the directory is renamed into place when complete. A stale
    directory of the same name (left by an earlier run that was killed before pointing
    ``latest`` at it) is replaced.
    """
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        files = {}
        for filename, tensors in ((MODEL_FILE, model), (STATE_FILE, state)):
            digest = write_safetensors(tmp / filename, tensors)
            files[filename] = {"sha256": digest, "size": (tmp / filename).stat().st_size}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, **manifest}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The verified-format manifest of the checkpoint at ``path`` (files not read)."""
    directory = _checkpoint_dir(path)
    file = directory / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable checkpoint manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an any2point-fast training checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {manifest.get('format_version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    return manifest


def load_checkpoint(path: str | Path, with_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint directory (or a run directory's ``latest``).

    Raises:
        CheckpointError: missing/corrupt manifest, a file whose size or sha256 differs from the
            manifest, or a file that is not valid safetensors.
    """
    directory = _checkpoint_dir(path)
    manifest = read_manifest(directory)
    files = manifest.get("files", {})
    loaded = {}
    for filename in (MODEL_FILE, STATE_FILE) if with_state else (MODEL_FILE,):
        entry = files.get(filename)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"{directory / MANIFEST}: no checksum for {filename}")
        loaded[filename] = read_safetensors(directory / filename, entry["sha256"], entry.get("size"))
    return Checkpoint(directory, manifest, loaded[MODEL_FILE], loaded.get(STATE_FILE, {}))


# ------------------------------------------------------------------------------- latest / best pointers
def point(run_dir: str | Path, name: str, target: str | Path) -> None:
    """Atomically make ``run_dir/name`` refer to the checkpoint directory ``target``.

    A relative symbolic link swapped with :func:`os.replace`; where symbolic links are not
    available, a ``name.ref`` text file holding the relative path, replaced atomically.
    """
    run_dir = Path(run_dir)
    relative = os.path.relpath(Path(target), run_dir)
    tmp = run_dir / f".{name}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(relative, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):
        atomic_write_bytes(run_dir / f"{name}.ref", relative.encode())
        return
    os.replace(tmp, run_dir / name)
    fsync_dir(run_dir)


def resolve_pointer(run_dir: str | Path, name: str) -> Path | None:
    """The checkpoint directory ``run_dir/name`` refers to, or None when there is none."""
    run_dir = Path(run_dir)
    link = run_dir / name
    if link.is_symlink() or link.is_dir():
        return link.resolve() if link.exists() else None
    ref = run_dir / f"{name}.ref"
    if ref.is_file():
        target = (run_dir / ref.read_text().strip()).resolve()
        return target if target.is_dir() else None
    return None


def prune_checkpoints(run_dir: str | Path, checkpoints_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, never one that ``latest`` or ``best`` names."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return
    pinned = {p for p in (resolve_pointer(run_dir, "latest"), resolve_pointer(run_dir, "best")) if p is not None}
    complete = sorted(d for d in root.iterdir() if not d.name.startswith(".") and (d / MANIFEST).is_file())
    for directory in complete[: max(0, len(complete) - keep)]:
        if directory.resolve() not in pinned:
            shutil.rmtree(directory, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | Path, checkpoints_dir: str | Path) -> None:
    """Delete what an interrupted save left behind: hidden ``*.tmp`` files, links and directories."""
    for folder in (Path(run_dir), Path(checkpoints_dir)):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


__all__ = [
    "Checkpoint", "CheckpointError", "capture_rng_state",
    "flatten_optimizer_state", "load_checkpoint", "point", "prune_checkpoints", "read_manifest",
    "read_safetensors", "remove_stale_temporaries", "resolve_pointer", "restore_rng_state", "save_checkpoint",
    "unflatten_optimizer_state", "write_safetensors",
]

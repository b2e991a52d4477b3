"""Checked reading of the HDF5 point-cloud files of ModelNet40 and ScanObjectNN."""

from pathlib import Path

import h5py
import numpy as np

from .errors import DatasetError


def read_h5_clouds(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read ``data`` (float32 ``[n, P, 3]``, n and P >= 1) and ``label`` (int64 ``[n]``) from one file.

    ``label`` may be stored as ``[n]`` or ``[n, 1]``; every label must lie in
    ``0..num_classes-1``. Raises DatasetError naming ``path`` for anything else.
    """
    data = read_h5_key(path, "data", "[n, P, 3]")
    labels = read_h5_key(path, "label", "[n] or [n, 1]")
    if data.ndim != 3 or 0 in data.shape or data.shape[2] != 3 or not np.issubdtype(data.dtype, np.floating):
        raise DatasetError(
            f"{path}: expected key 'data' with shape [n, P, 3] of floats (n, P >= 1), "
            f"found shape {list(data.shape)} of {data.dtype}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: expected key 'label' with shape [{len(data)}] or [{len(data)}, 1] of "
            f"integers, found shape {list(labels.shape)} of {labels.dtype}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetError(
            f"{path}: label {labels[bad[0]]} at row {bad[0]} is outside the "
            f"{num_classes} classes (expected 0..{num_classes - 1})"
        )
    if not np.isfinite(data).all():
        raise DatasetError(f"{path}: key 'data' contains non-finite (nan or inf) values")
    return data.astype(np.float32, copy=False), labels.astype(np.int64)


def read_h5_key(path: Path, key: str, shape: str) -> np.ndarray:
    """The whole array stored under ``key`` in the HDF5 file ``path``; a DatasetError naming ``path``
    for a missing or unreadable file, or a missing key (listing the keys found and the ``shape`` expected)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as file:
            if key not in file or not isinstance(file[key], h5py.Dataset):
                raise DatasetError(f"{path}: expected key {key!r} with shape {shape}, found keys {sorted(file.keys())}")
            return file[key][()]
    except DatasetError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, RuntimeError, TypeError, ... on a corrupt file
        raise DatasetError(f"{path}: cannot read as HDF5 (corrupt or truncated file?): {err}") from err

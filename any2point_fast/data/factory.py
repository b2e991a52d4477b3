"""build_dataset: construct any dataset of the library by name."""

from pathlib import Path

from .base import PointCloudDataset
from .folder import PointFolder
from .modelnet import ModelNet40H5, ModelNet40Resampled
from .scanobjectnn import ScanObjectNN
from .synthetic import SyntheticShapes
from .transforms import Transform

DATASETS = {
    "modelnet40_h5": ModelNet40H5,
    "modelnet40_resampled": ModelNet40Resampled,
    "scanobjectnn": ScanObjectNN,
    "folder": PointFolder,
    "synthetic": SyntheticShapes,
}


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str | None,
    num_points: int = 1024,
    transform: Transform | None = None,
    **options,
) -> PointCloudDataset:
    """The dataset ``name`` (a key of DATASETS) for ``split``, with ``[num_points, 3]`` items.

    ``options`` go to the dataset's constructor (``variant`` for "scanobjectnn"; ``mesh_points``
    and ``seed`` for "folder"; ``num_samples``, ``seed`` and ``rotation`` for "synthetic").
    "synthetic" needs no ``root`` (pass None); "folder" takes ``split=None`` for a
    ``<root>/<class>/`` layout and a split name for ``<root>/<class>/<split>/``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}, expected one of {list(DATASETS)}")
    kwargs = {"split": split, "num_points": num_points, "transform": transform, **options}
    if name == "synthetic":
        if root is not None:
            raise ValueError(f"dataset 'synthetic' is generated, it takes no root (got {root!r})")
        return SyntheticShapes(**kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    return DATASETS[name](root, **kwargs)

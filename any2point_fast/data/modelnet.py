"""ModelNet40 in its two common distributions: the 2048-point HDF5 files and the resampled txt."""

from pathlib import Path

import numpy as np

from .base import FileDataset, InMemoryDataset, check_split, dataset_dir, read_name_list
from .errors import DatasetError
from .h5 import read_h5_clouds
from .transforms import Transform

# The order of shape_names.txt in both distributions (alphabetical).
MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard",
    "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio",
    "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase",
    "wardrobe", "xbox",
)  # fmt: skip


class ModelNet40H5(InMemoryDataset):
    """``modelnet40_ply_hdf5_2048/ply_data_{split}*.h5`` (keys ``data`` [n, 2048, 3], ``label``).

    ``root`` is that folder or its parent. Class names come from ``shape_names.txt`` in the
    folder when present, else :data:`MODELNET40_CLASSES`. All files are loaded into memory.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_points: int | None = 1024,
        transform: Transform | None = None,
    ):
        super().__init__(num_points, transform)
        folder = dataset_dir(root, "modelnet40_ply_hdf5_2048")
        pattern = f"ply_data_{check_split(split)}*.h5"
        files = sorted(folder.glob(pattern))
        if not files:
            raise DatasetError(f"{folder}: no files matching {pattern!r}")
        names_file = folder / "shape_names.txt"
        self.classes = read_name_list(names_file) if names_file.exists() else [*MODELNET40_CLASSES]
        parts = [read_h5_clouds(path, len(self.classes)) for path in files]
        self.points = np.concatenate([points for points, _ in parts])
        self.labels = np.concatenate([labels for _, labels in parts])


class ModelNet40Resampled(FileDataset):
    """``modelnet40_normal_resampled/``: one ``x,y,z,nx,ny,nz`` text file per shape (xyz used).

    Layout: ``modelnet40_shape_names.txt`` (classes), ``modelnet40_{split}.txt`` (ids such as
    ``night_stand_0001``), files ``<class>/<id>.txt``. ``root`` is that folder or its parent.
    Every listed file must exist; clouds are read from disk on access.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_points: int | None = 1024,
        transform: Transform | None = None,
    ):
        super().__init__(num_points, transform)
        folder = dataset_dir(root, "modelnet40_normal_resampled")
        names_file = folder / "modelnet40_shape_names.txt"
        self.classes = read_name_list(names_file)
        label_of = {name: label for label, name in enumerate(self.classes)}
        list_file = folder / f"modelnet40_{check_split(split)}.txt"
        for shape_id in read_name_list(list_file):
            class_name = shape_id.rpartition("_")[0]
            if class_name not in label_of:
                raise DatasetError(
                    f"{list_file}: id {shape_id!r} names class {class_name!r}, which is not listed in {names_file}"
                )
            path = folder / class_name / f"{shape_id}.txt"
            if not path.is_file():
                raise DatasetError(f"{path}: file not found (listed in {list_file})")
            self.files.append(path)
            self.labels.append(label_of[class_name])

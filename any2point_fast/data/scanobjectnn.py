"""ScanObjectNN (Uy et al., ICCV 2019) from its released HDF5 files."""

from pathlib import Path

from .base import InMemoryDataset, check_split, dataset_dir
from .h5 import read_h5_clouds
from .transforms import Transform

SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed",
    "pillow", "sink", "sofa", "toilet",
)  # fmt: skip

# Variant -> (subfolder, file stem after "training_" / "test_").
VARIANTS = {
    "PB_T50_RS": ("main_split", "objectdataset_augmentedrot_scale75"),
    "OBJ_BG": ("main_split", "objectdataset"),
    "OBJ_ONLY": ("main_split_nobg", "objectdataset"),
}
_FILE_PREFIX = {"train": "training", "test": "test"}


class ScanObjectNN(InMemoryDataset):
    """One ScanObjectNN variant: ``<subfolder>/{training,test}_<stem>.h5`` (see VARIANTS).

    ``root`` is the ``h5_files`` folder or its parent; keys ``data`` [n, 2048, 3] and
    ``label`` [n]. The y axis points up. The split is loaded into memory.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        variant: str = "PB_T50_RS",
        num_points: int | None = 1024,
        transform: Transform | None = None,
    ):
        super().__init__(num_points, transform)
        if variant not in VARIANTS:
            raise ValueError(f"expected variant in {list(VARIANTS)}, got {variant!r}")
        subfolder, stem = VARIANTS[variant]
        self.variant = variant
        self.classes = [*SCANOBJECTNN_CLASSES]
        file_name = f"{_FILE_PREFIX[check_split(split)]}_{stem}.h5"
        path = dataset_dir(root, "h5_files") / subfolder / file_name
        self.points, self.labels = read_h5_clouds(path, len(self.classes))

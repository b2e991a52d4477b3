"""A user's own shapes, one subfolder per class: ``<root>/<class>/*.{ply,off,obj,pcd,npy,txt}``."""

from pathlib import Path

from .base import FileDataset
from .errors import DatasetError
from .mesh_io import SUPPORTED_SUFFIXES
from .transforms import Transform


class PointFolder(FileDataset):
    """Every file of ``<root>/<class>/`` (or ``<root>/<class>/<split>/`` when ``split`` is given,
    the layout of the Princeton ModelNet OFF release) labelled by its class folder.

    Classes are the sorted names of the subfolders of ``root``. Meshes (PLY with faces, OFF,
    OBJ) are sampled on their surface, point files (PLY without faces, PCD, npy, txt) used as they
    are; see :class:`FileDataset` for ``mesh_points`` and ``seed``. Names starting with "." are
    ignored; anything else that is not a supported file is an error, so nothing is skipped.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_points: int | None = 1024,
        transform: Transform | None = None,
        mesh_points: int | None = None,
        seed: int = 0,
    ):
        super().__init__(num_points, transform, mesh_points, seed)
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: folder not found (expected one subfolder per class)")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DatasetError(f"{root}: no class subfolders found (expected <root>/<class>/)")
        self.classes = [d.name for d in class_dirs]
        for label, class_dir in enumerate(class_dirs):
            files = _class_files(class_dir / split if split else class_dir)
            self.files += files
            self.labels += [label] * len(files)


def has_split_folders(root: str | Path, split: str) -> bool:
    """Whether a class folder of ``root`` holds a ``split`` subfolder (the ``<root>/<class>/<split>/``
    layout); False for a flat ``<root>/<class>/`` layout and for a missing ``root``."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any((d / split).is_dir() for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_files(folder: Path) -> list[Path]:
    """The sorted supported files of one class folder; a DatasetError for anything else."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found (expected the files of one class)")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for path in files:
        if path.is_dir():
            raise DatasetError(
                f"{path}: unexpected subfolder in a class folder (for a <class>/<split>/ layout pass split=...)"
            )
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DatasetError(f"{path}: unsupported file, expected one of {SUPPORTED_SUFFIXES}")
    if not files:
        raise DatasetError(f"{folder}: no point or mesh files, expected {SUPPORTED_SUFFIXES}")
    return files

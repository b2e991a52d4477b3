"""A user's own shapes, one subfolder per class: ``<root>/<class>/*.{ply,off,obj,pcd,npy,txt}``; for part
segmentation, ``<root>/<category>/*.{npy,txt}`` with a per-point label column."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import FileDataset, check_split
from .errors import DatasetError
from .mesh_io import LABELLED_SUFFIXES, SUPPORTED_SUFFIXES, read_labelled_points
from .parts import PartDataset
from .split import stratified_holdout
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
        class_dirs = _class_dirs(root, "class")
        self.classes = [d.name for d in class_dirs]
        for label, class_dir in enumerate(class_dirs):
            files = _class_files(class_dir / split if split else class_dir)
            self.files += files
            self.labels += [label] * len(files)


class PartFolder(PartDataset):
    """Shapes with per-point part labels, one subfolder per category: ``<root>/<category>/*.{npy,txt}``
    (or ``<root>/<category>/<split>/*`` when ``split`` is given), each a table ``[P, >=4]``: ``x y z``
    first, the point's part last (``x y z label``; columns between are ignored). Labels number the
    parts of the file's category from 0; items carry global part ids (category after category, in
    the sorted order of the category folders).

    Args:
        root: the folder of category subfolders. split: the ``<split>/`` subfolder to read (None: the
            files of each category folder itself).
        subset: None (every file), or "train" / "test": the files kept / held out by
            :func:`~.split.stratified_holdout` (``test_ratio`` of each category, seeded by ``split_seed``).
        parts: each category's number of parts or list of part names (``{"chair": ["seat", "legs",
            "back"], "mug": 2}``); a label past them is an error. None: read every file of every
            category folder (all splits) now and take the largest label of each category.

    Items: ``(points float32 [P, 3], category int, parts int64 [P])``; a bad file raises
    :class:`DatasetError` starting with its path (a non-integer or negative label, a label out of the
    category's parts).
    """

    def __init__(self, root: str | Path, split: str | None = None, subset: str | None = None,
                 parts: dict[str, int | Sequence[str]] | None = None, test_ratio: float = 0.2, split_seed: int = 0):
        root = Path(root)
        category_dirs = _class_dirs(root, "category")
        self.classes = [d.name for d in category_dirs]
        self.files: list[Path] = []
        labels: list[int] = []
        for category, folder in enumerate(category_dirs):
            files = _class_files(folder / split if split else folder, LABELLED_SUFFIXES)
            self.files += files
            labels += [category] * len(files)
        names = _part_names(root, category_dirs, parts)
        self.part_names, self.category_parts = [], []
        for category, category_names in zip(self.classes, names):
            first = len(self.part_names)
            self.category_parts.append(list(range(first, first + len(category_names))))
            self.part_names += [f"{category}/{name}" for name in category_names]
        self.labels = np.asarray(labels, dtype=np.int64)
        if subset is not None:
            kept, held = stratified_holdout(self.labels, test_ratio, split_seed)
            chosen = kept if check_split(subset) == "train" else held
            self.files, self.labels = [self.files[i] for i in chosen], self.labels[chosen]

    def load(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        path, category = self.files[index], int(self.labels[index])
        points, local = read_labelled_points(path)
        allowed = self.category_parts[category]
        bad = np.flatnonzero(local >= len(allowed))
        if bad.size:
            raise DatasetError(f"{path}: label {local[bad[0]]} at point {bad[0]} is out of the parts of "
                               f"{self.classes[category]} (expected 0..{len(allowed) - 1}: "
                               f"{[name.split('/', 1)[1] for name in self.part_names[allowed[0]:allowed[-1] + 1]]})")
        return points.astype(np.float32), category, local + allowed[0]


def _part_names(root: Path, category_dirs: list[Path], parts: dict | None) -> list[list[str]]:
    """Each category's part names: from ``parts``, or ``"0", "1", ...`` up to the largest label found in
    the files under its folder (every split)."""
    if parts is not None:
        unknown = sorted(set(parts) - {d.name for d in category_dirs})
        missing = [d.name for d in category_dirs if d.name not in parts]
        if unknown or missing:
            raise DatasetError(f"{root}: data option 'parts' must list every category folder: "
                               f"missing {missing}, unknown {unknown}")
        names = [parts[d.name] for d in category_dirs]
        return [[str(i) for i in range(n)] if isinstance(n, int) else [str(x) for x in n] for n in names]
    counts = []
    for folder in category_dirs:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LABELLED_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        counts.append(max((int(read_labelled_points(f)[1].max(initial=-1)) + 1 for f in files), default=1))
    return [[str(i) for i in range(n)] for n in counts]


def has_split_folders(root: str | Path, split: str) -> bool:
    """Whether a class folder of ``root`` holds a ``split`` subfolder (the ``<root>/<class>/<split>/``
    layout); False for a flat ``<root>/<class>/`` layout and for a missing ``root``."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any((d / split).is_dir() for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_dirs(root: Path, kind: str) -> list[Path]:
    """The sorted subfolders of ``root`` (one per ``kind``: class or category), names starting with "."
    ignored; a DatasetError when ``root`` is missing or has none."""
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found (expected one subfolder per {kind})")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{root}: no {kind} subfolders found (expected <root>/<{kind}>/)")
    return dirs


def _class_files(folder: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[Path]:
    """The sorted files (of ``suffixes``) of one class folder; a DatasetError for anything else."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found (expected the files of one class)")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for path in files:
        if path.is_dir():
            raise DatasetError(
                f"{path}: unexpected subfolder in a class folder (for a <class>/<split>/ layout pass split=...)"
            )
        if path.suffix.lower() not in suffixes:
            raise DatasetError(f"{path}: unsupported file, expected one of {suffixes}")
    if not files:
        raise DatasetError(f"{folder}: no point or mesh files, expected {suffixes}")
    return files

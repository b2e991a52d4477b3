"""Datasets and transforms: items are ``(points float32 [P, 3], label int64 scalar)``."""

from .base import PointCloudDataset
from .errors import DatasetError
from .factory import DATASETS, TrainTest, build_dataset, build_train_test
from .folder import PointFolder
from .mesh_io import SUPPORTED_SUFFIXES, read_geometry
from .modelnet import MODELNET40_CLASSES, ModelNet40H5, ModelNet40Resampled
from .scanobjectnn import SCANOBJECTNN_CLASSES, ScanObjectNN
from .split import Subset, limit_per_class, stratified_holdout
from .surface import Mesh, sample_surface
from .synthetic import SyntheticShapes
from .transforms import (
    Compose,
    Jitter,
    NormalizeUnitSphere,
    RandomRotateGravity,
    RandomScale,
    RandomTranslate,
    Resample,
    recipe_transforms,
)

__all__ = [
    "DATASETS",
    "MODELNET40_CLASSES",
    "SCANOBJECTNN_CLASSES",
    "SUPPORTED_SUFFIXES",
    "Compose",
    "DatasetError",
    "Jitter",
    "Mesh",
    "ModelNet40H5",
    "ModelNet40Resampled",
    "NormalizeUnitSphere",
    "PointCloudDataset",
    "PointFolder",
    "RandomRotateGravity",
    "RandomScale",
    "RandomTranslate",
    "Resample",
    "ScanObjectNN",
    "Subset",
    "SyntheticShapes",
    "TrainTest",
    "build_dataset",
    "build_train_test",
    "limit_per_class",
    "read_geometry",
    "recipe_transforms",
    "sample_surface",
    "stratified_holdout",
]

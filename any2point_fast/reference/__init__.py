"""The oracle: a literal, readable implementation of DESIGN.md §1.

Every fused op and fast path of the library is tested against these functions, and every
benchmark compares with them. They favour clarity (dense masks, float32 throughout) but are
vectorised over tokens and buckets.
"""

from .adapter import (
    ReferenceAdapter,
    ViewAttention,
    batch_norm_gelu,
    ensemble_propagate,
    ensemble_weights,
    neighborhood_attention_pool,
    segment_pool,
)
from .buckets import bucket_sort, build_geometry
from .interpolation import interpolate_features
from .model import ReferenceModel
from .projection import project_pe, voxel_ids
from .sampling import farthest_point_sample, knn
from .tokenizer import PointTokenizer, neighborhood_aggregate

__all__ = [
    "PointTokenizer",
    "ReferenceAdapter",
    "ReferenceModel",
    "ViewAttention",
    "batch_norm_gelu",
    "bucket_sort",
    "build_geometry",
    "ensemble_propagate",
    "ensemble_weights",
    "farthest_point_sample",
    "interpolate_features",
    "knn",
    "neighborhood_aggregate",
    "neighborhood_attention_pool",
    "project_pe",
    "segment_pool",
    "voxel_ids",
]

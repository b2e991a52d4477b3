"""Bucket geometry computed once per forward and carried through every block.

Plain containers (and the published view constants), shared by ``reference``, ``torch_ops`` and the
Triton kernels so that every backend reads and writes the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Segments:
    """Tokens grouped into the non-empty buckets of ``V`` groupings (views, or the voxel grid).

    An *item* is one token seen in one grouping; items are numbered view-major,
    ``item = v·B·N + b·N + i``. Segments are the non-empty buckets, numbered in sorted order
    of ``(view, cloud, bucket)``, so the segments of view ``v`` are the contiguous range
    ``view_offsets[v] : view_offsets[v + 1]`` and no segment spans two clouds.

    Attributes:
        segment_ids: ``[V, B, N]`` int64, the segment of every item.
        perm: ``[V·B·N]`` int64, items in stable sorted order (ties keep token order).
        offsets: ``[S + 1]`` int64, segment ``s`` holds ``perm[offsets[s]:offsets[s + 1]]``.
        view_offsets: ``V + 1`` ints, segment range of each view.
        max_len: the largest segment's size.

    In a region that ``torch.compile`` traces, ``view_offsets`` is a ``[V + 1]`` int64 tensor and
    ``max_len`` a 0-d int64 tensor: their values are data, known when the graph runs
    (:mod:`any2point_fast.custom_ops`).
    """

    segment_ids: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    view_offsets: tuple[int, ...] | torch.Tensor
    max_len: int | torch.Tensor

    @property
    def num_segments(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_views(self) -> int:
        return len(self.view_offsets) - 1

    @property
    def counts(self) -> torch.Tensor:
        """``[S]`` int64 items per segment."""
        return self.offsets[1:] - self.offsets[:-1]

    def derived(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, then the same value: bookkeeping that the
        fused ops derive from these segments (bucket lists, sort orders, sparse matrices), computed
        once for all the blocks of a model that read the same geometry. Segments are immutable:
        their tensors must not be changed in place."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def to(self, device: torch.device | str) -> Segments:
        """The same segments with their tensors on ``device``."""
        return Segments(self.segment_ids.to(device), self.perm.to(device), self.offsets.to(device),
                        self.view_offsets, self.max_len)


@dataclass(frozen=True)
class Geometry:
    """What the adapters need of the token positions, built once per forward.

    Attributes:
        views: segments of the ``M`` projected views/lines (buckets of §1.4).
        voxels: segments of the single voxel grouping (the 3D baseline branch), ``V = 1``.
    """

    views: Segments
    voxels: Segments

    def to(self, device: torch.device | str) -> Geometry:
        """The same geometry with its tensors on ``device``."""
        return Geometry(self.views.to(device), self.voxels.to(device))


def _euler_xyz(ax: float, ay: float, az: float) -> torch.Tensor:
    """``R = R_x(ax) · R_y(ay) · R_z(az)``, ``[3, 3]`` float64."""
    cx, sx, cy, sy, cz, sz = (f(a) for a in (ax, ay, az) for f in (math.cos, math.sin))
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rx @ ry @ rz


#: Euler xyz angles of PointCLIP's six views (DESIGN.md §1.2).
VIEW_ANGLES = tuple((k * math.pi / 2, 0.0, math.pi / 2) for k in range(4)) + (
    (0.0, -math.pi / 2, math.pi / 2),
    (0.0, math.pi / 2, math.pi / 2),
)


def view_rotations(num_views: int) -> torch.Tensor:
    """``[M, 3, 3]`` float32 rotations of the first ``M`` published views; a view sees ``R_j p``."""
    return torch.stack([_euler_xyz(*a) for a in VIEW_ANGLES[:num_views]]).float()


def line_directions(num_views: int) -> torch.Tensor:
    """``[M, 3]`` float32 unit directions ``v_j = R_jᵀ d₀``, ``d₀ = normalize(-1, 0, 1)``.

    As in the published recipe, the six lines are not all distinct: lines 2 and 5 coincide.
    """
    d0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    return torch.stack([_euler_xyz(*a).T @ d0 for a in VIEW_ANGLES[:num_views]]).float()


@dataclass(frozen=True)
class ProjectionSpec:
    """Parameters of the 3D-to-any virtual projection (paper §2.2, DESIGN.md §1.2).

    Attributes:
        kind: ``"1d"`` (lines, PE table ``[L, C]``) or ``"2d"`` (views, PE grid ``[Gh, Gw, C]``).
        views: ``[M, 3]`` line directions (1D) or ``[M, 3, 3]`` view rotations (2D), float32.
        segment_length: 1D bucket length in PE positions.
        canvas_size: 2D canvas ``(H, W)`` in pixels.
        patch_size: 2D bucket side in pixels.
        camera_distance: 2D perspective camera distance ``d``.
    """

    kind: str
    views: torch.Tensor
    segment_length: float = 2.0
    canvas_size: tuple[int, int] = (518, 518)
    patch_size: int = 26
    camera_distance: float = 1.6

    @classmethod
    def from_config(cls, config) -> ProjectionSpec:
        """The published views/lines and bucket sizes of an :class:`Any2PointConfig`."""
        if config.pe_kind == "1d":
            return cls("1d", line_directions(config.num_views), segment_length=config.segment_length)
        return cls(
            "2d", view_rotations(config.num_views), canvas_size=config.canvas_size,
            patch_size=config.patch_size, camera_distance=config.camera_distance,
        )

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    def buckets_per_view(self, pe_length: int) -> int:
        """Buckets per view and cloud; ``pe_length`` is ``L`` of a 1D table (unused in 2D)."""
        if self.kind == "1d":
            return math.ceil(pe_length / self.segment_length)
        h, w = self.canvas_size
        return math.ceil(h / self.patch_size) * math.ceil(w / self.patch_size)


def voxel_grid_size(voxel_size: float) -> int:
    """Voxels per axis covering the normalised cloud's ``[-1, 1]³`` cube."""
    return math.ceil(2.0 / voxel_size - 1e-9)

"""``any2point_fast.coordinates``: positions, bucket ids and voxel ids of the token centres, hand-computed
and bit for bit the oracle's (an independent transcription in ``reference/projection.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from any2point_fast import coordinates as C
from any2point_fast import reference as R
from any2point_fast.config import Any2PointConfig
from any2point_fast.geometry import ProjectionSpec, line_directions, view_rotations
from any2point_fast.reference import projection as RP


def test_line_positions_hand_computed():
    # along v_0 at spacing √2: t = -√2, 0, √2 → min–max → 0, 38, 76 for L = 77
    xyz = torch.tensor([[[0.0, 0, 0], [0, 1, 1], [0, 2, 2]]])
    torch.testing.assert_close(C.line_positions(xyz, line_directions(1), 77)[0, 0], torch.tensor([0.0, 38.0, 76.0]))


def test_canvas_positions_hand_computed():
    # ±e_x stays ±e_x in the unit sphere; view 0 turns it into ±e_y: y = ±1/1.6, x = 0
    xyz = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0]]]) * 5 + 2
    rc = C.canvas_positions(xyz, view_rotations(1), (518, 300), 1.6)[0, 0]
    expected = torch.tensor([[(1 + 1 / 1.6) / 2 * 517, 149.5], [(1 - 1 / 1.6) / 2 * 517, 149.5]])
    torch.testing.assert_close(rc, expected)
    # rows 420.06 and 96.94 → patch rows 16 and 3; column 149.5 → patch column 5 of ceil(300/26) = 12
    assert C.canvas_buckets(rc, (518, 300), 26).tolist() == [16 * 12 + 5, 3 * 12 + 5]


def test_positions_are_clamped_into_the_canvas():
    # the first point, nearly at the camera (q_z + d → 0⁺), projects to y ≈ −13: row 0 of the canvas
    xyz = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.3, 1.0]]])
    rc = C.canvas_positions(xyz, torch.eye(3)[None], (64, 48), 1.0000001)
    assert rc[0, 0, 0].tolist() == [0.0, 23.5]
    assert 0 < rc[0, 0, 1, 0] < 63


def test_coinciding_tokens_map_to_the_middle_and_to_zero():
    xyz = torch.full((2, 5, 3), 3.7)
    u = C.line_positions(xyz, line_directions(6), 77)
    assert torch.equal(u, torch.full_like(u, 38.0))
    rc = C.canvas_positions(xyz, view_rotations(6), (518, 300), 1.6)
    assert torch.equal(rc, torch.tensor([517 / 2, 299 / 2]).expand_as(rc))
    for value in (0.0, 0.1, 1234.5678, -9.8e5):
        assert torch.equal(C.unit_sphere(torch.full((1, 7, 3), value)), torch.zeros(1, 7, 3))
    tiny = torch.randn(1, 50, 3, generator=torch.Generator().manual_seed(5)) * 1e-6 + 2.0e-3
    torch.testing.assert_close(C.unit_sphere(tiny).norm(dim=-1).amax(), torch.tensor(1.0))


def test_line_buckets_split_the_line_into_segments():
    u = torch.tensor([0.0, 1.999, 2.0, 75.9, 76.0])
    assert C.line_buckets(u, 2.0, 39).tolist() == [0, 0, 1, 37, 38]
    assert C.line_buckets(torch.tensor([76.0]), 1.5, 51).tolist() == [50]  # clamped: 76/1.5 = 50.7


def test_voxel_ids_hand_computed():
    xyz = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [0, 0.6, 0], [0, -0.6, 0]]]) * 3 + 1
    # in the unit sphere: (±1, 0, 0), (0, ±0.6, 0); 4 voxels of 0.5 per axis; x = 1 is clamped into the last
    ids = C.voxel_ids(xyz, 0.5)
    assert ids.shape == (1, 1, 4)
    assert ids[0, 0].tolist() == [(x * 4 + y) * 4 + z for x, y, z in [(3, 2, 2), (0, 2, 2), (2, 3, 2), (2, 0, 2)]]


def _cloud(kind: str, batch: int, tokens: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "lattice":  # points on a grid: many exact bucket borders
        xyz = torch.randint(-4, 5, (batch, tokens, 3), generator=gen).float() * 0.25
    elif kind == "flat":  # a plane and a line: degenerate spans on some views
        xyz = torch.randn(batch, tokens, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.0])
        xyz[0, :, 1] = 0.0
    else:
        scale = 10 ** torch.empty(batch, 1, 1).uniform_(-3, 3, generator=gen)
        xyz = torch.randn(batch, tokens, 3, generator=gen) * scale
    return xyz.to(dtype)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["random", "lattice", "flat"]), batch=st.integers(1, 3), tokens=st.integers(1, 40),
       views=st.integers(1, 6), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_bit_for_bit_the_reference(kind, batch, tokens, views, seed, dtype):
    xyz = _cloud(kind, batch, tokens, seed, dtype)
    directions, rotations = line_directions(views), view_rotations(views)
    pairs = [
        (C.unit_sphere(xyz), RP.normalize_cloud(xyz)),
        (C.line_coordinates(xyz, directions), RP.line_coordinates(xyz, directions)),
        (C.view_coordinates(xyz, rotations), RP.view_coordinates(xyz, rotations)),
        (C.line_positions(xyz, directions, 77), RP.line_positions(xyz, directions, 77)),
        (C.canvas_positions(xyz, rotations, (192, 304), 1.4), RP.canvas_positions(xyz, rotations, (192, 304), 1.4)),
        (C.voxel_ids(xyz, 0.08), R.voxel_ids(xyz, 0.08)),
        (C.voxel_ids(xyz, 0.16), R.voxel_ids(xyz, 0.16)),
    ]
    for ours, oracle in pairs:
        assert ours.dtype == oracle.dtype and torch.equal(ours, oracle)


@pytest.mark.parametrize("preset", ["language", "vision", "audio"])
@pytest.mark.parametrize("kind", ["random", "lattice", "flat"])
def test_bucket_ids_are_the_references(preset, kind):
    config = Any2PointConfig.preset(preset)
    spec = ProjectionSpec.from_config(config)
    xyz = _cloud(kind, 3, 128, 11, torch.float32)
    if spec.kind == "1d":
        table = torch.zeros(config.pe_length, 1)
        ours = C.line_buckets(C.line_positions(xyz, spec.views, config.pe_length), spec.segment_length,
                              spec.buckets_per_view(config.pe_length))
    else:
        table = torch.zeros(*config.pe_grid, 1)
        rc = C.canvas_positions(xyz, spec.views, spec.canvas_size, spec.camera_distance)
        ours = C.canvas_buckets(rc, spec.canvas_size, spec.patch_size)
    oracle = R.project_pe(xyz, table, spec)[1]
    assert torch.equal(ours, oracle)
    assert ours.min() >= 0 and ours.max() < spec.buckets_per_view(table.shape[0])

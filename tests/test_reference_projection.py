import math

import pytest
import torch

from any2point_fast.geometry import ProjectionSpec, line_directions, view_rotations
from any2point_fast.reference import bucket_sort, project_pe, voxel_ids
from any2point_fast.reference.projection import (
    canvas_positions,
    interpolate_pe_1d,
    interpolate_pe_2d,
    line_positions,
)


def test_views_are_rotations_and_lines_unit_vectors():
    rot = view_rotations(6).double()
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(6, 3, 3),
                               atol=1e-6, rtol=0)
    dirs = line_directions(6)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(6))
    # v_0 = R_zᵀ(π/2) · (-1, 0, 1)/√2 = (0, 1, 1)/√2, computed by hand
    torch.testing.assert_close(dirs[0], torch.tensor([0.0, 1.0, 1.0]) / math.sqrt(2))
    # a property of the published recipe, kept as is: lines 2 and 5 coincide
    assert len({tuple(d.round(decimals=4).tolist()) for d in dirs}) == 5
    torch.testing.assert_close(dirs[2], dirs[5])


def test_line_positions_hand_computed():
    # points along v_0 at spacing √2: t = -√2, 0, √2 → min-max → 0, 38, 76 for L = 77
    xyz = torch.tensor([[[0.0, 0, 0], [0, 1, 1], [0, 2, 2]]])
    u = line_positions(xyz, line_directions(1), 77)
    torch.testing.assert_close(u[0, 0], torch.tensor([0.0, 38.0, 76.0]))


def test_single_repeated_point_maps_to_the_middle():
    xyz = torch.full((1, 5, 3), 3.7)
    u = line_positions(xyz, line_directions(6), 77)
    assert torch.equal(u, torch.full_like(u, 38.0))
    rc = canvas_positions(xyz, view_rotations(6), (518, 300), 1.6)
    assert torch.equal(rc[..., 0], torch.full_like(rc[..., 0], 517 / 2))
    assert torch.equal(rc[..., 1], torch.full_like(rc[..., 1], 299 / 2))


def test_canvas_positions_hand_computed():
    # ±e_x stays ±e_x after normalisation; view 0 rotates it to ±e_y: y = ±1/1.6, x = 0
    xyz = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0]]]) * 5 + 2
    rc = canvas_positions(xyz, view_rotations(1), (518, 518), 1.6)[0, 0]
    expected = torch.tensor([[(1 + 1 / 1.6) / 2 * 517, 258.5], [(1 - 1 / 1.6) / 2 * 517, 258.5]])
    torch.testing.assert_close(rc, expected)
    _, buckets = project_pe(xyz, torch.zeros(37, 37, 4), ProjectionSpec.from_config(
        __import__("any2point_fast").Any2PointConfig.preset("vision", num_views=1)))
    # rows 420.06 and 96.94 → patch rows 16 and 3, column 258.5 → patch column 9 of 20
    assert buckets[0, 0].tolist() == [16 * 20 + 9, 3 * 20 + 9]


def test_pe_1d_exact_at_integers_and_linear_between():
    table = torch.randn(77, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(interpolate_pe_1d(table, torch.arange(77.0)), table, atol=0, rtol=0)
    k = torch.arange(76.0)
    for a in (0.25, 0.5, 0.9):
        torch.testing.assert_close(interpolate_pe_1d(table, k + a), (1 - a) * table[:-1] + a * table[1:])


def test_pe_2d_exact_at_grid_nodes_and_bilinear_between():
    grid = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    canvas = (31, 51)  # node spacing 10 px
    rows, cols = torch.meshgrid(torch.arange(4.0) * 10, torch.arange(6.0) * 10, indexing="ij")
    torch.testing.assert_close(interpolate_pe_2d(grid, torch.stack((rows, cols), -1), canvas), grid)
    centre = interpolate_pe_2d(grid, torch.tensor([[5.0, 15.0]]), canvas)[0]
    torch.testing.assert_close(centre, grid[0:2, 1:3].mean(dim=(0, 1)))
    corner = interpolate_pe_2d(grid, torch.tensor([[30.0, 0.0], [0.0, 50.0]]), canvas)
    torch.testing.assert_close(corner, torch.stack((grid[-1, 0], grid[0, -1])))


@pytest.mark.parametrize("preset", ["language", "vision", "audio"])
def test_pe_is_the_mean_of_the_views(preset):
    cfg = __import__("any2point_fast").Any2PointConfig.preset(preset)
    spec = ProjectionSpec.from_config(cfg)
    shape = (77, 8) if cfg.pe_kind == "1d" else (*cfg.pe_grid, 8)
    table = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    centers = torch.randn(2, 30, 3, generator=torch.Generator().manual_seed(3))
    pe, buckets = project_pe(centers, table, spec)
    per_view = [project_pe(centers, table, ProjectionSpec(spec.kind, spec.views[j:j + 1], spec.segment_length,
                                                            spec.canvas_size, spec.patch_size, spec.camera_distance))
                for j in range(6)]
    torch.testing.assert_close(pe, torch.stack([p for p, _ in per_view]).mean(0))
    assert torch.equal(buckets, torch.cat([b for _, b in per_view]))
    assert buckets.min() >= 0 and buckets.max() < spec.buckets_per_view(77)


@pytest.mark.parametrize("preset", ["language", "vision"])
def test_buckets_never_mix_clouds_and_cover_every_token_once(preset):
    cfg = __import__("any2point_fast").Any2PointConfig.preset(preset)
    spec = ProjectionSpec.from_config(cfg)
    batch, tokens = 3, 64
    centers = torch.randn(batch, tokens, 3, generator=torch.Generator().manual_seed(4))
    centers[1] *= 0.01  # a tiny cloud next to normal ones
    _, buckets = project_pe(centers, torch.zeros(77, 2) if cfg.pe_kind == "1d" else torch.zeros(37, 37, 2), spec)
    seg = bucket_sort(buckets, spec.buckets_per_view(77))
    assert sorted(seg.perm.tolist()) == list(range(6 * batch * tokens))
    for s in range(seg.num_segments):
        items = seg.perm[seg.offsets[s]:seg.offsets[s + 1]]
        clouds, views = (items // tokens) % batch, items // (batch * tokens)
        assert len(set(clouds.tolist())) == 1 and len(set(views.tolist())) == 1
        assert seg.view_offsets[views[0]] <= s < seg.view_offsets[views[0] + 1]
        flat = buckets.flatten()[items]
        assert torch.all(flat == flat[0])
        assert torch.all(seg.segment_ids.flatten()[items] == s)
    for j in range(6):
        counts = torch.bincount(seg.segment_ids[j].flatten() - seg.view_offsets[j])
        assert counts.sum() == batch * tokens and counts.min() > 0


def test_bucket_sort_is_stable():
    ids = torch.tensor([[[2, 0, 2, 1, 0, 2]]])
    seg = bucket_sort(ids, 3)
    assert seg.perm.tolist() == [1, 4, 3, 0, 2, 5]
    assert seg.offsets.tolist() == [0, 2, 3, 6] and seg.max_len == 3 and seg.view_offsets == (0, 3)
    assert seg.segment_ids.flatten().tolist() == [2, 0, 2, 1, 0, 2]


def test_voxel_ids_hand_computed():
    xyz = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [0, 0.6, 0], [0, -0.6, 0]]]) * 3 + 1
    # normalised: (±1, 0, 0), (0, ±0.6, 0); 4 voxels of 0.5 per axis; x = 1 is clamped into the last voxel
    ids = voxel_ids(xyz, 0.5)
    assert ids.shape == (1, 1, 4)
    cells = [(3, 2, 2), (0, 2, 2), (2, 3, 2), (2, 0, 2)]
    assert ids[0, 0].tolist() == [(x * 4 + y) * 4 + z for x, y, z in cells]


def test_a_cloud_of_equal_points_normalises_to_zeros_at_any_offset():
    from any2point_fast.reference.projection import normalize_cloud

    for value in (0.0, 0.1, 3.7, 1234.5678, -9.8e5):
        xyz = torch.full((1, 7, 3), value)
        assert torch.equal(normalize_cloud(xyz), torch.zeros(1, 7, 3))
    tiny = torch.randn(1, 50, 3, generator=torch.Generator().manual_seed(5)) * 1e-6 + 2.0e-3
    torch.testing.assert_close(normalize_cloud(tiny).norm(dim=-1).amax(), torch.tensor(1.0))

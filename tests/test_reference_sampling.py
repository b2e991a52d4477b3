import torch

from any2point_fast.reference import farthest_point_sample, knn


def brute_force_fps(xyz: torch.Tensor, num_samples: int) -> list[int]:
    """Greedy FPS from the full O(P²) distance matrix, one cloud."""
    dist = torch.cdist(xyz.double(), xyz.double()) ** 2
    picked = [0]
    for _ in range(num_samples - 1):
        picked.append(int(dist[picked].amin(dim=0).argmax()))
    return picked


def test_fps_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(3, 200, 3, generator=gen)
    got = farthest_point_sample(xyz, 50)
    for b in range(3):
        assert got[b].tolist() == brute_force_fps(xyz[b], 50)


def test_fps_picks_distinct_points_and_spreads_out():
    xyz = torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(1))
    idx = farthest_point_sample(xyz, 64)
    assert all(len(set(row.tolist())) == 64 for row in idx)
    # the sampled subset covers the cloud better than the first 64 points
    def coverage(sub):
        return torch.cdist(xyz[0], xyz[0, sub]).amin(dim=1).max()
    assert coverage(idx[0]) < coverage(torch.arange(64))


def test_knn_equals_cdist_and_sort():
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(2, 300, 3, generator=gen)
    query = torch.randn(2, 40, 3, generator=gen)
    idx = knn(query, points, 9)
    expected = torch.cdist(query.double(), points.double()).sort(dim=-1).values[..., :9]
    got = (torch.gather(points, 1, idx.reshape(2, -1, 1).expand(-1, -1, 3)).reshape(2, 40, 9, 3)
           - query[:, :, None]).double().norm(dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_knn_of_a_sampled_point_starts_with_itself():
    points = torch.randn(1, 50, 3, generator=torch.Generator().manual_seed(3))
    idx = knn(points[:, :10], points, 4)
    assert idx[0, :, 0].tolist() == list(range(10))

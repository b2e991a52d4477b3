"""``knn``: the blocked ranking of the torch path finds the reference's neighbours, nearest first,
with no ``[B, S, P]`` distance tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from any2point_fast import ops
from any2point_fast import reference as R
from any2point_fast.torch_ops import sampling as torch_sampling
from any2point_fast.validation import InputError
from tests.test_memory import allocation_sizes

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact_distances(query: torch.Tensor, points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[B, S, k]`` from each query to its listed points, in float64."""
    picked = torch.gather(points.double()[:, None].expand(-1, index.shape[1], -1, -1), 2,
                          index[..., None].expand(-1, -1, -1, 3))
    return (picked - query.double()[:, :, None]).square().sum(-1)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), queries=st.integers(1, 60),
       points=st.integers(1, 200), fraction=st.floats(0.0, 1.0), block=st.sampled_from((1, 37, 500, 1 << 22)),
       grid=st.booleans())
def test_the_blocked_ranking_finds_the_reference_neighbours(seed, batch, queries, points, fraction, block, grid):
    gen = torch.Generator().manual_seed(seed)
    if grid:  # integer coordinates: many exactly tied distances
        query = torch.randint(-3, 4, (batch, queries, 3), generator=gen).float()
        cloud = torch.randint(-3, 4, (batch, points, 3), generator=gen).float()
    else:
        query, cloud = torch.randn(batch, queries, 3, generator=gen), torch.randn(batch, points, 3, generator=gen)
    k = max(1, round(fraction * points))
    found = torch_sampling.knn(query, cloud, k, block_elements=block)
    expected = R.knn(query, cloud, k)
    assert found.dtype == torch.int64 and found.shape == expected.shape
    # the same distances in the same order; among tied distances the order of the indices is free
    assert torch.equal(exact_distances(query, cloud, found), exact_distances(query, cloud, expected))
    if not grid:
        assert found.tolist() == expected.tolist()


def test_every_query_of_every_block_is_ranked():
    """Queries in the last, partial block (7 rows a block, 30 queries) get their own neighbours."""
    gen = torch.Generator().manual_seed(1)
    cloud = torch.randn(2, 50, 3, generator=gen)
    query = cloud[:, torch.arange(30)] + 1e-3
    found = torch_sampling.knn(query, cloud, 1, block_elements=2 * 50 * 7)
    assert found[..., 0].tolist() == [list(range(30))] * 2


def test_no_distance_tensor_of_all_queries_and_points():
    """At S = 2048 queries and P = 4096 points, no allocation near the ``[B, S, P]`` distances."""
    gen = torch.Generator().manual_seed(2)
    query, cloud = torch.randn(1, 2048, 3, generator=gen), torch.randn(1, 4096, 3, generator=gen)
    dense = 2048 * 4096 * 4
    block = torch_sampling.KNN_BLOCK_ELEMENTS // 64
    largest = max(allocation_sizes(lambda: torch_sampling.knn(query, cloud, 16, block_elements=block)))
    assert largest <= dense // 32
    assert max(allocation_sizes(lambda: R.knn(query, cloud, 16))) >= dense  # the check catches a dense one


@pytest.mark.parametrize(("query", "points", "k", "match"), [
    ((2, 5, 3), (2, 10, 2), 3, r"points must be float \[B, P, 3\]"),
    ((1, 5, 3), (2, 10, 3), 3, "one batch"),
    ((2, 5, 3), (2, 10, 3), 11, "k = 11 neighbours requested from 10 points"),
])
def test_bad_inputs_are_refused_before_any_kernel(query, points, k, match):
    with pytest.raises(InputError, match=match):
        ops.knn(torch.zeros(query), torch.zeros(points), k)

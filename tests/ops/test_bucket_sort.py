"""``bucket_sort``: every implementation gives the reference's segments bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from any2point_fast import reference as R
from any2point_fast.geometry import Segments
from tests.ops.cases import bucket_ids, layouts, property_settings
from tests.ops.implementations import names, runnable, triton_device

OP = "bucket_sort"


def assert_same_segments(actual: Segments, expected: Segments) -> None:
    for field in ("segment_ids", "perm", "offsets"):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.dtype == e.dtype == torch.int64 and a.shape == e.shape, field
        assert torch.equal(a, e), field
    assert actual.view_offsets == expected.view_offsets and all(type(v) is int for v in actual.view_offsets)
    assert type(actual.max_len) is int and actual.max_len == expected.max_len


@pytest.mark.parametrize("name", names(OP))
def test_matches_the_reference(name):
    impl = runnable(OP)[name]

    @property_settings(impl)
    @given(layouts(impl), st.booleans())
    def check(layout, int32_ids):
        ids = layout.ids.int() if int32_ids else layout.ids
        assert_same_segments(impl.fn(ids, layout.num_buckets), R.bucket_sort(layout.ids, layout.num_buckets))

    check()


@pytest.mark.parametrize("name", names(OP))
def test_hand_made(name):
    impl = runnable(OP)[name]
    s = impl.fn(torch.tensor([[[2, 0, 2, 1]], [[0, 0, 0, 0]]], device=impl.device), 3)
    assert s.segment_ids.tolist() == [[[2, 0, 2, 1]], [[3, 3, 3, 3]]]
    assert s.perm.tolist() == [1, 3, 0, 2, 4, 5, 6, 7]
    assert s.offsets.tolist() == [0, 1, 2, 4, 8]
    assert s.view_offsets == (0, 3, 4) and s.max_len == 4


@pytest.mark.parametrize("name", names(OP))
def test_one_token_clouds_and_rows_longer_than_a_block(name):
    impl = runnable(OP)[name]
    ids = torch.tensor([[[3], [0]], [[1], [1]]], device=impl.device)  # two views, two one-token clouds
    assert_same_segments(impl.fn(ids, 4), R.bucket_sort(ids, 4))
    ids = torch.randint(0, 5, (1, 2, 300), generator=torch.Generator().manual_seed(1)).to(impl.device)
    assert_same_segments(impl.fn(ids, 5), R.bucket_sort(ids, 5))


@pytest.mark.parametrize("name", names(OP))
@pytest.mark.parametrize(("pattern", "expected"), [("one", 6), ("singletons", 6 * 37), ("sparse", None)])
def test_segment_counts_of_the_layouts(name, pattern, expected):
    """One bucket per view and cloud gives V·B segments, singletons V·B·N."""
    impl = runnable(OP)[name]
    ids, num = bucket_ids(pattern, 3, 2, 37, torch.Generator().manual_seed(7))
    segments = impl.fn(ids.to(impl.device), num)
    assert_same_segments(segments, R.bucket_sort(ids, num))
    assert expected is None or segments.num_segments == expected


@pytest.mark.parametrize(("rows", "keys"), [(1, 1), (100, 7), (3000, 37), (2500, 2500)])
def test_triton_group_by_key_is_a_stable_sort(rows, keys):
    """The chunked counting sort behind Triton's segment_pool and ensemble backward (rows > 1024: several chunks)."""
    device = triton_device()
    from any2point_fast.kernels.buckets import group_by_key

    ids = torch.randint(0, keys, (rows,), generator=torch.Generator().manual_seed(rows)).to(device)
    perm, offsets = group_by_key(ids, keys)
    assert torch.equal(perm, torch.argsort(ids, stable=True))
    counts = torch.bincount(ids, minlength=keys)
    assert torch.equal(offsets, torch.cat((counts.new_zeros(1), counts.cumsum(0))))


def test_triton_rejects_out_of_range_ids():
    from any2point_fast import kernels

    with pytest.raises(ValueError, match="must lie in"):
        kernels.bucket_sort(torch.tensor([[[0, 4]]], device=triton_device()), 4)

"""``bucket_sort``: a stable counting sort of per-row bucket ids into non-empty segments.

Rows are the ``G = V·B`` (view, cloud) pairs; row ``g`` holds ``N`` items and the key space
``[0, num_buckets)``, so the sorted order of ``(view, cloud, bucket)`` is row-major and row
``g`` occupies the positions ``g·N : (g + 1)·N``. Four small kernels:

1. ``_histogram_kernel`` (grid: item blocks) — ``counts[g, bucket]`` with integer atomics;
2. ``_row_scan_kernel`` (grid: rows) — per row, exclusive ``tl.cumsum`` of the counts (the
   row-local start of every bucket) and of the non-empty flags (the row-local segment index),
   plus the row's number of segments and its largest bucket;
3. ``_row_base_kernel`` (one program) — exclusive scan of the per-row segment counts: the
   first segment of every row; also the total ``S`` and ``max_len``;
4. ``_scatter_kernel`` (grid: rows) — walks the row's items in order, block by block; the rank
   of an item inside its bucket is the bucket's fill so far plus the number of equal keys
   before it in the block, which makes the sort stable. Writes ``perm``, ``segment_ids`` and,
   from the first item of every bucket, ``offsets``.

:func:`group_by_key` is the same counting sort for one long row of arbitrary ids (the rows of
``segment_pool`` and the table rows of ``ensemble_propagate``'s backward), parallel over
chunks of the row: per-chunk histograms, an exclusive scan down every key's column of chunk
counts (``_column_scan_kernel``), a scan over the keys, and a scatter per chunk
(``_chunk_scatter_kernel``). No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from any2point_fast.geometry import Segments

from ._common import tcumsum, tmax, tsum

_BLOCK = 128
_MAX_CHUNKS = 64  # group_by_key: chunks of a long row sorted in parallel


@triton.jit
def _histogram_kernel(ids_ptr, counts_ptr, total, row_len, num_buckets, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    bucket = tl.load(ids_ptr + offs, mask=mask, other=0)
    key = (offs // row_len) * num_buckets + bucket
    tl.atomic_add(counts_ptr + key, 1, mask=mask)


@triton.jit
def _row_scan_kernel(counts_ptr, starts_ptr, local_seg_ptr, row_segs_ptr, row_max_ptr, num_buckets,
                     BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * num_buckets
    items = tl.full((), 0, tl.int32)
    segs = tl.full((), 0, tl.int32)
    longest = tl.full((), 0, tl.int32)
    for k0 in range(0, num_buckets, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < num_buckets
        count = tl.load(counts_ptr + base + offs, mask=mask, other=0)
        nonempty = (count > 0).to(tl.int32)
        tl.store(starts_ptr + base + offs, items + tcumsum(count, 0) - count, mask=mask)
        tl.store(local_seg_ptr + base + offs, segs + tcumsum(nonempty, 0) - nonempty, mask=mask)
        items += tsum(count, 0)
        segs += tsum(nonempty, 0)
        longest = tl.maximum(longest, tmax(count, 0))
    tl.store(row_segs_ptr + tl.program_id(0), segs)
    tl.store(row_max_ptr + tl.program_id(0), longest)


@triton.jit
def _row_base_kernel(row_segs_ptr, row_max_ptr, row_base_ptr, info_ptr, rows, BLOCK: tl.constexpr):
    carry = tl.full((), 0, tl.int32)
    longest = tl.full((), 0, tl.int32)
    for r0 in range(0, rows, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        mask = offs < rows
        segs = tl.load(row_segs_ptr + offs, mask=mask, other=0)
        tl.store(row_base_ptr + offs, carry + tcumsum(segs, 0) - segs, mask=mask)
        carry += tsum(segs, 0)
        longest = tl.maximum(longest, tmax(tl.load(row_max_ptr + offs, mask=mask, other=0), 0))
    tl.store(info_ptr, carry)
    tl.store(info_ptr + 1, longest)


@triton.jit
def _scatter_kernel(ids_ptr, starts_ptr, local_seg_ptr, row_base_ptr, fill_ptr, perm_ptr, segment_ids_ptr,
                    offsets_ptr, row_len, num_buckets, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first_item = row * row_len
    seg_base = tl.load(row_base_ptr + row)
    lane = tl.arange(0, BLOCK)
    earlier = lane[None, :] < lane[:, None]
    for i0 in range(0, row_len, BLOCK):
        mask = i0 + lane < row_len
        item = first_item + i0 + lane
        bucket = tl.load(ids_ptr + item, mask=mask, other=-1)
        key = row * num_buckets + bucket
        start = tl.load(starts_ptr + key, mask=mask, other=0)
        fill = tl.load(fill_ptr + key, mask=mask, other=0)
        local_seg = tl.load(local_seg_ptr + key, mask=mask, other=0)
        same = (bucket[:, None] == bucket[None, :]) & earlier & mask[None, :]
        rank = fill + tsum(same.to(tl.int32), 1)
        pos = first_item + start + rank
        seg = seg_base + local_seg
        tl.store(perm_ptr + pos, item, mask=mask)
        tl.store(segment_ids_ptr + item, seg.to(tl.int64), mask=mask)
        tl.store(offsets_ptr + seg, pos, mask=mask & (rank == 0))
        tl.debug_barrier()
        tl.atomic_add(fill_ptr + key, 1, mask=mask)
        tl.debug_barrier()


@triton.jit
def _column_scan_kernel(counts_ptr, totals_ptr, chunks, num_keys, BLOCK: tl.constexpr):
    """In place: ``counts[p, k]`` → items of key ``k`` in the chunks before ``p``; ``totals[k]``."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < num_keys
    running = tl.full((BLOCK,), 0, tl.int32)
    for p in range(chunks):
        count = tl.load(counts_ptr + p * num_keys + k, mask=mask, other=0)
        tl.store(counts_ptr + p * num_keys + k, running, mask=mask)
        running += count
    tl.store(totals_ptr + k, running, mask=mask)


@triton.jit
def _chunk_scatter_kernel(ids_ptr, starts_ptr, before_ptr, fill_ptr, perm_ptr, total, chunk_len, num_keys,
                          BLOCK: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    earlier = lane[None, :] < lane[:, None]
    for i0 in range(0, chunk_len, BLOCK):
        item = chunk * chunk_len + i0 + lane
        mask = (i0 + lane < chunk_len) & (item < total)
        key = tl.load(ids_ptr + item, mask=mask, other=-1)
        start = tl.load(starts_ptr + key, mask=mask, other=0)
        before = tl.load(before_ptr + chunk * num_keys + key, mask=mask, other=0)
        fill = tl.load(fill_ptr + chunk * num_keys + key, mask=mask, other=0)
        same = (key[:, None] == key[None, :]) & earlier & mask[None, :]
        pos = start + before + fill + tsum(same.to(tl.int32), 1)
        tl.store(perm_ptr + pos, item, mask=mask)
        tl.debug_barrier()
        tl.atomic_add(fill_ptr + chunk * num_keys + key, 1, mask=mask)
        tl.debug_barrier()


def group_by_key(ids: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the ``T`` items of ``ids`` (ints in ``[0, num_keys)``) by key.

    Returns ``perm`` (``[T]`` int64, items sorted by key, ties in item order) and ``offsets``
    (``[num_keys + 1]`` int64: key ``k`` holds ``perm[offsets[k]:offsets[k + 1]]``, empty keys
    included). The ids are trusted (validated by the caller).
    """
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    total, device = ids.numel(), ids.device
    perm = torch.empty(total, dtype=torch.int64, device=device)
    starts = torch.zeros(num_keys, dtype=torch.int32, device=device)
    if total:
        chunks = min(_MAX_CHUNKS, triton.cdiv(total, _BLOCK * 8))
        chunk_len = triton.cdiv(triton.cdiv(total, chunks), _BLOCK) * _BLOCK
        chunks = triton.cdiv(total, chunk_len)
        counts = torch.zeros(chunks, num_keys, dtype=torch.int32, device=device)
        totals = torch.empty(num_keys, dtype=torch.int32, device=device)
        scratch = torch.empty(4, dtype=torch.int32, device=device)
        _histogram_kernel[(triton.cdiv(total, _BLOCK),)](ids, counts, total, chunk_len, num_keys, BLOCK=_BLOCK)
        _column_scan_kernel[(triton.cdiv(num_keys, _BLOCK),)](counts, totals, chunks, num_keys, BLOCK=_BLOCK)
        _row_scan_kernel[(1,)](totals, starts, torch.empty_like(totals), scratch, scratch[2:], num_keys, BLOCK=_BLOCK)
        fill = torch.zeros_like(counts)
        _chunk_scatter_kernel[(chunks,)](ids, starts, counts, fill, perm, total, chunk_len, num_keys, BLOCK=_BLOCK)
    return perm, torch.cat((starts.to(torch.int64), starts.new_full((1,), total, dtype=torch.int64)))


def check_ids(*checks: tuple[str, torch.Tensor, int]) -> None:
    """Raise unless every id of every ``(name, ids, num_keys)`` lies in ``[0, num_keys)`` (one host sync)."""
    checks = [(name, ids.reshape(-1), n) for name, ids, n in checks if ids.numel()]
    if not checks:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(ids)) for _, ids, _ in checks]).tolist()
    for (name, _, num_keys), (low, high) in zip(checks, bounds):
        if low < 0 or high >= num_keys:
            raise ValueError(f"{name} must lie in [0, {num_keys}), got values in [{low}, {high}]")


def bucket_sort(bucket_ids: torch.Tensor, num_buckets: int) -> Segments:
    """Group items by ``(view, cloud, bucket)`` into the non-empty segments.

    Same contract as :func:`any2point_fast.reference.bucket_sort`: ``bucket_ids`` is
    ``[V, B, N]`` int with per-cloud ids in ``[0, num_buckets)``. Two host synchronisations:
    the range check of the ids, and reading ``S``, ``max_len`` and ``view_offsets``.
    """
    if bucket_ids.dim() != 3:
        raise ValueError(f"bucket_ids must be [V, B, N], got shape {tuple(bucket_ids.shape)}")
    views, batch, row_len = bucket_ids.shape
    rows, total, device = views * batch, bucket_ids.numel(), bucket_ids.device
    ids = bucket_ids.to(torch.int64).contiguous()
    check_ids(("bucket_ids", ids, num_buckets))
    counts = torch.zeros(rows, num_buckets, dtype=torch.int32, device=device)
    starts = torch.empty_like(counts)
    local_seg = torch.empty_like(counts)
    row_segs = torch.empty(rows, dtype=torch.int32, device=device)
    row_max = torch.empty(rows, dtype=torch.int32, device=device)
    row_base = torch.zeros(rows, dtype=torch.int32, device=device)
    info = torch.zeros(2, dtype=torch.int32, device=device)
    perm = torch.empty(total, dtype=torch.int64, device=device)
    segment_ids = torch.empty(total, dtype=torch.int64, device=device)
    offsets = torch.full((total + 1,), total, dtype=torch.int64, device=device)
    if total:
        _histogram_kernel[(triton.cdiv(total, _BLOCK),)](ids, counts, total, row_len, num_buckets, BLOCK=_BLOCK)
        _row_scan_kernel[(rows,)](counts, starts, local_seg, row_segs, row_max, num_buckets, BLOCK=_BLOCK)
        _row_base_kernel[(1,)](row_segs, row_max, row_base, info, rows, BLOCK=_BLOCK)
        fill = counts.zero_()  # reused as the per-key fill counter of the scatter
        _scatter_kernel[(rows,)](ids, starts, local_seg, row_base, fill, perm, segment_ids, offsets, row_len,
                                 num_buckets, BLOCK=_BLOCK)
    num_segments, max_len, *view_starts = torch.cat((info, row_base[::max(batch, 1)])).tolist()
    if not batch:
        view_starts = [0] * views
    return Segments(
        segment_ids=segment_ids.reshape(bucket_ids.shape),
        perm=perm,
        offsets=offsets[: num_segments + 1].clone(),
        view_offsets=(*view_starts, num_segments),
        max_len=max_len,
    )

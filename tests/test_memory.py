"""Memory invariants of the torch path (DESIGN.md §2), measured, with the reference as the counter-example.

Every allocation made while an op runs forward and backward is recorded by the profiler
(``profile_memory=True`` reports each allocation of the CPU allocator, buffers allocated
inside ATen kernels such as the flash attention's included, and so the compiled kernel's,
which takes its buffers from that allocator). The torch path must never allocate
an ``N × N`` tensor per cloud nor an ``[M, B·N, C]`` tensor; the checks below flag any
allocation of ``N²/8`` float32 elements, or of ``M·B·N·C``, and the same checks are shown to
catch the reference, which materialises both.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from any2point_fast import Any2PointConfig, reference, torch_ops
from any2point_fast.geometry import ProjectionSpec, Segments, voxel_grid_size
from any2point_fast.torch_ops import attention as torch_attention
from tests.ops.implementations import runnable

TOKENS, CHANNELS, VIEWS, HEADS, WIDTH = 4096, 96, 6, 6, 12
FLOAT = 4  # bytes


def allocation_sizes(fn) -> list[int]:
    """Bytes of every allocation made while ``fn()`` runs (frees are not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    sizes = [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]
    assert sizes, "the profiler recorded no allocation"
    return sizes


def largest_allocation(fn) -> int:
    return max(allocation_sizes(fn))


def no_quadratic_or_per_view_tensor(fn, tokens: int, views: int, channels: int, batch: int = 1) -> None:
    """Fails if ``fn`` allocates ``N²/8`` float32 elements (an ``N × N`` tensor per cloud, with
    margin) or ``M·B·N·C`` of them (an ``[M, B·N, C]`` tensor)."""
    largest = largest_allocation(fn)
    assert largest < tokens * tokens // 8 * FLOAT, f"an allocation of {largest} B is O(N²) (N = {tokens})"
    assert largest < views * batch * tokens * channels * FLOAT, f"an allocation of {largest} B is [M, B·N, C]-sized"


def layout(kind: str, tokens: int, views: int = VIEWS, seed: int = 0) -> tuple[Segments, Segments]:
    """View buckets of the language preset (1D lines, L = 77) or one bucket per view, and voxels."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(1, tokens, 3, generator=gen)
    config = Any2PointConfig.preset("language", hidden_size=CHANNELS, num_views=views)
    spec = ProjectionSpec.from_config(config)
    _, buckets = reference.project_pe(centers, torch.zeros(config.pe_length, 1), spec)
    if kind == "one bucket":
        buckets = torch.zeros_like(buckets)
    views = torch_ops.bucket_sort(buckets, spec.buckets_per_view(config.pe_length))
    voxels = torch_ops.bucket_sort(reference.voxel_ids(centers, config.voxel_size),
                                   voxel_grid_size(config.voxel_size) ** 3)
    return views, voxels


def torch_route(attention: str) -> SimpleNamespace:
    """The three ops of the guided branch on one torch route: ``torch-compiled`` for all three, or
    ``torch-flash`` / ``torch-tiled`` attention with plain PyTorch pooling and ensemble."""
    pooling = "torch-compiled" if attention == "torch-compiled" else "torch"
    return SimpleNamespace(neighborhood_attention_pool=runnable("neighborhood_attention_pool")[attention].fn,
                           segment_pool=runnable("segment_pool")[pooling].fn,
                           ensemble_propagate=runnable("ensemble_propagate")[pooling].fn)


def guided_branch(ops, views: Segments, voxels: Segments, tokens: int, pooling: str):
    """Forward and backward of the three fused ops of one adapter, on random inputs."""
    gen = torch.Generator().manual_seed(1)
    m = views.num_views
    x = torch.randn(1, tokens, CHANNELS, generator=gen, requires_grad=True)
    weights = [torch.randn(m, CHANNELS, generator=gen), torch.randn(m, CHANNELS, generator=gen),
               torch.randn(m, 3 * WIDTH, CHANNELS, generator=gen) * 0.1,
               torch.randn(m, 3 * WIDTH, generator=gen), torch.randn(m, CHANNELS, WIDTH, generator=gen),
               torch.randn(m, CHANNELS, generator=gen)]
    weights = [w.requires_grad_() for w in weights]

    def run():
        view_rows = ops.neighborhood_attention_pool(x, views, *weights, HEADS, pooling)
        base_rows = ops.segment_pool(x.reshape(tokens, CHANNELS), voxels.segment_ids.flatten(), voxels.num_segments,
                                     pooling)
        out = ops.ensemble_propagate(x, torch.nn.functional.gelu(base_rows), voxels.segment_ids[0],
                                     torch.nn.functional.gelu(view_rows), views.segment_ids, 0.3)
        out.backward(torch.randn(out.shape, generator=gen))

    return run


@pytest.mark.parametrize("route", ["torch-compiled", "torch-flash"])
@pytest.mark.parametrize("pooling", ["mean", "max+mean"])
@pytest.mark.parametrize("kind", ["language preset", "one bucket"])
def test_torch_path_allocates_no_quadratic_or_per_view_tensor(kind, pooling, route):
    views, voxels = layout(kind, TOKENS)
    if kind == "one bucket":
        assert views.max_len == TOKENS
    else:
        assert 100 < views.max_len < TOKENS // 2
    no_quadratic_or_per_view_tensor(guided_branch(torch_route(route), views, voxels, TOKENS, pooling), TOKENS, VIEWS,
                                    CHANNELS)


def test_explicit_attention_path_allocates_no_quadratic_tensor():
    """Off the CPU flash kernel (other devices), one bucket of N tokens is attended tile by tile
    (N = 2048 and two views: the explicit softmax is several times slower than the flash kernel)."""
    tokens, views = 2048, 2
    assert torch_attention.TILE_ELEMENTS < tokens * tokens // 8
    view_segments, voxels = layout("one bucket", tokens, views)
    no_quadratic_or_per_view_tensor(guided_branch(torch_route("torch-tiled"), view_segments, voxels, tokens, "mean"),
                                    tokens, views, CHANNELS)


def test_the_checks_catch_the_reference():
    """The reference allocates an ``N × N`` mask and logits per view, and ``[M, B, N, C]`` in the
    ensemble: both checks fail on it (at N = 1024 to keep its quadratic memory small)."""
    tokens = 1024
    views, voxels = layout("language preset", tokens)
    with pytest.raises(AssertionError, match="O"):
        no_quadratic_or_per_view_tensor(guided_branch(reference, views, voxels, tokens, "mean"), tokens, VIEWS,
                                        CHANNELS)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, CHANNELS, generator=gen, requires_grad=True)
    base = torch.randn(voxels.num_segments, CHANNELS, generator=gen, requires_grad=True)
    rows = torch.randn(views.num_segments, CHANNELS, generator=gen, requires_grad=True)

    def ensemble(ops):
        def run():
            ops.ensemble_propagate(x, base, voxels.segment_ids[0], rows, views.segment_ids, 0.3).sum().backward()
        return run

    assert largest_allocation(ensemble(reference)) >= VIEWS * tokens * CHANNELS * FLOAT
    assert largest_allocation(ensemble(torch_ops)) < VIEWS * tokens * CHANNELS * FLOAT

"""Peak memory of a piece of work, on CPU or CUDA, for tests and benchmarks.

CUDA has an allocator with counters; the CPU has none, so on the CPU the PyTorch profiler
records every allocation and free (``profile_memory=True``) and the peak is the maximum of
their running sum. Only memory allocated *inside* the measured call counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return its result and the peak bytes it allocated above the start.

    Args:
        fn: the work to measure; tensors it returns stay alive and count until it returns.
        device: where the work allocates (``"cpu"`` or a CUDA device).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # allocations are attributed to the op that made them, frees are "[memory]" events
    deltas = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return result, peak

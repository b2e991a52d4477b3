"""pytest-benchmark harness: ``pytest bench/`` (full) or ``pytest bench/ --quick`` (CI smoke run).

Every benchmark records, next to pytest-benchmark's timings, ``extra_info`` fields that the
report generator (``scripts/bench_report.py``) reads: ``group``, ``case``, ``backend``,
``mode``, shape parameters, ``peak_bytes`` and, where counted, ``op_calls``. Results go to
``bench/results/{full,quick}.json`` unless ``--benchmark-json`` names another file.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from any2point_fast import ops
from any2point_fast.torch_ops import native

from . import workloads

RESULTS = Path(__file__).parent / "results"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="run every benchmark once on tiny shapes (what CI runs, so the suites cannot rot)")
    parser.addoption("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="bf16: every forward pass under bfloat16 autocast (backward outside it)")


def pytest_configure(config):
    workloads.AUTOCAST_DTYPE = torch.bfloat16 if config.getoption("--precision", "fp32") == "bf16" else None


def pytest_sessionstart(session):
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None and not bench.json:
        RESULTS.mkdir(exist_ok=True)
        bench.json = RESULTS / ("quick.json" if session.config.getoption("--quick") else "full.json")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends() -> list[str]:
    """Concrete backends that can run on this machine's device, reference first."""
    available = ops.available_backends(device())
    return [name for name in ("reference", "torch", "triton") if not available[name]]


@pytest.fixture(params=backends())
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def release_memory() -> None:
    """Collect garbage and give the C heap's free pages back to the system before a measurement, so
    one suite's leftovers (the whole model's, say) do not add up with the dense reference's 11–13 GB
    at N = 8192."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _under_autocast(fn, dev: torch.device):
    def run():
        with workloads.autocast(dev):
            return fn()

    return run


@pytest.fixture
def measure(benchmark, quick):
    """``measure(fn, rounds=3, warmup=True, memory=True, cost=None, **info)``: time ``fn``
    (synchronising CUDA; one untimed warm-up call first unless ``warmup=False``, for calls of a
    minute where it would only double the run time), then run it once more under the memory
    profiler (unless ``memory=False``) and record the peak and ``info``. With an analytic
    ``cost`` (:mod:`bench.costs`) it also records the achieved GB/s and TFLOP/s, and on a known
    GPU their fractions of the device's peaks."""
    from any2point_fast.memory import peak_memory_bytes

    from .costs import device_peaks

    def run(fn, rounds: int = 3, warmup: bool = True, memory: bool = True, cost=None, **info):
        dev = device()
        release_memory()
        if info.get("mode") == "forward":  # forward+backward callables enter autocast themselves
            fn = _under_autocast(fn, dev)

        def timed():
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out

        if quick:
            result = benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        else:
            result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=int(warmup))
        peak = peak_memory_bytes(fn, dev)[1] if memory else None
        benchmark.extra_info.update(info, peak_bytes=peak, device=str(dev), threads=torch.get_num_threads(),
                                    quick=quick, cpu_count=os.cpu_count(), compiled_kernels=native.available(dev),
                                    precision="bf16" if workloads.AUTOCAST_DTYPE is not None else "fp32")
        if cost is not None:
            seconds = benchmark.stats.stats.median
            gbps, tflops = cost.bytes / seconds / 1e9, cost.flops / seconds / 1e12
            benchmark.extra_info.update(bytes=cost.bytes, flops=cost.flops, gbps=gbps, tflops=tflops)
            peaks = device_peaks(dev)
            if peaks is not None:
                benchmark.extra_info.update(bandwidth_fraction=gbps * 1e9 / peaks[0],
                                            flops_fraction=tflops * 1e12 / peaks[1])
        return result

    return run

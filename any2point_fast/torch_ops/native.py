"""Compiled CPU kernels of the torch path, built on first use.

The torch path is PyTorch; where PyTorch has no kernel fit for a step, a small C++ kernel
(``csrc/``) does that step on CPU tensors:

- ``bucket_attention``: the attention inside every bucket of two or more tokens. Heads of dim 2
  are far below what PyTorch's flash kernel is built for: short buckets (most of them) go a
  SIMD vector of buckets of one length at a time, and the loops over a long bucket's keys
  vectorise.
- ``bucket_pool``: every pooled row under ``max + mean`` (the maximum and the mean of
  ``t_j = x + Attn_j W_oᵀ``, formed a block of channels at a time in registers), with the item
  holding each maximum; PyTorch needs several passes over every view's ``[T_j, C]`` features and
  a sparse product for the same. ``bucket_pool_backward``, under either pooling: one pass over
  the rows' gradients of all the views, cloud by cloud, for those of the tokens, of the attention
  outputs and of ``[W_o | b_o]`` (PyTorch: a sparse product, a gather and two skinny products per
  view). Both also pool the voxels (``segment_pool`` under ``max + mean``: no attention term).
- ``ensemble_forward``, ``row_dots``, ``segment_rows``: the row products of ``ensemble_propagate``,
  which PyTorch spreads over sampled and CSR sparse products and several elementwise passes; in
  C++ each is one pass over the rows it reads.
- ``layer_norm_rows`` and its backward: the normalised tokens ``x̂`` of the views' LayerNorms,
  and the tokens' gradient through them added in place, each row read once (ATen's CPU
  LayerNorm takes several times as long as a pass over the rows).
- ``aggregate_hidden``, ``aggregate_moments``, ``aggregate_max`` and, for backward,
  ``aggregate_hidden_grad`` and ``aggregate_position_grad``: the passes of
  ``neighborhood_aggregate`` over its ``[B·S·k, 2C]`` neighbour rows (and ``[B·S·k, H]`` hidden
  ones), a tile of centres at a time in cache (position code, the tile's products through BLAS,
  BatchNorm, residual, max over the neighbours with its argmax, the sparse backward): PyTorch
  needs a chunk of those rows in memory per step and a pass over it per elementwise op.
- ``batch_norm_gelu``: BatchNorm of the pooled rows, view by view, and GELU: forward one pass
  for the statistics and one for the output, backward two (PyTorch: a pass per BatchNorm step,
  per GELU and per concatenation).

The first call in a fresh environment compiles the sources with ``torch.utils.cpp_extension``
(a C++ compiler with OpenMP and ``ninja``; 30–40 s on 2 cores, said on stderr), cached
afterwards under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``) in a folder
per CPU instruction set and Python environment. Where that fails, the torch path keeps its plain PyTorch code for the
step and warns once; ``ANY2POINT_NATIVE=0`` skips the build altogether. Both routes compute the
same values up to float rounding (the tests run each against the reference).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

#: Environment variable: ``0`` keeps the torch path in plain PyTorch (no compilation).
ENV_VAR = "ANY2POINT_NATIVE"
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("aggregation.cpp", "batch_norm_gelu.cpp", "bucket_attention.cpp", "bucket_pool.cpp",
                             "ensemble.cpp", "layer_norm.cpp", "sampling.cpp"))
#: The ``torch.ops`` namespace of the compiled kernels.
NAMESPACE = "any2point_native"
#: Runs ``bucket_pool_backward`` cuts the segments into, each summing its share of ``W_o``'s
#: gradient apart (a fixed number: the sums do not depend on the threads).
POOL_BACKWARD_RUNS = 8
#: Runs of tiles the backward of ``neighborhood_aggregate`` sums its reductions over apart (fixed,
#: as :data:`POOL_BACKWARD_RUNS`).
AGGREGATE_RUNS = 8
#: Seconds into a build after which a line on stderr says that the kernels are being compiled.
NOTICE_AFTER_S = 2.0


@contextlib.contextmanager
def _ninja_on_path():
    """``cpp_extension`` runs ``ninja`` from ``PATH``: where there is none, the one the ``ninja``
    package installed beside this Python (a virtual environment that is not activated)."""
    path = os.environ.get("PATH", "")
    beside = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=beside):
        os.environ["PATH"] = os.pathsep.join((beside, path))
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's instruction sets (Linux: the ``flags`` of ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {platform.processor()} {flags}".encode()).hexdigest()[:12]


def _environment_fingerprint() -> str:
    """A short hash of this Python environment and its torch: ``cpp_extension`` writes the
    environment's include paths into ``build.ninja`` and rebuilds whenever they change, so two
    environments sharing one folder would rebuild each other's kernels at every switch."""
    where = f"{os.path.realpath(sys.prefix)} {torch.__version__} {os.path.realpath(torch.__file__)}"
    return hashlib.sha1(where.encode()).hexdigest()[:8]


def build_name() -> str:
    """The extension's name, hence its build folder under ``TORCH_EXTENSIONS_DIR``: one per
    instruction set, since ``-march=native`` code built on one CPU may not run on another (a home
    folder shared by the nodes of a cluster), and one per Python environment and torch."""
    return f"{NAMESPACE}_{_cpu_fingerprint()}_{_environment_fingerprint()}"


def _cflags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # GCC tunes AVX-512 CPUs for 256-bit loops; the position code's sine and cosine gain from 512
        flags.append("-mprefer-vector-width=512")
    return flags


@functools.cache
def _build() -> bool:
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    # a cached build loads in well under a second: only a compilation outlives the timer
    notice = threading.Timer(NOTICE_AFTER_S, print, ("any2point_fast: compiling the CPU kernels of the torch path "
                                                     "(first use: 30–40 s, cached afterwards) ...",),
                             {"file": sys.stderr, "flush": True})
    notice.start()
    try:
        from torch.utils import cpp_extension

        with _ninja_on_path():
            cpp_extension.load(build_name(), [str(path) for path in SOURCES], is_python_module=False,
                               extra_cflags=_cflags(), extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, but say so
        warnings.warn(f"any2point_fast: could not build the compiled CPU kernels ({type(error).__name__}: "
                      f"{str(error).strip()[-300:]}); the torch backend runs in plain PyTorch, slower (several "
                      f"times on long buckets). Set {ENV_VAR}=0 to skip the build.",
                      RuntimeWarning, stacklevel=3)
        return False
    finally:
        notice.cancel()
    return True


def available(device: torch.device) -> bool:
    """Whether the compiled kernels run tensors on ``device`` (CPU only), building them on first call."""
    return device.type == "cpu" and _build()


def resolve(compiled: bool | None, device: torch.device) -> bool:
    """The route a torch op takes on ``device``: ``compiled`` as asked (``True`` refused where the
    kernels do not run), or, for ``None``, compiled wherever :func:`available` says they run."""
    if compiled is None:
        return available(device)
    if compiled and not available(device):
        raise RuntimeError(f"the compiled CPU kernels do not run tensors on {device} (they run on the CPU where "
                           f"they build, and {ENV_VAR} is not 0)")
    return bool(compiled)


def ops():
    """The compiled kernels' ``torch.ops`` namespace (call :func:`available` first)."""
    return getattr(torch.ops, NAMESPACE)


__all__ = ["AGGREGATE_RUNS", "ENV_VAR", "NAMESPACE", "POOL_BACKWARD_RUNS", "available", "build_name", "ops", "resolve"]

"""Every Triton kernel compiles for sm_90 (the interpreter accepts code the compiler rejects)."""

from __future__ import annotations

import os

import pytest
import torch

from any2point_fast.geometry import ProjectionSpec, line_directions, view_rotations
from tests.ops.cases import view_weights
from tests.ops.implementations import triton_device

if torch.cuda.is_available():
    pytest.skip("on a GPU the per-op tests compile and run every kernel", allow_module_level=True)


def run_every_kernel() -> None:
    """Every op of ``kernels`` forward and backward once, in float32, float16 and head dim 64."""
    from any2point_fast import kernels as K

    device = triton_device()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (3, 2, 20), generator=gen)
    segments = K.bucket_sort(ids, 5)
    K.project_pe(torch.randn(2, 20, 3, generator=gen), torch.randn(7, 9, 36, generator=gen),
                 ProjectionSpec("2d", view_rotations(3), canvas_size=(40, 24), patch_size=8, camera_distance=1.4))
    K.project_pe(torch.randn(1, 5, 3), torch.randn(77, 8), ProjectionSpec("1d", line_directions(2)))
    K.farthest_point_sample(torch.randn(2, 30, 3, generator=gen), 5)
    for dtype, (heads, width), pooling in ((torch.float32, (6, 12), "max+mean"), (torch.float16, (1, 64), "mean")):
        x = torch.randn(2, 20, 36, generator=gen).to(device, dtype).requires_grad_()
        weights = [w.to(device, dtype).requires_grad_() for w in view_weights(3, 36, width, gen)]
        K.neighborhood_attention_pool(x, segments, *weights, heads, pooling).float().sum().backward()
    values = torch.randn(40, 36, generator=gen, requires_grad=True)
    K.segment_pool(values, ids.flatten()[:40], 5, "max+mean").sum().backward()
    x, base, rows = (torch.randn(*shape, generator=gen, requires_grad=True) for shape in
                     ((2, 20, 36), (5, 36), (segments.num_segments, 36)))
    K.ensemble_propagate(x, base, ids[0] % 5, rows, segments.segment_ids, 0.5).sum().backward()
    rows = torch.randn(24, 36, generator=gen, requires_grad=True)
    weight, bias = torch.ones(4, 36, requires_grad=True), torch.zeros(4, 36, requires_grad=True)
    out = K.batch_norm_gelu(rows, (0, 0, 1, 21, 24), weight, bias, torch.zeros(4, 36), torch.ones(4, 36),
                            (False, False, True, False))[0]
    out.sum().backward()
    feat, offsets, weight1, weight2 = (torch.randn(*shape, generator=gen, requires_grad=True) for shape in
                                       ((2, 12, 6), (2, 5, 3, 3), (3, 12), (12, 3)))
    norm1, norm2 = (torch.ones(width, requires_grad=True) for width in (3, 12))
    centres, neighbours = torch.randint(0, 12, (2, 5), generator=gen), torch.randint(0, 12, (2, 5, 3), generator=gen)
    out = K.neighborhood_aggregate(feat, offsets, centres, neighbours, weight1, norm1, norm1, torch.zeros(3),
                                   torch.ones(3), weight2, norm2, norm2, torch.zeros(12), torch.ones(12), True, 1e-5,
                                   1000.0, 100.0)[0]
    out.sum().backward()


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
failures = []
for module, name, signature, constexprs, num_warps in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(module), name)
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as error:
        failures.append(f"{name}: {error!r}"[:2000])
print(json.dumps(failures))
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(monkeypatch):
    """The interpreter accepts code the compiler rejects: compile every launched kernel for sm_90, offline.

    Records one launch of each kernel (argument types, constexprs, ``num_warps``) while the ops run
    under the interpreter, then compiles them to cubin in a subprocess without ``TRITON_INTERPRET``
    (Triton's bundled ``ptxas``; no GPU needed).
    """
    import inspect
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.runtime.interpreter import InterpretedFunction

    pointer_types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                     torch.int32: "*i32"}
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = {**dict(zip(params, args)), **{k: v for k, v in kwargs.items() if k in params}}
        signature, constexprs = {}, {}
        for name, value in bound.items():
            if "constexpr" in str(params[name].annotation):
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = pointer_types[value.dtype]
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        launches.setdefault(self.fn.__name__, (self.fn.__module__, self.fn.__name__, signature, constexprs,
                                               kwargs.get("num_warps", 4)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    run_every_kernel()
    assert len(launches) >= 30
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(list(launches.values())),
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

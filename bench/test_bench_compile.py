"""``torch.compile``d vs eager: the whole model's training step and inference, on the fused backends.

The model is :mod:`bench.test_bench_model`'s small ViT (the tiny one under ``--quick``). The fused ops
enter the graph as custom ops (:mod:`any2point_fast.custom_ops`) and the whole forward (and loss) is
one graph (``fullgraph=True``); backward and the optimiser step run as usual. The full run compiles
with inductor (a C++ compiler on the CPU); ``--quick`` with ``aot_eager``, which only proves that the
suite still traces. Compilation happens before timing. The compiled step runs every fused op's
forward once (its backward custom op runs the graph the forward recorded) and copies its outputs once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from . import workloads
from .test_bench_model import build


def _compiler(quick: bool) -> str:
    return "aot_eager" if quick else "inductor"


@pytest.fixture(params=["eager", "compiled"])
def compiled(request, backend, quick):
    if backend == "reference":
        pytest.skip("the oracle is not what one compiles")
    return request.param


def test_compiled_training_step(measure, backend, quick, compiled):
    model, points, labels = build("small-vit", quick)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    model.train()

    def loss_of(points, labels):
        return F.cross_entropy(model(points), labels)

    forward = loss_of if compiled == "eager" else torch.compile(loss_of, backend=_compiler(quick), fullgraph=True)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with workloads.autocast(points.device):  # compiled under the autocast state it runs in
            loss = forward(points, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step()  # compiles
    loss = measure(step, rounds=3, memory=False, group="compile:train-step", case=f"small-vit B={points.shape[0]}",
                   backend=backend, mode=f"forward+backward, {compiled}", compiled=compiled,
                   compiler=_compiler(quick) if compiled == "compiled" else None, samples=points.shape[0])
    assert torch.isfinite(loss)


def test_compiled_inference(measure, backend, quick, compiled):
    model, points, _ = build("small-vit", quick)
    model.eval()
    forward = model if compiled == "eager" else torch.compile(model, backend=_compiler(quick), fullgraph=True)

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return forward(points)

    infer()  # compiles
    logits = measure(infer, rounds=3, memory=False, group="compile:inference", case=f"small-vit B={points.shape[0]}",
                     backend=backend, mode=f"forward, {compiled}", compiled=compiled,
                     compiler=_compiler(quick) if compiled == "compiled" else None, samples=points.shape[0])
    assert logits.shape == (points.shape[0], 15) and torch.isfinite(logits).all()

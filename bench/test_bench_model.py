"""The whole model: training step (samples/s) and inference throughput (clouds/s).

The published recipe's training step (B = 32, P = 1024, N = 128, k = 81) on a MiniLM-sized BERT
(width 384, 6 layers, random weights): its tokenizer alone at that shape is the forward+backward
case of ``test_bench_tokenizer.py``, so the report gives the tokenizer's share of the step from
one run.

Two frozen backbones with random weights (no download): a small ViT (width 192, 4 layers) and
a ViT-B-sized one (width 768, 12 layers, 12 heads) at the paper's scale (B = 32, P = 1024,
N = 128; k = 81 on CUDA, k = 16 on a CPU, where the tokenizer's backward at k = 81 alone needs
more than this machine's 24 GiB). Backbone attention is PyTorch SDPA on CPU (xformers on CUDA).
The adapters and geometry run on each available backend; everything else is the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from any2point_fast.model import Any2PointModel

from . import workloads
from .conftest import device

BACKBONES = {
    "small-vit": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768),
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build(name: str, quick: bool) -> tuple[Any2PointModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96) if quick \
        else BACKBONES[name]
    vit = ViTModel(ViTConfig(image_size=224, patch_size=16, **sizes), add_pooling_layer=False)
    overrides = dict(num_points=256, num_tokens=32, knn_k=8) if quick else {}
    if not quick and device().type == "cpu":
        overrides["knn_k"] = 16
    model = Any2PointModel(vit, "vision", num_classes=15, attn_implementation="auto", **overrides).to(device())
    batch = 2 if quick else 32
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(batch, model.config.num_points, 3, generator=gen).to(device())
    labels = torch.randint(0, 15, (batch,), generator=gen).to(device())
    return model, points, labels


def training_step(model: Any2PointModel, points: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One AdamW step of ``model`` (put in training mode) on ``points`` ``[B, P, 3]``: forward under the
    run's autocast, cross-entropy, backward, grad-norm clip 10; the callable returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with workloads.autocast(points.device):
            loss = torch.nn.functional.cross_entropy(model(points), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("name", list(BACKBONES))
def test_training_step(measure, backend, quick, name):
    model, points, labels = build(name, quick)
    step = training_step(model, points, labels)
    loss = measure(step, rounds=1 if name == "vit-b" else 3, memory=name != "vit-b", group="model:train-step",
                   case=f"{name} B={points.shape[0]}", backend=backend, mode="forward+backward",
                   samples=points.shape[0])
    assert torch.isfinite(loss)


def test_recipe_training_step(measure, backend, quick):
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96) if quick \
        else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    bert = BertModel(BertConfig(**sizes), add_pooling_layer=False)
    shape = dict(num_points=128, num_tokens=16, knn_k=8, tokenizer_dim=8) if quick \
        else dict(num_points=1024, num_tokens=128, knn_k=81)
    model = Any2PointModel(bert, "language", num_classes=40, attn_implementation="auto", **shape).to(device())
    batch = 2 if quick else 32
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(batch, model.config.num_points, 3, generator=gen).to(device())
    labels = torch.randint(0, 40, (batch,), generator=gen).to(device())
    step = training_step(model, points, labels)

    config = model.config
    slow = backend == "reference"
    loss = measure(step, rounds=1 if slow else 3, warmup=not slow, memory=False, group="model:recipe-step",
                   case=f"minilm-size B={batch} P={config.num_points} N={config.num_tokens} k={config.knn_k}",
                   backend=backend, mode="forward+backward", samples=batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_inference(measure, backend, quick, name):
    model, points, _ = build(name, quick)
    model.eval()

    def infer() -> torch.Tensor:
        with torch.inference_mode():
            return model(points)

    logits = measure(infer, rounds=1 if name == "vit-b" else 3, memory=name != "vit-b", group="model:inference",
                     case=f"{name} B={points.shape[0]}", backend=backend, mode="forward", samples=points.shape[0])
    assert logits.shape == (points.shape[0], 15) and torch.isfinite(logits).all()

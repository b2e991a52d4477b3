"""A short end-to-end forward/backward of the reference model on random clouds.

``python -m any2point_fast.demo [--preset language|vision|audio] [--batch B] [--points P]``
prints the shapes, the parameter counts and the time of each step.
"""

from __future__ import annotations

import argparse
import time

import torch

from .config import Any2PointConfig
from .reference import ReferenceModel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="language", choices=("language", "vision", "audio"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=192, help="width of the stand-in frozen backbone")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--knn", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = Any2PointConfig.preset(args.preset, hidden_size=args.hidden, num_points=args.points, knn_k=args.knn)
    model = ReferenceModel(config, num_layers=args.layers)
    points = torch.randn(args.batch, args.points, 3)
    labels = torch.randint(0, config.num_classes, (args.batch,))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {config.pe_kind} PE, {config.num_views} views, "
          f"{config.buckets_per_view} buckets per view, pooling {config.pooling}")
    print(f"input points {tuple(points.shape)} -> tokens {config.token_counts[-1]} of width {config.hidden_size}")
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.2f}")

    start = time.perf_counter()
    tokens, centers = model.tokenizer(points)
    pe, geometry = model.geometry(centers)
    print(f"tokens {tuple(tokens.shape)}, centres {tuple(centers.shape)}, PE {tuple(pe.shape)}, "
          f"{geometry.views.num_segments} view buckets, {geometry.voxels.num_segments} voxels "
          f"({time.perf_counter() - start:.2f} s)")

    start = time.perf_counter()
    logits = model(points)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    print(f"logits {tuple(logits.shape)}, loss {loss.item():.4f}; forward {forward_s:.2f} s, "
          f"backward {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

"""Evaluation metrics: part-segmentation mIoU (ShapeNetPart definitions) and mean-class accuracy.

Part segmentation follows the definitions every ShapeNetPart result uses (PointNet++, Point-MAE,
ReCon, ...):

- a shape's prediction is restricted to the parts of its (known) category: the argmax is taken
  over those parts' logits only;
- a shape's IoU is the mean over the parts of its category of ``|pred ∩ truth| / |pred ∪ truth|``,
  a part absent from both prediction and truth counting IoU 1;
- **instance mIoU**: the mean of the shape IoUs over all shapes; **class mIoU**: the mean over
  categories of the mean shape IoU of each category (categories without a test shape are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def restricted_argmax(logits: torch.Tensor, category: torch.Tensor,
                      category_parts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per point, the most likely part among the parts of its shape's category.

    Args:
        logits: ``[B, P, K]`` float part logits (``K`` parts of all categories).
        category: ``[B]`` int64 category of each shape.
        category_parts: for each category, its part ids (indices into ``K``).

    Returns:
        ``[B, P]`` int64 part ids, each one of its category's parts.
    """
    allowed = torch.zeros(len(category_parts), logits.shape[-1], dtype=torch.bool, device=logits.device)
    for cat, parts in enumerate(category_parts):
        allowed[cat, list(parts)] = True
    masked = logits.float().masked_fill(~allowed[category][:, None, :], float("-inf"))
    return masked.argmax(dim=-1)


def shape_iou(pred: torch.Tensor, truth: torch.Tensor, parts: Sequence[int]) -> float:
    """Mean IoU over ``parts`` of one shape's ``[P]`` predicted and true part ids (absent from both: 1)."""
    ious = []
    for part in parts:
        p, t = pred == part, truth == part
        union = int((p | t).sum())
        ious.append(1.0 if union == 0 else int((p & t).sum()) / union)
    return sum(ious) / len(ious)


@dataclass
class PartSegmentationScores:
    """Accumulates shape IoUs by category; :meth:`result` gives the instance and class mIoU.

    ``categories``: category names; ``category_parts``: each category's part ids.
    """

    categories: Sequence[str]
    category_parts: Sequence[Sequence[int]]
    shape_ious: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.categories) != len(self.category_parts):
            raise ValueError(f"{len(self.categories)} categories but {len(self.category_parts)} part lists")
        self.shape_ious = [[] for _ in self.categories]

    def add(self, pred: torch.Tensor, truth: torch.Tensor, category: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``truth`` ``[B, P]`` int64 part ids, ``category`` ``[B]`` int64."""
        for p, t, c in zip(pred.cpu(), truth.cpu(), category.cpu().tolist()):
            self.shape_ious[c].append(shape_iou(p, t, self.category_parts[c]))

    def merge(self, other: PartSegmentationScores) -> None:
        """Add the shapes of ``other`` (another process's share)."""
        for mine, theirs in zip(self.shape_ious, other.shape_ious):
            mine.extend(theirs)

    def per_category(self) -> dict[str, tuple[float, int]]:
        """``name -> (mean IoU, shapes)`` of every category with at least one shape."""
        return {name: (sum(ious) / len(ious), len(ious))
                for name, ious in zip(self.categories, self.shape_ious) if ious}

    def result(self) -> dict[str, float]:
        """``instance_miou``, ``class_miou`` (fractions in [0, 1]) and ``shapes``."""
        every = [iou for ious in self.shape_ious for iou in ious]
        means = [mean for mean, _ in self.per_category().values()]
        return {"instance_miou": sum(every) / len(every) if every else 0.0,
                "class_miou": sum(means) / len(means) if means else 0.0, "shapes": float(len(every))}

    def table(self) -> str:
        """One line per category: ``name  shapes  mIoU%``."""
        width = max((len(name) for name in self.categories), default=8)
        lines = [f"{'category':<{width}}  shapes   mIoU"]
        for name, (miou, count) in self.per_category().items():
            lines.append(f"{name:<{width}}  {count:6d}  {100 * miou:5.1f}%")
        return "\n".join(lines)


def mean_class_accuracy(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``truth`` of their accuracy; ``pred``, ``truth``: ``[n]`` int64."""
    truth, hits = truth.cpu(), (pred.cpu() == truth.cpu()).double()
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, truth, hits)
    total = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, truth, torch.ones_like(hits))
    seen = total > 0
    return float((correct[seen] / total[seen]).mean()) if bool(seen.any()) else 0.0


def format_segmentation(scores: dict[str, float]) -> str:
    """The final line of a part-segmentation run and of ``eval``: ``test instance mIoU: 83.1% (class mIoU 80.2%)``."""
    return f"test instance mIoU: {100 * scores['instance_miou']:.1f}% (class mIoU {100 * scores['class_miou']:.1f}%)"


__all__ = ["PartSegmentationScores", "format_segmentation", "mean_class_accuracy", "restricted_argmax", "shape_iou"]

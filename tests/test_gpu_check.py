"""The prepared GPU check (``scripts/gpu_check.sh``) as a dry run on the CPU, so that it cannot rot
before a GPU machine runs it; and its report section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402
import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_step_runs_and_records_its_results(dry_run):
    assert dry_run["dry_run"] is True and dry_run["device"] == "cpu"
    assert {name: step["status"] for name, step in dry_run["steps"].items()} == dict.fromkeys(
        ("op_tests", "bench_fp32", "bench_bf16", "train_step", "compile", "main_job"), "ok")
    assert dry_run["steps"]["op_tests"]["counts"]["passed"] >= 1
    precisions = {(row["group"], row["precision"]) for row in dry_run["bench"]}
    assert {("tokenizer:farthest_point_sample", "fp32"), ("tokenizer:farthest_point_sample", "bf16"),
            ("model:train-step", "bf16"), ("compile:train-step", "bf16")} <= precisions
    assert 0.0 <= dry_run["main_job_accuracy"] <= 100.0 and dry_run["copy_bandwidth_bytes_per_s"] > 0
    assert dry_run["attention"] in ("sdpa", "xformers") and dry_run["versions"]["torch"]


def test_the_report_shows_the_steps_and_the_targets(dry_run):
    section = "\n".join(bench_report.gpu_section(dry_run))
    assert section.startswith("## GPU") and "a dry run on the CPU" in section
    assert "| bench_bf16 | ok |" in section
    assert f"test accuracy {dry_run['main_job_accuracy']:.1f} %" in section
    assert "| training step (ViT-B stand-in, bf16): triton ≥ 1.5× reference | – | not measured |" in section


def test_targets_are_judged_from_the_measured_figures():
    def row(group, case, mode, backend, median, **extra):
        return dict(group=group, case=case, mode=mode, backend=backend, median=median, precision="bf16", **extra)

    rows = [row("adapter", "language B=32 N=128", "forward+backward", "triton", 0.010),
            row("adapter", "language B=32 N=128", "forward+backward", "reference", 0.060),
            row("adapter", "language B=32 N=128", "forward+backward", "torch", 0.015),
            row("op:segment_pool", "vision B=32 N=1024", "forward", "triton", 0.001, gbps=1500.0),
            row("model:train-step", "vit-b B=32", "forward+backward", "triton", 1.0),
            row("model:train-step", "vit-b B=32", "forward+backward", "reference", 1.2)]
    lines = bench_report.gpu_targets(rows, bandwidth=3000e9)
    assert "| adapter fwd+bwd bf16, language B=32 N=128: triton ≥ 5× reference | 6.0× | met |" in lines
    assert "| adapter fwd+bwd bf16, language B=32 N=128: triton ≥ 2× torch | 1.5× | missed |" in lines
    assert "| op:segment_pool vision B=32 N=1024 forward bf16: ≥ 50 % of measured bandwidth | 50 % | met |" in lines
    assert "| training step (ViT-B stand-in, bf16): triton ≥ 1.5× reference | 1.20× | missed |" in lines


def test_the_gpu_run_names_only_files_that_exist():
    """The dry run selects other tests, so a moved test file would only fail on the GPU."""
    for path in [*gpu_check.GPU_TESTS, *gpu_check.BENCH_FILES]:
        assert (ROOT / path).exists(), path

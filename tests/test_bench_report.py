"""``scripts/bench_report.py`` keeps the sections other scripts wrote when it regenerates BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402


def test_kept_sections_run_from_their_heading_to_the_next(tmp_path):
    old = tmp_path / "BENCHMARKS.md"
    old.write_text("# Benchmarks\n\n## Targets\n\nx\n\n## Part segmentation: training step (bench/x.py)\n\n"
                   "| a |\n\n## Whole model\n\ny\n\n## Transfer\n\nz\n![plot](p.png)\n")
    assert bench_report.kept_sections(old) == ("## Part segmentation: training step (bench/x.py)\n\n| a |\n\n"
                                               "## Transfer\n\nz\n![plot](p.png)\n")
    assert bench_report.kept_sections(tmp_path / "missing.md") == ""
    old.write_text("# Benchmarks\n\n## Transfer\n\nz\n\n## Transfer diagnosis (by hand)\n\nw\n\n## Whole model\n\ny\n")
    assert bench_report.kept_sections(old) == "## Transfer\n\nz\n\n## Transfer diagnosis (by hand)\n\nw\n"
    old.write_text("# Benchmarks\n\nsee ## Transfer below\n")  # a title inside a line is no heading
    assert bench_report.kept_sections(old) == ""


def _row(group: str, case: str, mode: str, backend: str, median: float, peak: int | None = None) -> dict:
    return dict(group=group, case=case, mode=mode, backend=backend, median=median, peak_bytes=peak)


def test_tokenizer_targets_compare_within_one_run_and_give_the_share_of_the_step():
    case = "B=32 P=1024 N=128 k=81"
    rows = [_row("tokenizer:farthest_point_sample", "B=8 P=16384 S=4096", "forward", "reference", 70.0),
            _row("tokenizer:farthest_point_sample", "B=8 P=16384 S=4096", "forward", "torch", 0.5),
            _row("tokenizer:knn", "B=8 P=16384 S=4096 k=32", "forward", "reference", 3.0, 6000),
            _row("tokenizer:knn", "B=8 P=16384 S=4096 k=32", "forward", "torch", 2.0, 1000),
            _row("tokenizer", case, "forward+backward", "reference", 33.0, 12000),
            _row("tokenizer", case, "forward+backward", "torch", 3.0, 600),
            _row("model:recipe-step", f"minilm-size {case}", "forward+backward", "torch", 8.0)]
    lines = bench_report.targets(rows)
    verdicts = {line.split(" | ")[0].lstrip("| "): line.rsplit(" | ", 1)[1].rstrip(" |") for line in lines[2:]}
    assert verdicts == {
        "farthest_point_sample B=8 P=16384 S=4096: torch ≥ 20× faster": "met",  # 140×
        "knn B=8 P=16384 S=4096 k=32: ≤ 1/10 of the reference's peak memory": "missed",  # 1/6
        f"tokenizer fwd+bwd, {case}: torch ≥ 10× faster": "met",  # 11×
        f"tokenizer fwd+bwd, {case}: ≤ 1/10 of the reference's peak memory": "met",  # 1/20
        "recipe training step, MiniLM-sized: ≥ 3× faster than 32 s": "met",  # 4×
        "recipe training step: tokenizer fwd+bwd ≤ 25 % of it": "missed",  # 38 %
    }
    assert any("| 8.0 s (4.0×) |" in line for line in lines)

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
    old.write_text("# Benchmarks\n\nsee ## Transfer below\n")  # a title inside a line is no heading
    assert bench_report.kept_sections(old) == ""

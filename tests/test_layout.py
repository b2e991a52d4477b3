"""The repository's layout against the installed environment: nothing in the repository root may
shadow an installed distribution's module, since the root is on ``sys.path`` whenever Python
starts there (``python -m any2point_fast``, ``python -c``, pytest's rootdir insertion).

A top-level ``kernels/`` package once shadowed Hugging Face's ``kernels`` (imported by
transformers), and every import of transformers from the root failed."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = "any2point-fast"


def _run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _importable_name(entry: Path) -> str | None:
    """The module name ``entry`` provides when its folder is on ``sys.path``, if any."""
    if entry.is_dir():
        return entry.name if entry.name.isidentifier() else None
    for suffix in importlib.machinery.all_suffixes():
        if entry.name.endswith(suffix):
            return entry.name[: -len(suffix)]
    return None


def test_no_root_entry_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    clashes = []
    for entry in sorted(ROOT.iterdir()):
        name = _importable_name(entry)
        if name is None or name.startswith("."):
            continue
        others = sorted({dist for dist in owners.get(name, []) if dist.lower().replace("_", "-") != OURS})
        if others:
            clashes.append(f"{entry.name}/ shadows the module {name!r} of {', '.join(others)}")
    assert not clashes, "; ".join(clashes)


def test_transformers_and_the_library_import_from_the_repository_root():
    """With Hugging Face's ``kernels`` installed (transformers >= 5.25 imports it), Python started
    in the root finds the installed ``kernels``, and the library's Triton kernels load under one
    name, ``any2point_fast.kernels``."""
    try:
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed here: nothing in the environment to shadow")
    script = ("import sys, transformers.modeling_utils, any2point_fast.model, any2point_fast.kernels, kernels; "
              "print(kernels.__file__); print(sorted(m for m in sys.modules if m.split('.')[0] == 'kernels' "
              "and 'any2point' in (getattr(sys.modules[m], '__file__', '') or '')))")
    result = _run_in_root("-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    kernels_file, ours_under_top_level_name = result.stdout.strip().splitlines()[-2:]
    assert Path(kernels_file).resolve() == Path(installed).resolve(), kernels_file
    assert ours_under_top_level_name == "[]"


def test_info_runs_from_the_repository_root():
    result = _run_in_root("-m", "any2point_fast", "info")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"transformers {importlib.metadata.version('transformers')}" in result.stdout


def test_the_wheel_ships_every_package_and_the_kernel_sources(tmp_path):
    """A built wheel holds every package of the source tree (the Triton kernels included) and the
    C++ sources of the compiled CPU kernels."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "any2point_fast", source / "any2point_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(ROOT)) for path in (ROOT / "any2point_fast").rglob("*")
                if path.suffix in (".py", ".cpp", ".h", ".yaml") and "__pycache__" not in path.parts}
    assert expected - names == set()
    assert "any2point_fast/kernels/attention.py" in names
    assert not any(name.startswith(("kernels/", "tests/", "bench/")) for name in names)


def test_training_modules_have_one_job_each():
    """``training/`` is split by job (run config, factories, loop, evaluation, ...): no module of it grows
    past 400 lines, where a newcomer gets lost again."""
    folder = ROOT / "any2point_fast" / "training"
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert "engine.py" in sizes and "run_config.py" in sizes
    assert {name: size for name, size in sizes.items() if size > 400} == {}

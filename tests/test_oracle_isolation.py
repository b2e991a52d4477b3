"""The oracle is only an oracle (DESIGN.md §2): no production module imports ``any2point_fast.reference``, the
oracle imports no production code but the shared data classes, and a whole forward and backward through the
public API never loads it.

Only the op registry names the oracle, as a string (``"any2point_fast.reference"``, the ``reference``
implementation it imports on first use), and ``any2point_fast.ReferenceModel`` loads it lazily when asked for
(the package's ``_LAZY`` map, a bare submodule name); tests and benchmarks import it freely.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "any2point_fast"
ORACLE = "any2point_fast.reference"
#: Modules that may name the oracle as a string of its dotted path (never by an import statement).
NAMES_THE_ORACLE = {"any2point_fast.registry"}
#: What the oracle may import from the library: the configuration, the shared geometry data classes,
#: and the input checks whose errors are the public ``InputError``.
ORACLE_MAY_IMPORT = {"any2point_fast.config", "any2point_fast.geometry", "any2point_fast.validation"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, relative ones resolved; ``from x import y``
    gives ``x.y`` as well as ``x`` (``y`` may be a submodule: ``from . import reference``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def module_path_strings(path: Path) -> list[tuple[int, str]]:
    """String constants that are a dotted path of the oracle (docstrings and messages do not count)."""
    pattern = re.compile(rf"{re.escape(ORACLE)}(\.\w+)*")
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value)]


def is_oracle(module: str) -> bool:
    return module == ORACLE or module.startswith(ORACLE + ".")


def production_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "reference" not in p.relative_to(PACKAGE).parts[:1])


def oracle_imports(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of the oracle in ``path`` (under the repository ``root``), and strings naming it where
    that is not allowed."""
    where = path.relative_to(root)
    statements = {}  # line → the first (shortest) oracle module its statement imports
    for line, module in imported_modules(path, root):
        if is_oracle(module):
            statements.setdefault(line, module)
    problems = [f"{where}:{line} imports {module}" for line, module in statements.items()]
    if module_name(path, root) not in NAMES_THE_ORACLE:
        problems += [f"{where}:{line} names {value!r}" for line, value in module_path_strings(path)]
    return problems


def test_no_production_module_imports_the_oracle():
    files = production_files()
    assert PACKAGE / "model.py" in files and PACKAGE / "torch_ops" / "projection.py" in files
    problems = [problem for path in files for problem in oracle_imports(path)]
    assert not problems, "production code imports the oracle:\n" + "\n".join(problems)


@pytest.mark.parametrize("line", [
    "from .reference import ReferenceModel",
    "from .reference.model import ClassificationHead",
    "from . import reference",
    "from . import config, reference as oracle",
    "import any2point_fast.reference",
    "import any2point_fast.reference.adapter as adapter",
    "from any2point_fast.reference.projection import voxel_ids",
    "from any2point_fast import reference",
    "MODULE = importlib.import_module('any2point_fast.reference')",
])
def test_the_check_catches_every_form_of_import(tmp_path, line):
    """The check above run on a copy of ``model.py`` with one more line; ``from ..reference`` from a subpackage."""
    copy = tmp_path / "any2point_fast" / "model.py"
    copy.parent.mkdir()
    copy.write_text((PACKAGE / "model.py").read_text() + f"\n{line}\n")
    nested = tmp_path / "any2point_fast" / "torch_ops" / "projection.py"
    nested.parent.mkdir()
    nested.write_text("from ..reference.projection import line_positions\nfrom ..geometry import ProjectionSpec\n")
    assert oracle_imports(copy, tmp_path), line
    assert oracle_imports(nested, tmp_path) == ["any2point_fast/torch_ops/projection.py:1 imports "
                                                "any2point_fast.reference.projection"]
    assert not oracle_imports(PACKAGE / "model.py")
    assert not oracle_imports(PACKAGE / "registry.py")  # its string is the allowed one
    assert module_path_strings(PACKAGE / "registry.py")


def test_the_oracle_imports_only_the_shared_data_classes():
    """``reference/`` is an independent transcription of DESIGN.md §1: besides torch and itself it reads
    only :data:`ORACLE_MAY_IMPORT` (so the property tests compare two independent programs)."""
    problems = []
    for path in sorted((PACKAGE / "reference").rglob("*.py")):
        for line, module in imported_modules(path):
            library = module.startswith("any2point_fast.")
            if library and not is_oracle(module) and not any(module == m or module.startswith(m + ".")
                                                             for m in ORACLE_MAY_IMPORT):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not problems, "the oracle depends on production code:\n" + "\n".join(problems)


RUN = textwrap.dedent("""
    import importlib, sys
    import torch
    import any2point_fast

    assert "any2point_fast.reference" not in sys.modules, "import any2point_fast loads the oracle"
    for name in sys.argv[1:]:
        importlib.import_module(name)
        assert "any2point_fast.reference" not in sys.modules, f"importing {name} loads the oracle"
    from any2point_fast import Any2PointConfig, Any2PointModel, StandInModel, ops

    ops.set_backend("auto")
    small = dict(num_points=128, num_tokens=16, knn_k=4, num_classes=3)
    points = torch.randn(2, 128, 3, generator=torch.Generator().manual_seed(0))
    stand_in = StandInModel(Any2PointConfig.preset("vision", hidden_size=24, **small), num_layers=2, num_heads=2)
    stand_in(points).square().sum().backward()

    import transformers
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=30, hidden_size=24, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=48))
    model = Any2PointModel(bert, "language", **small)
    model(points).square().sum().backward()
    assert model.tokenizer.stages[0].mlp[0].weight.grad.abs().sum() > 0
    loaded = sorted(name for name in sys.modules if name.startswith("any2point_fast.reference"))
    assert not loaded, f"a forward and backward loaded the oracle: {loaded}"
    any2point_fast.ReferenceModel  # the public name still resolves: the oracle loads now, on demand
    assert "any2point_fast.reference" in sys.modules
    print("isolated")
""")


def test_a_forward_and_backward_through_the_public_api_never_loads_the_oracle():
    env = {k: v for k, v in os.environ.items() if k not in ("ANY2POINT_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    modules = [module_name(path) for path in production_files() if path.name != "__main__.py"]
    result = subprocess.run([sys.executable, "-c", RUN, *modules], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("isolated"), result.stderr[-4000:]

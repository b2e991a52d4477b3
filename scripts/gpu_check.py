"""One prepared GPU check (issue 19): correctness of the compiled Triton path in fp32/fp16/bf16,
benchmarks in fp32 and bf16 autocast, a whole training step eager and under ``torch.compile``, and
the main job in bf16, written as one JSON file that ``scripts/bench_report.py --gpu FILE`` turns
into the GPU section of BENCHMARKS.md.

Usage (from the repository root; on the GPU machine only its image's packages are needed, the
checkout is used through ``PYTHONPATH``): ``bash scripts/gpu_check.sh RESULTS.json [--dry-run]``.
``--dry-run`` runs every step on the CPU on tiny shapes (CI runs it, so the script cannot rot).

Each step runs in a subprocess with its own time limit, so that one slow or failing step never
costs the others: the file records for every step its status, seconds and the end of its output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Per-step limits in seconds, sized to end within 8 minutes on an H100 (first compilation included).
LIMITS = {"op_tests": 120, "bench_fp32": 75, "bench_bf16": 75, "train_step": 60, "compile": 75, "main_job": 60}
#: The tests the GPU run compiles on CUDA: every op in fp32, fp16 and bf16, degenerate clouds, autocast.
GPU_TESTS = ["tests/ops", "tests/test_robustness.py", "tests/test_autocast.py"]
BENCH_FILES = ["bench/test_bench_ops.py", "bench/test_bench_adapter.py", "bench/test_bench_scaling.py",
               "bench/test_bench_tokenizer.py"]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "xformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "driver": None, "cuda": None}
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda}


def copy_bandwidth(dry_run: bool) -> float:
    """Bytes/s of a device-to-device copy (read + write) of a large buffer, the best of 10."""
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    n = (1 << 20) if dry_run else (1 << 30)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n / best


def run_step(name: str, command: list[str], limit: float, env: dict[str, str]) -> dict:
    """Run ``command`` from the root within ``limit`` seconds; its status, seconds and output's end."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        status = f"stopped at its {limit:.0f} s limit"
        output = (stopped.stdout or b"").decode(errors="replace") + (stopped.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "output_tail": output[-3000:]}


def pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 12, "failed": 1, ...}`` from pytest's summary line."""
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}


def bench_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if "group" in info:
            rows.append({**info, "median": bench["stats"]["median"], "name": bench["name"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny shapes")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    scale = 3.0 if args.dry_run else 1.0  # a busy 2-core CPU needs longer for the tiny shapes
    python, quick = sys.executable, ["--quick"] if args.dry_run else []
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "dry_run": args.dry_run, "versions": versions(), **device_info(), "steps": {}}
    results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(args.dry_run)
    steps = results["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the dry run only proves the plumbing: one small selection per step (CI runs the rest anyway)
        tests = ["tests/ops/test_knn.py", "-k", "bad_inputs"] if args.dry_run else GPU_TESTS
        steps["op_tests"] = run_step("op_tests", [python, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"],
                                     LIMITS["op_tests"] * scale, env)
        steps["op_tests"]["counts"] = pytest_counts(steps["op_tests"]["output_tail"])
        for precision in ("fp32", "bf16"):
            name, out = f"bench_{precision}", tmp / f"bench_{precision}.json"
            files = ["bench/test_bench_tokenizer.py", "-k", "farthest"] if args.dry_run else BENCH_FILES
            steps[name] = run_step(name, [python, "-m", "pytest", *files, *quick, "-q", "-p", "no:cacheprovider",
                                          "--precision", precision, f"--benchmark-json={out}"],
                                   LIMITS[name] * scale, env)
            results.setdefault("bench", []).extend(bench_rows(out))
        out = tmp / "train_step.json"
        selection = "training_step and small and torch" if args.dry_run else "training_step"
        steps["train_step"] = run_step("train_step", [python, "-m", "pytest", "bench/test_bench_model.py", *quick,
                                                      "-q", "-p", "no:cacheprovider", "-k", selection,
                                                      "--precision", "bf16", f"--benchmark-json={out}"],
                                       LIMITS["train_step"] * scale, env)
        results["bench"] = results.get("bench", []) + bench_rows(out)
        # torch.compile of the whole model on the Triton path (fullgraph: a graph break fails), against eager
        out = tmp / "compile.json"
        selection = "training and torch" if args.dry_run else "training"
        steps["compile"] = run_step("compile", [python, "-m", "pytest", "bench/test_bench_compile.py", *quick, "-q",
                                                "-p", "no:cacheprovider", "-k", selection, "--precision", "bf16",
                                                f"--benchmark-json={out}"],
                                    LIMITS["compile"] * scale, env)
        results["bench"] += bench_rows(out)
        job = ["--set", "train.epochs=1", "data.train_options.num_samples=64", "data.test_options.num_samples=32"] \
            if args.dry_run else ["--set", "train.device=cuda"]
        steps["main_job"] = run_step("main_job", [python, "-m", "any2point_fast", "train", "--output",
                                                  str(tmp / "run"), *job, "train.precision=bf16"],
                                     LIMITS["main_job"] * scale, env)
        found = re.findall(r"test accuracy: ([\d.]+)%", steps["main_job"]["output_tail"])
        results["main_job_accuracy"] = float(found[-1]) if found else None
    results["attention"] = "xformers" if results["versions"]["xformers"] != "not installed" else "sdpa"
    args.results.write_text(json.dumps(results, indent=1))
    failed = [name for name, step in steps.items() if step["status"] != "ok"]
    print(f"[gpu_check] wrote {args.results}; " + (f"steps not ok: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

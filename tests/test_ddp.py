"""Data-parallel training: 2 CPU processes with gloo, initialised from torchrun-style environment variables."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from any2point_fast.train_state import load_checkpoint, read_safetensors, write_safetensors
from any2point_fast.training.checkpointing import trainable_state
from any2point_fast.training.engine import train
from any2point_fast.training.run_config import RunConfig

WORLD = 2
RUN = {
    "model": {"hidden_size": 32, "layers": 1, "heads": 2, "num_tokens": 16, "knn_k": 8, "tokenizer_dim": 8,
              "head_hidden": 32, "head_dropout": 0.1},
    "data": {"num_points": 64, "cache": True, "train_options": {"num_samples": 96},
             "test_options": {"num_samples": 24}},
    "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0.5, "num_workers": 0, "num_threads": 1,
              "deterministic": True, "progress": False, "backend": "reference"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str, results: str) -> None:
    """One torchrun-like process: the environment is all ``train`` gets to join the group."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    losses: list[float] = []
    result = train(RunConfig.from_dict(RUN), out, log=lambda line: None,
                   on_step=lambda step, loss: losses.append(loss))
    assert not dist.is_initialized()  # train() owns and destroys the group it created
    write_safetensors(Path(results) / f"rank{rank}.safetensors", trainable_state(result.model))
    (Path(results) / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "acc": result.final["acc"]}))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out, results = tmp_path_factory.mktemp("ddp_out"), tmp_path_factory.mktemp("ddp_results")
    mp.spawn(_worker, args=(free_port(), str(out), str(results)), nprocs=WORLD, join=True)
    ranks = [(read_safetensors(results / f"rank{r}.safetensors"),
              json.loads((results / f"rank{r}.json").read_text())) for r in range(WORLD)]
    return out, ranks


def test_replicas_hold_identical_weights(ddp_run):
    _, ranks = ddp_run
    (weights0, _), (weights1, _) = ranks
    assert weights0.keys() == weights1.keys()
    assert any(k.endswith("running_mean") for k in weights0)  # BatchNorm statistics are compared too
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), name


def test_ranks_see_different_shards_and_loss_goes_down(ddp_run):
    _, ranks = ddp_run
    (_, log0), (_, log1) = ranks
    # 96 clouds / 2 processes / batch 8 = 6 steps per epoch, 3 epochs
    assert len(log0["losses"]) == len(log1["losses"]) == 18
    assert log0["losses"][0] != log1["losses"][0]  # each rank trains on its own shard
    assert log0["acc"] == log1["acc"]  # one evaluation, all-reduced over the shards
    # the loss of the whole batch (both shards) goes down from the first epoch to the last
    steps = [(a + b) / 2 for a, b in zip(log0["losses"], log1["losses"])]
    assert sum(steps[-6:]) / 6 < sum(steps[:6]) / 6 - 0.05


def test_rank0_writes_checkpoints_and_metrics(ddp_run):
    out, ranks = ddp_run
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest["world_size"] == WORLD and checkpoint.manifest["step"] == 18
    assert {"rank0.rng.torch", "rank1.rng.torch"} <= checkpoint.state.keys()  # every rank's RNG, for resume
    for name, tensor in ranks[0][0].items():
        assert torch.equal(checkpoint.model[name], tensor), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["epoch"] * 3 + ["final"]  # written once, by rank 0
    assert records[-1]["test_acc"] == ranks[0][1]["acc"]
    assert records[2]["train_loss"] < records[0]["train_loss"] - 0.05  # all-reduced over both ranks

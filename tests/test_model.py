"""``Any2PointModel`` on tiny real ``transformers`` backbones: training, freezing, checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from any2point_fast import ops  # noqa: E402
from any2point_fast.checkpoint import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BackboneMismatchError,
    CheckpointError,
    adapter_state_dict,
)
from any2point_fast.config import Any2PointConfig, ConfigError  # noqa: E402
from any2point_fast.model import Any2PointBlock, Any2PointModel  # noqa: E402

from .test_backbones import ARCHITECTURES, SMALL_CONFIG, load_hf, save_tiny_backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_backbones")
    return {t: save_tiny_backbone(t, root / t) for t in ARCHITECTURES}


def clouds(seed: int = 0, batch: int = 2, points: int = 256) -> torch.Tensor:
    return torch.randn(batch, points, 3, generator=torch.Generator().manual_seed(seed))


def build(directory, seed: int = 0, **kwargs) -> Any2PointModel:
    torch.manual_seed(seed)
    return Any2PointModel.from_pretrained(directory, **{"num_classes": 3, **SMALL_CONFIG, **kwargs})


def train_step(model: Any2PointModel, seed: int = 0) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    labels = torch.tensor([0, 2])
    loss = torch.nn.functional.cross_entropy(model(clouds(seed)), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_train_step_changes_only_the_trainable_parts(tiny_dirs, model_type):
    model = build(tiny_dirs[model_type])
    assert model.backbone.embeddings is None
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".base_layer." in n or n.startswith(("backbone.", "input_norm.")) for n in frozen)
    assert all(".base_layer." not in n for n in trainable)

    logits = model(clouds())
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)  # all parameters offered
    optimizer.step()

    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} changed"
    changed = {n for n, before in trainable.items() if not torch.equal(params[n], before)}
    for block in range(2):
        prefix = next(n for n in trainable if f".{block}.adapter.down.weight" in n).rsplit("down.weight", 1)[0]
        assert {prefix + "down.weight", prefix + "up.weight"} <= changed
    assert {"view_attention.qkv_weight", "cls_token", "head.mlp.0.weight"} <= changed
    assert any(n.startswith("tokenizer.") for n in changed)


def test_every_layer_is_wrapped_with_its_adapter(tiny_dirs):
    model = build(tiny_dirs["vit"])
    hf = load_hf(tiny_dirs["vit"])
    assert len(model.blocks) == 2 and all(isinstance(b, Any2PointBlock) for b in model.blocks)
    for block, layer in zip(model.blocks, hf.layers):
        assert type(block.base_layer) is type(layer)
        torch.testing.assert_close(block.base_layer.mlp.fc1.weight, layer.mlp.fc1.weight, rtol=0, atol=0)
    assert all(a.view_attention is model.view_attention for a in model.adapters)
    assert model.backbone.pooler is None


@pytest.mark.parametrize("model_type", ["bert", "clip", "dinov2", "deit"])
def test_neutral_adapter_leaves_the_block_unchanged(tiny_dirs, model_type):
    """With Up = 0 and c = 0 the wrapped block is the frozen layer itself: the adapter sits exactly
    where the residual sum of the FFN is (inside the output LN for post-LN BERT)."""
    model = build(tiny_dirs[model_type]).eval()
    hf = load_hf(tiny_dirs[model_type])
    root = hf.text_model if model_type == "clip" else hf
    layers = model.spec.layer_list(root)
    tokens, centers = model.tokenizer(clouds())
    _, geometry = model.geometry(centers)
    x = torch.randn(2, model.num_prefix_tokens + 32, 32)
    with torch.no_grad():
        for block, layer in zip(model.blocks, layers):
            block.adapter.up.weight.zero_()
            block.adapter.up.bias.zero_()
            block.adapter.coef = 0.0
            expected = layer(x, None)
            expected = expected[0] if isinstance(expected, tuple) else expected
            torch.testing.assert_close(block(x, geometry, model.num_prefix_tokens), expected)
            block.adapter.coef = 0.3
            assert not torch.allclose(block(x, geometry, model.num_prefix_tokens), expected)


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_frozen_layers_are_deterministic_in_training_unless_opted_in(tmp_path, backbone_dropout):
    """Frozen means frozen: a frozen BERT layer with dropout 0.5 (hidden and attention) gives the
    same output under ``model.train()`` as under ``model.eval()``; ``backbone_dropout=True`` keeps
    the backbone's own dropout in training. The head's dropout follows ``train()`` either way."""
    directory = save_tiny_backbone("bert", tmp_path / "bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    model = build(directory, head_dropout=0.5, backbone_dropout=backbone_dropout)
    assert model.config.backbone_dropout is backbone_dropout
    tokens, centers = model.tokenizer(clouds())
    _, geometry = model.geometry(centers)
    x = torch.randn(2, model.num_prefix_tokens + 32, 32)
    block = model.blocks[0]
    with torch.no_grad():
        model.eval()
        assert not block.base_layer.training and not model.head.training
        reference = block.spec.run_layer(block.base_layer, x)
        model.train()
        assert model.training and block.adapter.training and model.head.training
        assert block.base_layer.training is backbone_dropout
        assert all(m.training is backbone_dropout for m in block.base_layer.modules())
        trained = [block.spec.run_layer(block.base_layer, x) for _ in range(2)]
    if backbone_dropout:
        assert not torch.allclose(trained[0], reference) and not torch.allclose(trained[0], trained[1])
    else:
        torch.testing.assert_close(trained[0], reference, rtol=0, atol=0)
        torch.testing.assert_close(trained[1], reference, rtol=0, atol=0)
    # the head's dropout is still on in training
    feats = torch.randn(4, model.num_prefix_tokens + 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.head(feats), model.head(feats))


def test_geometry_is_computed_once_per_forward(tiny_dirs):
    model = build(tiny_dirs["dinov2"])
    with mock.patch.object(ops, "bucket_sort", wraps=ops.bucket_sort) as sort, \
         mock.patch.object(ops, "project_pe", wraps=ops.project_pe) as project:
        model(clouds())
    assert project.call_count == 1 and sort.call_count == 2  # views + voxels, for 2 blocks


def test_bert_input_gets_its_embedding_norm_and_token_type(tiny_dirs):
    model = build(tiny_dirs["bert"])
    hf = load_hf(tiny_dirs["bert"])
    torch.testing.assert_close(model.input_bias, hf.embeddings.token_type_embeddings.weight[0], rtol=0, atol=0)
    torch.testing.assert_close(model.input_norm.weight, hf.embeddings.LayerNorm.weight, rtol=0, atol=0)
    assert not model.input_norm.weight.requires_grad
    assert isinstance(build(tiny_dirs["vit"]).input_norm, torch.nn.Identity)


@pytest.mark.parametrize("model_type", ["bert", "clip_text_model", "vit", "dinov2", "audio-spectrogram-transformer"])
def test_point_tokens_get_the_scale_of_the_backbones_own_input_tokens(tiny_dirs, model_type):
    """The tokenizer output is LayerNormed to the typical norm of the tokens the backbone embeds
    itself: word-embedding rows (language) or patch-conv outputs for unit-variance pixels (2D)."""
    hf = load_hf(tiny_dirs[model_type])
    if model_type in ("bert", "clip_text_model"):
        table = (hf.embeddings.word_embeddings if model_type == "bert" else hf.embeddings.token_embedding).weight
        expected = table.norm(dim=1).mean()
    else:
        conv = hf.embeddings.patch_embeddings.projection
        pixels = torch.randn(256, conv.in_channels, *conv.kernel_size, generator=torch.Generator().manual_seed(0))
        expected = conv(pixels).flatten(1).norm(dim=1).pow(2).mean().sqrt()  # Monte Carlo of sqrt(E‖y‖²)
    model = build(tiny_dirs[model_type])
    torch.testing.assert_close(torch.tensor(model.input_scale), expected.detach(), rtol=0.05, atol=0)
    with torch.no_grad():
        tokens, _ = model.tokenizer(clouds())
        norms = model.token_norm(tokens).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, model.input_scale), rtol=1e-3, atol=0)
    assert model.token_norm.weight.requires_grad and model.trainable_parameter_groups()["tokenizer"] > 0
    off = build(tiny_dirs[model_type], token_norm=False)
    assert isinstance(off.token_norm, torch.nn.Identity) and off.input_scale is None


def test_wraps_an_already_loaded_task_model(tiny_dirs):
    task = transformers.ViTForImageClassification.from_pretrained(tiny_dirs["vit"], num_labels=4)
    model = Any2PointModel(task, num_classes=5, **SMALL_CONFIG)
    assert model.backbone is task.vit and model.config.num_classes == 5
    assert model(clouds()).shape == (2, 5)
    with pytest.raises(ValueError, match="already wrapped"):
        Any2PointModel(task, num_classes=5, **SMALL_CONFIG)


# ------------------------------------------------------------------------------------------ config
def test_config_comes_from_preset_user_and_backbone(tiny_dirs):
    model = build(tiny_dirs["dinov2"])
    assert model.config.modality == "vision" and model.config.canvas_size == (518, 518)
    assert model.config.hidden_size == 32 and model.config.pe_grid == (4, 4)

    audio = build(tiny_dirs["vit"], config="audio", ensemble_coef=0.9)
    assert audio.config.canvas_size == (192, 304) and audio.config.ensemble_coef == 0.9
    assert audio.config.pe_grid == (4, 4)

    mine = Any2PointConfig.preset("language", pooling="max+mean", num_points=256, num_tokens=32, knn_k=8,
                                  tokenizer_dim=16)
    model = Any2PointModel.from_pretrained(tiny_dirs["bert"], num_classes=7, config=mine)
    assert model.config.pooling == "max+mean" and model.config.num_classes == 7
    assert model.config.hidden_size == 32 and model.config.pe_length == 64  # the backbone's, not the preset's

    with pytest.raises(ConfigError, match="does not match the backbone's width 32"):
        build(tiny_dirs["bert"], hidden_size=48)
    with pytest.raises(ConfigError, match="1d PE"):
        build(tiny_dirs["bert"], pe_kind="2d")


def test_print_trainable_parameters(tiny_dirs, capsys):
    model = build(tiny_dirs["deit"])
    model.print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", lines[0])
    assert match
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    groups = model.trainable_parameter_groups()
    assert sum(groups.values()) == trainable
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["tokenizer", "adapters", "prefix tokens", "head"]
    # the shared view attention is counted once
    view = sum(p.numel() for p in model.view_attention.parameters())
    per_adapter = sum(p.numel() for n, p in model.adapters[0].named_parameters() if "view_attention" not in n)
    assert groups["adapters"] == view + 2 * per_adapter


def test_published_recipe_size_at_vit_b_width():
    """ViT-B (768 wide, 12 layers), vision recipe: tokenizer + adapters ≈ 0.87 M trainable parameters."""
    with torch.device("meta"):  # structure only: no 86 M-parameter allocation
        backbone = transformers.AutoModel.from_config(transformers.ViTConfig())
    model = Any2PointModel(backbone, "vision", num_classes=15)
    groups = model.trainable_parameter_groups()
    c, layers, views, rank, d = 768, 12, 6, 16, 12
    per_adapter = (c * rank + rank) + (rank * c + c) + 2 * c * (views + 1)  # down, up, 6 view BNs + voxel BN
    view_attention = views * (2 * c + 3 * d * c + 3 * d + c * d + c)
    assert groups["adapters"] == layers * per_adapter + view_attention == 668_568
    assert groups["tokenizer"] == 197_040 + 2 * c  # + the token LayerNorm to the backbone's input scale
    assert 800_000 <= groups["tokenizer"] + groups["adapters"] <= 900_000


# ------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("model_type", ["bert", "clip", "vit", "deit", "dinov2", "audio-spectrogram-transformer"])
def test_save_load_round_trip_is_bit_identical(tiny_dirs, model_type, tmp_path):
    model = build(tiny_dirs[model_type])
    train_step(model)  # weights and BatchNorm statistics away from their initial values
    model.eval()
    with torch.no_grad():
        expected = model(clouds(1))
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]

    torch.manual_seed(123)  # fresh trainable init differs; everything must come from the file
    restored = Any2PointModel.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(restored(clouds(1)), expected)
    assert restored.config == model.config


def test_checkpoint_holds_only_adapter_state(tiny_dirs, tmp_path):
    model = build(tiny_dirs["bert"], revision=None)
    train_step(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(tensors)
    extra = set(tensors) - trainable
    assert extra and all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for n in extra)
    assert not any(".base_layer." in n or "pe_table" in n or "input_norm" in n for n in tensors)
    assert sum(n.startswith("view_attention.") for n in tensors) == 6  # stored once, not once per adapter
    assert not any(".adapter.view_attention." in n for n in tensors)
    assert int(tensors["head.mlp.1.num_batches_tracked"]) == 1

    saved = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert saved["format"] == "any2point-adapter" and saved["model_type"] == "bert"
    assert saved["base_model_name_or_path"] == str(tiny_dirs["bert"])
    assert {"revision", "commit_hash"} <= set(saved)
    assert saved["backbone_fingerprint"]["hidden_size"] == 32
    assert saved["backbone_fingerprint"]["pe_shape"] == [64, 32]
    assert Any2PointConfig.from_dict(saved["config"]) == model.config


def test_restore_onto_an_explicit_backbone(tiny_dirs, tmp_path):
    model = build(tiny_dirs["vit"]).eval()
    model.save_pretrained(tmp_path / "adapter")
    copy = save_tiny_backbone("vit", tmp_path / "copy")  # same seed: same weights, another place
    restored = Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=copy).eval()
    with torch.no_grad():
        assert torch.equal(restored(clouds()), model(clouds()))
    again = Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=load_hf(copy)).eval()
    with torch.no_grad():
        assert torch.equal(again(clouds()), model(clouds()))


def test_mismatched_backbone_is_refused(tiny_dirs, tmp_path):
    build(tiny_dirs["bert"]).save_pretrained(tmp_path / "adapter")
    other = save_tiny_backbone("bert", tmp_path / "other", seed=1)
    with pytest.raises(BackboneMismatchError, match="PE values differ"):
        Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=other)
    wider = save_tiny_backbone("bert", tmp_path / "wider", hidden_size=48)
    with pytest.raises(BackboneMismatchError, match="hidden size 32 in the checkpoint, 48 in the backbone"):
        Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=wider)
    with pytest.raises(BackboneMismatchError, match="has a 2d PE"):
        Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=tiny_dirs["vit"])
    shorter = save_tiny_backbone("bert", tmp_path / "shorter", max_position_embeddings=32)
    with pytest.raises(BackboneMismatchError, match="out of range"):
        Any2PointModel.from_pretrained(tmp_path / "adapter", backbone=shorter)


def test_checkpoint_errors(tiny_dirs, tmp_path):
    model = build(tiny_dirs["vit"])
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatch head"):
        Any2PointModel.from_pretrained(tmp_path, num_classes=4)
    with pytest.raises(ConfigError, match="saved config is used"):
        Any2PointModel.from_pretrained(tmp_path, config="vision")
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        Any2PointModel.from_pretrained(tiny_dirs["vit"], backbone=tiny_dirs["vit"])
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an Any2Point adapter config"):
        Any2PointModel.from_pretrained(tmp_path)


def test_truncated_or_tampered_weights_are_refused(tiny_dirs, tmp_path):
    build(tiny_dirs["vit"]).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    data = path.read_bytes()
    for cut in (len(data) - 100, 200, 5):  # inside the tensors, inside the header, inside the header length
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is not a readable safetensors file"):
            Any2PointModel.from_pretrained(tmp_path)
    tampered = bytearray(data)
    tampered[-3] ^= 0x01  # one flipped bit in the last tensor: same size, still parses as safetensors
    path.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: checksum mismatch"):
        Any2PointModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"format": "any2point-adapter", "config": {', "cannot read {path}: Expecting"),  # truncated
    (b'{"format": "any2point-\xff"}', "cannot read {path}: 'utf-8' codec can't decode"),
    (b"[1, 2]", "{path} is not an Any2Point adapter config \\(format 'none, a JSON list'\\)"),
    (b'{"format": "any2point-adapter", "format_version": "1"}', "{path} has format version '1'"),
])
def test_malformed_adapter_config_is_refused(tiny_dirs, tmp_path, content, message):
    build(tiny_dirs["vit"]).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_CONFIG_NAME
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message.format(path=re.escape(str(path)))):
        Any2PointModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("config", {"hidden_size": 32, "colour": "red"}, "invalid 'config' .*unknown config keys \\['colour'\\]"),
    ("config", {"hidden_size": "wide"}, "invalid 'config' .*hidden_size must be a positive int"),
    ("config", [], "\\['config'\\] must be JSON objects"),
    ("backbone_fingerprint", "vit", "\\['backbone_fingerprint'\\] must be JSON objects"),
])
def test_adapter_config_with_malformed_fields_is_refused(tiny_dirs, tmp_path, key, value, message):
    build(tiny_dirs["vit"]).save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_CONFIG_NAME
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, key: value}))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*{message}"):
        Any2PointModel.from_pretrained(tmp_path)


def test_saved_files_get_the_permissions_of_new_files(tiny_dirs, tmp_path):
    (tmp_path / "plain").write_bytes(b"")  # created as any new file: 0o666 less the umask
    build(tiny_dirs["vit"]).save_pretrained(tmp_path / "adapter")
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        assert (tmp_path / "adapter" / name).stat().st_mode == (tmp_path / "plain").stat().st_mode, name


# A process that saves state k = 0, 1, 2, ... (every trainable value k) into one directory, forever; after the first
# save it prints the size of each file as JSON.
SAVE_FOREVER = """
import json
import os
import sys
import torch
from any2point_fast.model import Any2PointModel
from tests.test_backbones import SMALL_CONFIG
torch.set_num_threads(1)
backbone, target = sys.argv[1:]
model = Any2PointModel.from_pretrained(backbone, num_classes=3, **SMALL_CONFIG)
trainable = [p for p in model.parameters() if p.requires_grad]
state = 0
while True:
    with torch.no_grad():
        for param in trainable:
            param.fill_(state)
    model.save_pretrained(target)
    if state == 0:
        sizes = {name: os.path.getsize(os.path.join(target, name)) for name in os.listdir(target)}
        print(json.dumps(sizes), flush=True)
    state += 1
"""


def checkpoint_files(directory: Path, sizes: dict[str, int]) -> str:
    """"torn" if a checkpoint file is missing or not of its complete size, "writing" if another (temporary) file is
    beside them, else "complete"."""
    names = set(os.listdir(directory))
    for name, size in sizes.items():
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(directory / name) == size:
                continue
        return "torn"
    return "complete" if names == set(sizes) else "writing"


def test_save_killed_while_writing_leaves_a_saved_state(tiny_dirs, tmp_path):
    """SIGKILL a process that overwrites a checkpoint in a loop, as soon as a file of it is seen incomplete (never,
    when writes are atomic) or else, after 2 s, while it has a temporary file: the directory still restores one
    of the saved states, bit for bit."""
    target = tmp_path / "adapter"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tiny_dirs["bert"]), str(target)], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = child.stdout.readline()  # the first save is complete
        assert line, child.stderr.read().decode()[-2000:]
        sizes, start = json.loads(line), time.monotonic()
        assert set(sizes) == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}
        while (seen := checkpoint_files(target, sizes)) != "torn":
            if seen == "writing" and time.monotonic() > start + 2:
                break
            assert time.monotonic() < start + 60, "no save seen in progress"
    finally:
        child.kill()  # SIGKILL
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    restored = Any2PointModel.from_pretrained(target)
    saved = adapter_state_dict(restored)
    reference = build(tiny_dirs["bert"])  # same shapes and config; BatchNorm buffers untouched, as in the child
    trainable = {name for name, param in reference.named_parameters() if param.requires_grad}
    state = saved["head.mlp.0.weight"].flatten()[0].item()
    assert state == int(state) >= 0
    assert restored.config == reference.config
    for name, tensor in adapter_state_dict(reference).items():
        expected = torch.full_like(tensor, state) if name in trainable else tensor
        assert torch.equal(saved[name], expected), name

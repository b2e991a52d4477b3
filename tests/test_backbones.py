"""Backbone specs against real ``transformers`` models: block split, PE tables and grid orientation.

Every supported architecture is instantiated from a tiny random config (hidden 32, 2 layers,
32-px images), saved with ``save_pretrained`` and loaded back by ``transformers``; the specs are
checked against the models' own forward code, never against a copy of it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

import any2point_fast.backbones as backbones  # noqa: E402
from any2point_fast.backbones import (  # noqa: E402
    BackboneSpec,
    PESpec,
    UnsupportedBackboneError,
    get_backbone_spec,
    register_backbone,
    supported_model_types,
)
from any2point_fast.config import ConfigError  # noqa: E402
from any2point_fast.model import Any2PointModel  # noqa: E402

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ARCHITECTURES = ("clip", "clip_text_model", "bert", "roberta", "xlm-roberta", "vit", "deit", "dinov2",
                 "audio-spectrogram-transformer")
ONE_D = ("clip", "clip_text_model", "bert", "roberta", "xlm-roberta")
TWO_D = ("vit", "deit", "dinov2", "audio-spectrogram-transformer")
#: Small Any2Point settings for tiny backbones: 256 points, 32 tokens.
SMALL_CONFIG = dict(num_points=256, num_tokens=32, knn_k=8, tokenizer_dim=16)


def tiny_hf_config(model_type: str, **changes):
    """A tiny random config of ``model_type`` (hidden 32, 2 layers; images 32 px / patch 8 → 4×4)."""
    c = transformers
    text = dict(vocab_size=99, **_SMALL)
    configs = {
        "clip": lambda: c.CLIPConfig(text_config=dict(max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                      pad_token_id=1, **text),
                                     vision_config=dict(image_size=32, patch_size=8, **_SMALL), projection_dim=16),
        "clip_text_model": lambda: c.CLIPTextConfig(max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                    pad_token_id=1, **text),
        "bert": lambda: c.BertConfig(max_position_embeddings=64, **text),
        "roberta": lambda: c.RobertaConfig(max_position_embeddings=66, **text),
        "xlm-roberta": lambda: c.XLMRobertaConfig(max_position_embeddings=40, **text),
        "vit": lambda: c.ViTConfig(image_size=32, patch_size=8, **_SMALL),
        "deit": lambda: c.DeiTConfig(image_size=32, patch_size=8, **_SMALL),
        "dinov2": lambda: c.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, mlp_ratio=2, layerscale_value=0.5),
        "audio-spectrogram-transformer": lambda: c.ASTConfig(num_mel_bins=48, max_length=80, patch_size=16,
                                                             frequency_stride=10, time_stride=10, **_SMALL),
    }
    config = configs[model_type]()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def save_tiny_backbone(model_type: str, directory: Path, seed: int = 0, **changes) -> Path:
    """A tiny random HF model saved with ``save_pretrained``; every parameter (PE included) is random
    and distinct, so equalities below cannot hold by accident."""
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(tiny_hf_config(model_type, **changes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position" in name or "cls_token" in name or "distillation" in name or "lambda" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def load_hf(directory: Path, attn_implementation: str = "eager"):
    return transformers.AutoModel.from_pretrained(directory, attn_implementation=attn_implementation).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_backbones")
    return {t: save_tiny_backbone(t, root / t) for t in ARCHITECTURES}


# ---------------------------------------------------------------------------------------- registry
def test_registry_covers_the_supported_architectures():
    assert set(ARCHITECTURES) <= set(supported_model_types())
    assert get_backbone_spec("bert").norm_placement == "post"
    assert get_backbone_spec("dinov2").attention_post == ("layer_scale1", "drop_path")
    assert get_backbone_spec("deit").num_prefix_tokens == 2


def test_unknown_architecture_error_lists_the_supported_ones(tmp_path):
    with pytest.raises(UnsupportedBackboneError) as info:
        get_backbone_spec("gpt2")
    for model_type in supported_model_types():
        assert model_type in str(info.value)
    assert "'gpt2'" in str(info.value)

    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16)
    transformers.AutoModel.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedBackboneError, match="Supported model types: .*bert.*dinov2"):
        Any2PointModel.from_pretrained(tmp_path / "gpt2", num_classes=3)


def test_spec_validation_and_duplicate_registration():
    pe = PESpec("embeddings.position_embeddings", "1d")
    with pytest.raises(ValueError, match="pre-LN blocks need"):
        BackboneSpec("x", ("x",), "language", "pre", "layers", "attn", ("mlp",), pe)
    with pytest.raises(ValueError, match="post-LN blocks need output_norm"):
        BackboneSpec("x", ("x",), "language", "post", "layers", "attn", ("mlp",), pe)
    with pytest.raises(ValueError, match="2D PESpec needs `grid`"):
        PESpec("p", "2d")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(dataclasses.replace(get_backbone_spec("bert"), name="BERT again"))


def test_registering_a_new_architecture(tmp_path, monkeypatch):
    """The docstring's recipe: a spec for a model_type without one makes it loadable."""
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))  # restored after the test
    directory = tmp_path / "camembert"
    torch.manual_seed(0)
    transformers.AutoModel.from_config(transformers.CamembertConfig(vocab_size=99, max_position_embeddings=40,
                                                                    **_SMALL)).save_pretrained(directory)
    with pytest.raises(UnsupportedBackboneError):
        Any2PointModel.from_pretrained(directory, num_classes=2, **SMALL_CONFIG)
    register_backbone(dataclasses.replace(get_backbone_spec("roberta"), name="CamemBERT", model_types=("camembert",)))
    model = Any2PointModel.from_pretrained(directory, num_classes=2, **SMALL_CONFIG)
    assert model(torch.randn(2, 256, 3)).shape == (2, 2)


# ------------------------------------------------------------------------------------- block split
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_block_split_reproduces_the_layer_forward(tiny_dirs, model_type):
    """attention part → FFN part → output part == the HF layer's own forward (pre- and post-LN)."""
    hf = load_hf(tiny_dirs[model_type])
    spec = get_backbone_spec(model_type)
    x = torch.randn(2, 7, 32)
    for layer in spec.layer_list(spec.encoder_root(hf)):
        expected = layer(x, None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(spec.run_layer(layer, x), expected, rtol=0, atol=0)


def test_dinov2_layer_scale_belongs_to_the_ffn_part(tiny_dirs):
    hf = load_hf(tiny_dirs["dinov2"])
    spec = get_backbone_spec("dinov2")
    layer = spec.layer_list(spec.encoder_root(hf))[0]
    h = torch.randn(2, 5, 32)
    unscaled = layer.mlp(layer.norm2(h))
    torch.testing.assert_close(spec.ffn_part(layer, h), unscaled * layer.layer_scale2.lambda1)


def test_post_ln_parts_are_the_bert_submodules(tiny_dirs):
    """post-LN: h = LN(x + attn) (the attention module), f = output.dense(intermediate(h)) before the LN."""
    hf = load_hf(tiny_dirs["bert"])
    spec = get_backbone_spec("bert")
    layer = hf.encoder.layer[1]
    x = torch.randn(2, 5, 32)
    h = spec.attention_part(layer, x)
    torch.testing.assert_close(h, layer.attention(x)[0])
    f = spec.ffn_part(layer, h)
    torch.testing.assert_close(f, layer.output.dense(layer.intermediate(h)))
    torch.testing.assert_close(spec.output_part(layer, h + f), layer.output.LayerNorm(h + f))


# --------------------------------------------------------------------------------------- 1D tables
@pytest.mark.parametrize("model_type", ONE_D)
def test_1d_pe_table_is_the_models_own(tiny_dirs, model_type):
    hf = load_hf(tiny_dirs[model_type])
    root = hf.text_model if model_type == "clip" else hf
    own = (root.embeddings.position_embedding if "clip" in model_type else root.embeddings.position_embeddings).weight
    model = Any2PointModel.from_pretrained(tiny_dirs[model_type], num_classes=3, **SMALL_CONFIG)
    offset = hf.config.pad_token_id + 1 if "roberta" in model_type else 0
    assert model.pe_table.shape == (own.shape[0] - offset, 32)
    assert model.config.pe_kind == "1d" and model.config.pe_length == own.shape[0] - offset
    torch.testing.assert_close(model.pe_table, own[offset:], rtol=0, atol=0)


def test_roberta_strips_the_padding_offset(tiny_dirs):
    """RoBERTa numbers positions from padding_idx + 1: the first real token uses row pad + 1."""
    hf = load_hf(tiny_dirs["roberta"])
    ids = torch.tensor([[5, 6, 7]])
    positions = hf.embeddings.create_position_ids_from_input_ids(ids, hf.embeddings.padding_idx)
    model = Any2PointModel.from_pretrained(tiny_dirs["roberta"], num_classes=3, **SMALL_CONFIG)
    torch.testing.assert_close(model.pe_table[:3], hf.embeddings.position_embeddings.weight[positions[0]])
    assert model.config.pe_length == 64


def test_pe_length_override_keeps_the_first_positions(tiny_dirs):
    hf = load_hf(tiny_dirs["bert"])
    model = Any2PointModel.from_pretrained(tiny_dirs["bert"], num_classes=3, pe_length=20, **SMALL_CONFIG)
    torch.testing.assert_close(model.pe_table, hf.embeddings.position_embeddings.weight[:20], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="out of range"):
        Any2PointModel.from_pretrained(tiny_dirs["bert"], num_classes=3, pe_length=65, **SMALL_CONFIG)


# --------------------------------------------------------------------------------------- 2D grids
def _marker_input(hf_config, row: int, col: int, size: int | None = None) -> torch.Tensor:
    """An input (images: ``size`` px, default the configured size) that is zero except for one
    pixel inside patch (row, col) only."""
    if hf_config.model_type == "audio-spectrogram-transformer":
        stride_f, stride_t, patch = hf_config.frequency_stride, hf_config.time_stride, hf_config.patch_size
        # patches overlap (stride < patch): patch k alone covers k·stride + [patch − stride, stride) for k > 0
        f = row * stride_f + (max(0, patch - stride_f) if row else 0)
        t = col * stride_t + (max(0, patch - stride_t) if col else 0)
        values = torch.zeros(1, hf_config.max_length, hf_config.num_mel_bins)  # [B, time, frequency]
        values[0, t, f] = 1.0
        return values
    size = size or hf_config.image_size
    pixels = torch.zeros(1, hf_config.num_channels, size, size)
    pixels[0, :, row * hf_config.patch_size + 1, col * hf_config.patch_size + 2] = 1.0
    return pixels


def _patch_pe(hf, row: int, col: int, size: int | None = None) -> torch.Tensor:
    """The PE the model's own embedding layer adds to the token of patch (row, col).

    With the patch projection set to sum its input pixels, a one-pixel marker lights up exactly the
    token of its patch; with a zero input every patch token equals its PE (the cls/distillation
    tokens are not patches and never light up).
    """
    embeddings = hf.embeddings
    with torch.no_grad():
        projection = embeddings.patch_embeddings.projection
        projection.weight.fill_(1.0)
        projection.bias.zero_()
        marker = _marker_input(hf.config, row, col, size)
        zero = embeddings(torch.zeros_like(marker))[0]
        lit = (embeddings(marker)[0] - zero).abs().sum(-1)
    assert int((lit > 0).sum()) == 1, "the marker must light exactly one token"
    return zero[int(lit.argmax())]


@pytest.mark.parametrize("model_type", TWO_D)
def test_2d_grid_shape_and_orientation(tiny_dirs, model_type):
    """grid[0, 0] is the PE of the top-left patch, grid[0, -1] of the top-right, grid[-1, 0] of the bottom-left."""
    model = Any2PointModel.from_pretrained(tiny_dirs[model_type], num_classes=3, **SMALL_CONFIG)
    hf = load_hf(tiny_dirs[model_type])
    rows, cols = (4, 7) if model_type == "audio-spectrogram-transformer" else (4, 4)
    assert model.pe_table.shape == (rows, cols, 32)
    assert model.config.pe_kind == "2d" and model.config.pe_grid == (rows, cols)
    for row, col in ((0, 0), (0, cols - 1), (rows - 1, 0), (1, 2)):
        torch.testing.assert_close(model.pe_table[row, col], _patch_pe(hf, row, col), rtol=0, atol=0,
                                   msg=f"patch ({row}, {col})")
    prefix = 2 if model_type in ("deit", "audio-spectrogram-transformer") else 1
    own = hf.embeddings.position_embeddings[0, prefix:].reshape(rows, cols, 32)
    torch.testing.assert_close(model.pe_table, own, rtol=0, atol=0)


def test_dinov2_resampled_grid_is_what_the_model_adds_at_that_input_size(tiny_dirs):
    """pe_grid=(6, 6) on a 4×4 DINOv2 = the PE its own embedding adds to a 48-px image (bicubic)."""
    model = Any2PointModel.from_pretrained(tiny_dirs["dinov2"], num_classes=3, pe_grid=(6, 6), **SMALL_CONFIG)
    hf = load_hf(tiny_dirs["dinov2"])
    assert model.pe_table.shape == (6, 6, 32)
    for row, col in ((0, 0), (0, 5), (5, 0), (2, 3)):
        torch.testing.assert_close(model.pe_table[row, col], _patch_pe(hf, row, col, size=48), rtol=0, atol=0)
    assert not torch.allclose(model.pe_table[:4, :4], hf.embeddings.position_embeddings[0, 1:].reshape(4, 4, 32))


def test_ast_has_only_its_native_grid(tiny_dirs):
    with pytest.raises(ConfigError, match="no PE interpolation"):
        Any2PointModel.from_pretrained(tiny_dirs["audio-spectrogram-transformer"], num_classes=3, pe_grid=(8, 8),
                                       **SMALL_CONFIG)


@pytest.mark.parametrize("model_type", TWO_D)
def test_prefix_tokens(tiny_dirs, model_type):
    model = Any2PointModel.from_pretrained(tiny_dirs[model_type], num_classes=3, **SMALL_CONFIG)
    expected = 2 if model_type in ("deit", "audio-spectrogram-transformer") else 1
    assert model.num_prefix_tokens == expected
    assert model.cls_token.shape == model.cls_pos.shape == (1, expected, 32)

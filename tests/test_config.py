import pytest

from any2point_fast import Any2PointConfig, ConfigError


def test_presets_match_the_published_recipes():
    lang, vision, audio = (Any2PointConfig.preset(n) for n in ("language", "vision", "audio"))
    assert (lang.pe_kind, lang.pe_length, lang.segment_length, lang.voxel_size, lang.ensemble_coef) == (
        "1d", 77, 2.0, 0.08, 0.3)
    assert lang.pooling == "mean" and lang.buckets_per_view == 39
    assert (vision.pe_kind, vision.pe_grid, vision.canvas_size, vision.patch_size) == ("2d", (37, 37), (518, 518), 26)
    assert (vision.voxel_size, vision.ensemble_coef, vision.camera_distance) == (0.16, 0.7, 1.6)
    assert vision.buckets_per_view == 20 * 20
    assert (audio.pe_grid, audio.canvas_size, audio.patch_size) == ((12, 101), (192, 304), 16)
    assert (audio.voxel_size, audio.ensemble_coef, audio.camera_distance) == (0.16, 0.5, 1.4)
    assert audio.buckets_per_view == 12 * 19
    for cfg in (lang, vision, audio):
        assert (cfg.num_views, cfg.adapter_rank, cfg.adapter_scale, cfg.attn_dim, cfg.attn_heads) == (6, 16, 0.3, 12, 6)
        assert cfg.token_counts == (512, 256, 128) and cfg.tokenizer_out_dim == 768


def test_overrides_and_round_trip():
    cfg = Any2PointConfig.preset("vision", num_classes=40, knn_k=16)
    assert cfg.num_classes == 40 and cfg.knn_k == 16 and cfg.pe_kind == "2d"
    assert Any2PointConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(num_tokens=64).token_counts == (512, 256, 64)


@pytest.mark.parametrize("field, value, words", [
    ("num_views", 7, "num_views"),
    ("num_views", 0, "num_views"),
    ("pooling", "max", "pooling"),
    ("attn_dim", 13, "divisible"),
    ("num_tokens", 2048, "cannot exceed"),
    ("hidden_size", 0, "hidden_size"),
    ("knn_k", 2.5, "knn_k"),
    ("voxel_size", 0.0, "voxel_size"),
    ("camera_distance", 0.5, "camera_distance"),
    ("canvas_size", (1, 5), "canvas_size"),
    ("modality", "smell", "modality"),
])
def test_invalid_values_are_refused_with_the_field_named(field, value, words):
    with pytest.raises(ConfigError, match=words):
        Any2PointConfig(**{field: value})


def test_unknown_preset_and_keys():
    with pytest.raises(ConfigError, match="unknown preset"):
        Any2PointConfig.preset("lidar")
    with pytest.raises(ConfigError, match="unknown config keys"):
        Any2PointConfig.from_dict({"hiden_size": 3})

"""Audio backbones: AST, a DeiT-style encoder over mel-spectrogram patches.

The patch conv runs over the spectrogram transposed to ``[frequency, time]``, so the PE grid is
``rows = frequency`` (``(num_mel_bins − patch) // frequency_stride + 1``, 12 for 128 bins) ×
``cols = time`` (``(max_length − patch) // time_stride + 1``, 101 for 1024 frames), behind two
prefix rows (``[CLS]`` + distillation). AST has no PE interpolation: only the native grid.
"""

from __future__ import annotations

from .spec import BackboneSpec, PESpec


def _grid(config) -> tuple[int, int]:
    rows = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    cols = (config.max_length - config.patch_size) // config.time_stride + 1
    return rows, cols


AST = BackboneSpec(
    name="AST",
    model_types=("audio-spectrogram-transformer",),
    modality="audio",
    norm_placement="pre",
    layers="layers",
    attention_norm="layernorm_before",
    attention="attention",
    attention_post=("dropout",),
    ffn_norm="layernorm_after",
    ffn=("mlp",),
    ffn_post=("dropout",),
    final_norm="layernorm",
    pe=PESpec("embeddings.position_embeddings", "2d", offset=2, grid=_grid),
    input_embedding="embeddings.patch_embeddings.projection",
    num_prefix_tokens=2,
)

SPECS = (AST,)

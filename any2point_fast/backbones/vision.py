"""Vision backbones: a 2D patch-PE grid behind prefix-token rows, patch conv dropped.

- ViT (``[CLS]`` + 14×14 at 224/16), DeiT (``[CLS]`` + distillation + 14×14; the distillation
  token is a second learnable prefix token), DINOv2 (``[CLS]`` + 37×37 at 518/14, layer scale in
  both residual branches). All pre-LN.
- The grid is the one the model uses for its configured ``image_size``; another grid
  (``pe_grid=...``) is resampled by the model's own ``interpolate_pos_encoding`` for the
  matching input size, exactly as the model would for such an image.
"""

from __future__ import annotations

import dataclasses

from .spec import BackboneSpec, PESpec, _pair


def _patch(config) -> tuple[int, int]:
    return _pair(config.patch_size)


def _grid(config) -> tuple[int, int]:
    (height, width), (ph, pw) = _pair(config.image_size), _patch(config)
    return height // ph, width // pw


VIT = BackboneSpec(
    name="ViT",
    model_types=("vit",),
    modality="vision",
    norm_placement="pre",
    layers="layers",
    attention_norm="layernorm_before",
    attention="attention",
    attention_post=("dropout",),
    ffn_norm="layernorm_after",
    ffn=("mlp",),
    ffn_post=("dropout",),
    final_norm="layernorm",
    pe=PESpec("embeddings.position_embeddings", "2d", offset=1, grid=_grid, patch=_patch,
              interpolate="embeddings.interpolate_pos_encoding"),
    input_embedding="embeddings.patch_embeddings.projection",
    drop=("pooler",),
)

DEIT = dataclasses.replace(
    VIT,
    name="DeiT",
    model_types=("deit",),
    pe=dataclasses.replace(VIT.pe, offset=2),
    num_prefix_tokens=2,
)

DINOV2 = BackboneSpec(
    name="DINOv2",
    model_types=("dinov2",),
    modality="vision",
    norm_placement="pre",
    layers="encoder.layer",
    attention_norm="norm1",
    attention="attention",
    attention_post=("layer_scale1", "drop_path"),
    ffn_norm="norm2",
    ffn=("mlp",),
    ffn_post=("layer_scale2", "drop_path"),
    final_norm="layernorm",
    pe=PESpec("embeddings.position_embeddings", "2d", offset=1, grid=_grid, patch=_patch,
              interpolate="embeddings.interpolate_pos_encoding"),
    input_embedding="embeddings.patch_embeddings.projection",
)

SPECS = (VIT, DEIT, DINOV2)

"""One declarative spec per Hugging Face architecture, and the registry keyed by ``config.model_type``.

Supported out of the box:

=================================  ==========  ======  =========================================
``model_type``                     modality    blocks  frozen PE
=================================  ==========  ======  =========================================
``clip``, ``clip_text_model``      language    pre-LN  1D, ``L = 77`` (CLIP's text tower)
``bert`` (MiniLM too)              language    post-LN 1D, ``L = max_position_embeddings``
``roberta``, ``xlm-roberta``       language    post-LN 1D, rows after ``padding_idx + 1``
``vit``                            vision      pre-LN  2D, 14×14 at 224/16, behind ``[CLS]``
``deit``                           vision      pre-LN  2D, 14×14, behind ``[CLS]`` + distillation
``dinov2``                         vision      pre-LN  2D, 37×37 at 518/14, layer scale
``audio-spectrogram-transformer``  audio       pre-LN  2D, frequency × time 12×101
=================================  ==========  ======  =========================================

How the adapter attaches to pre-LN and post-LN blocks is documented in :mod:`.spec`.

Adding an architecture
----------------------
Read the model's ``modeling_<name>.py`` in ``transformers``, then describe it — paths into the
loaded model, no copied code — and register it before calling ``Any2PointModel.from_pretrained``::

    from any2point_fast.backbones import BackboneSpec, PESpec, register_backbone

    register_backbone(BackboneSpec(
        name="MyViT",
        model_types=("my_vit",),                 # config.model_type of the checkpoint
        modality="vision",                       # default preset: canvas, buckets, c, d
        norm_placement="pre",
        layers="encoder.blocks",                 # the nn.ModuleList of layers (from the encoder root)
        attention_norm="norm1", attention="attn", attention_post=("ls1",),
        ffn_norm="norm2", ffn=("mlp",), ffn_post=("ls2",),
        final_norm="norm",
        pe=PESpec("embeddings.pos_embed", "2d", offset=1,              # one [CLS] row first
                  grid=lambda c: (c.image_size // c.patch_size,) * 2,  # row-major patches
                  patch=lambda c: (c.patch_size, c.patch_size)),
    ))

Then check it with the same tests the built-in specs pass (``tests/test_backbones.py``): a tiny
random config saved with ``save_pretrained``, ``spec.run_layer`` equal to the layer's own
forward, the PE grid's corners equal to the PE of the patches the model's own embedding puts
there, and a train step that changes only adapter weights.
"""

from __future__ import annotations

from typing import Any

from . import audio, language, vision
from .spec import BackboneSpec, PESpec, get_path, set_path


class UnsupportedBackboneError(ValueError):
    """No :class:`BackboneSpec` is registered for a model's ``config.model_type``."""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Make ``spec`` serve each of its ``model_types``; refuses to replace a spec unless ``overwrite``."""
    taken = [t for t in spec.model_types if t in _REGISTRY and _REGISTRY[t] is not spec]
    if taken and not overwrite:
        raise ValueError(f"model_type(s) {taken} already registered "
                         f"({', '.join(_REGISTRY[t].name for t in taken)}); pass overwrite=True to replace")
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> tuple[str, ...]:
    """Every registered ``model_type``, sorted."""
    return tuple(sorted(_REGISTRY))


def get_backbone_spec(model_type_or_config: str | Any) -> BackboneSpec:
    """The spec of a ``model_type`` (or of an HF config/model carrying one).

    Raises:
        UnsupportedBackboneError: naming the architecture and every supported ``model_type``.
    """
    value = model_type_or_config
    if not isinstance(value, str):
        value = getattr(getattr(value, "config", value), "model_type", None)
    try:
        return _REGISTRY[value]
    except KeyError:
        raise UnsupportedBackboneError(
            f"Any2Point has no backbone spec for model_type {value!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. Add one with any2point_fast.backbones.register_backbone "
            "(see the any2point_fast.backbones docstring)."
        ) from None


for _spec in (*language.SPECS, *vision.SPECS, *audio.SPECS):
    register_backbone(_spec)

__all__ = [
    "BackboneSpec",
    "PESpec",
    "UnsupportedBackboneError",
    "get_backbone_spec",
    "get_path",
    "register_backbone",
    "set_path",
    "supported_model_types",
]

"""``BackboneSpec``: where a Hugging Face architecture keeps what Any2Point needs, and how to run it.

A spec is data — dotted attribute paths into the loaded ``transformers`` model plus a few small
functions of its config — interpreted by the generic code of this module. No model code is
copied: a block is run by calling the layer's own submodules (its attention module, its norms,
its MLP), the frozen PE is read from the model's own parameter (resampled by the model's own
``interpolate_pos_encoding`` where that exists).

How the adapter attaches (DESIGN.md §1.4: "in every block after the FFN")
-----------------------------------------------------------------------
Every block is split into an *attention part* ``h = A(x)``, an *FFN part* ``f = F(h)`` and an
*output part* ``O``; the block output is ``O(adapter(h, f))`` where the adapter computes
``h + f + s·Up(QuickGELU(Down(f)))`` and then adds the guided branch ``c·Σ_j w_ij F_ij``.

- **pre-LN** (CLIP text, ViT, DeiT, DINOv2, AST)::

      h = x + post_attn(Attn(LN1(x)))        post_attn: dropout / layer scale λ1 / drop-path
      f = post_ffn(MLP(LN2(h)))              post_ffn:  dropout / layer scale λ2 / drop-path
      O = identity

  Without an adapter the block is exactly ``h + f``; DINOv2's layer scale is part of ``f``, so
  the bottleneck reads the same scaled FFN output that the residual stream receives.

- **post-LN** (BERT, RoBERTa, MiniLM)::

      h = LN_attn(x + Attn(x))               the layer's attention module, residual and LN included
      f = dropout(W_out · act(W_in · h))     intermediate + output.dense, *before* the residual
      O = LN_out                             the layer's output LayerNorm

  Without an adapter the block is exactly ``LN_out(h + f)``. The adapter replaces the residual
  sum *inside* the output norm — ``LN_out(h + f + s·Up(…(f)) + c·guided)`` — which is where
  Houlsby-style adapters sit in post-LN transformers: the adapted stream stays normalised the
  way every following frozen layer expects, and the adapter's update is not washed out by a
  residual added after the norm.

Attention always runs bidirectionally: the attention module is called with no mask and
``is_causal=False`` (CLIP text's causal mask is built by its *model* forward, never used here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError

Modality = Literal["language", "vision", "audio"]
ConfigFn = Callable[[Any], Any]


def get_path(root: Any, path: str | None) -> Any:
    """``root.a.b.c`` for ``path = "a.b.c"``; the root itself for ``""``/``None``."""
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: Any) -> None:
    """Assign ``value`` to the attribute at ``path`` (its parent must exist)."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent), name, value)


def _tensor(obj: Any) -> torch.Tensor:
    """A parameter/tensor itself, or the ``weight`` of an embedding-like module."""
    return obj.weight if isinstance(obj, nn.Module) else obj


def _first(output: Any) -> torch.Tensor:
    """Attention modules return ``(hidden, weights)``; keep the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


@dataclass(frozen=True)
class PESpec:
    """Where the frozen position-embedding table lives and how to read it as a 1D table or 2D grid.

    Attributes:
        path: from the encoder root to the PE: an ``nn.Parameter`` (``[1, P + G, C]`` or ``[P + G, C]``)
            or an ``nn.Embedding`` (its ``weight``).
        kind: ``"1d"`` (a sequence table ``[L, C]``) or ``"2d"`` (a patch grid ``[Gh, Gw, C]``).
        offset: rows before the sequence/grid — prefix-token positions (ViT's CLS: 1, DeiT/AST's
            CLS + distillation: 2) or RoBERTa's ``padding_idx + 1`` unused rows. An int or a
            function of the HF config.
        grid: 2D only: the native ``(rows, cols)`` of the patch grid, from the HF config. Patches
            are stored row-major (``index = row · cols + col``, as the patch conv's ``flatten(2)``
            lays them out), so ``grid[0, 0]`` is the top-left patch and ``grid[0, -1]`` the top-right.
        patch: 2D only: pixels per grid cell ``(ph, pw)``; with ``interpolate``, the input size of a
            requested grid is ``(rows · ph, cols · pw)``.
        interpolate: 2D only: path of the model's own PE resampling method,
            ``f(embeddings [1, P + Gh·Gw, C], height, width) -> [1, P + Gh·Gw, C]`` (ViT, DeiT,
            DINOv2 ``interpolate_pos_encoding``). Without it only the native grid is available.
    """

    path: str
    kind: Literal["1d", "2d"]
    offset: int | ConfigFn = 0
    grid: ConfigFn | None = None
    patch: ConfigFn | None = None
    interpolate: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("1d", "2d"):
            raise ValueError(f"PESpec.kind must be '1d' or '2d', got {self.kind!r}")
        if self.kind == "2d" and self.grid is None:
            raise ValueError("a 2D PESpec needs `grid` (the native patch grid from the HF config)")
        if self.interpolate is not None and self.patch is None:
            raise ValueError("PESpec.interpolate needs `patch` to turn a grid into an input size")

    def offset_rows(self, hf_config: Any) -> int:
        return int(self.offset(hf_config) if callable(self.offset) else self.offset)

    def raw(self, root: nn.Module) -> torch.Tensor:
        """The stored PE as ``[rows, C]`` (prefix/offset rows included)."""
        table = _tensor(get_path(root, self.path))
        return table.reshape(-1, table.shape[-1])

    def native_length(self, root: nn.Module, hf_config: Any) -> int:
        """1D: the usable table length ``L`` (rows after the offset)."""
        return self.raw(root).shape[0] - self.offset_rows(hf_config)

    def native_grid(self, hf_config: Any) -> tuple[int, int]:
        """2D: the native patch grid ``(rows, cols)``."""
        return _pair(self.grid(hf_config))

    def extract(self, root: nn.Module, hf_config: Any, length: int | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The frozen PE as a detached float32 copy: ``[L, C]`` (1D) or ``[Gh, Gw, C]`` (2D).

        Args:
            length: 1D: keep the first ``length`` positions (default: all of them).
            grid: 2D: the ``(rows, cols)`` grid to read; a non-native grid is resampled by the
                model's own ``interpolate`` method, as the model does for that input size.
        """
        offset = self.offset_rows(hf_config)
        with torch.no_grad():
            if self.kind == "1d":
                rows = self.raw(root)[offset:]
                available = rows.shape[0]
                length = available if length is None else length
                if not 0 < length <= available:
                    raise ConfigError(f"pe_length {length} is out of range: the backbone has {available} positions")
                return rows[:length].detach().float().clone()
            native = self.native_grid(hf_config)
            grid = native if grid is None else _pair(grid)
            if self.interpolate is not None:
                raw = self.raw(root)
                ph, pw = _pair(self.patch(hf_config))
                dummy = raw.new_zeros(1, offset + grid[0] * grid[1], raw.shape[-1])
                table = _tensor(get_path(root, self.interpolate)(dummy, grid[0] * ph, grid[1] * pw))
                table = table.reshape(-1, table.shape[-1])
            elif grid != native:
                raise ConfigError(f"pe_grid {grid} differs from the backbone's native grid {native} and this "
                                  "architecture has no PE interpolation; use its native grid")
            else:
                table = self.raw(root)
            patches = table[offset:]
            if patches.shape[0] != grid[0] * grid[1]:
                raise ConfigError(f"the PE has {patches.shape[0]} patch rows, expected {grid[0]}×{grid[1]}")
            return patches.reshape(grid[0], grid[1], -1).detach().float().clone()


@dataclass(frozen=True)
class BackboneSpec:
    """One Hugging Face architecture, declaratively (see the module docstring for the block split).

    Paths marked *root* start at the encoder root (the model whose ``embeddings`` and layers
    Any2Point uses: ``BertModel``, ``ViTModel``, ``CLIPModel.text_model``, ...); paths marked
    *layer* start at one encoder layer.

    Attributes:
        name: human-readable architecture name (error messages, docs).
        model_types: the HF ``config.model_type`` values this spec serves (the registry keys).
        modality: the default Any2Point preset (``"language"``, ``"vision"``, ``"audio"``).
        norm_placement: ``"pre"`` or ``"post"`` LayerNorm blocks.
        layers: *root* path of the ``nn.ModuleList`` of encoder layers.
        attention: *layer* path of the attention module, called as ``module(x, is_causal=False)``
            and returning ``(hidden, weights)``; post-LN: it includes the residual and the LN.
        ffn: *layer* paths applied in order to produce the FFN output (pre-LN: after ``ffn_norm``).
        pe: the frozen position embedding (:class:`PESpec`).
        root: path from the loaded model's ``base_model`` to the encoder root (CLIP: ``"text_model"``).
        embeddings: *root* path of the embedding module, dropped after the PE (and the input
            norm/bias) are read from it.
        attention_norm: pre-LN: *layer* path of the LN before attention.
        attention_post: pre-LN: *layer* paths applied to the attention output before the residual
            (dropout, layer scale, drop-path).
        ffn_norm: pre-LN: *layer* path of the LN before the FFN.
        ffn_post: pre-LN: *layer* paths applied to the FFN output (dropout, layer scale, drop-path).
        output_norm: post-LN: *layer* path of the LN applied to the block output.
        final_norm: *root* path of the norm after the last layer (``None``: post-LN models have none).
        input_norm: *root* path of a norm the model applies to its input embeddings (BERT's
            ``embeddings.LayerNorm``); kept, frozen, and applied to the first block's input.
        input_bias: *root* path of an embedding whose row 0 the model adds to every input token
            (BERT's token-type-0 embedding); kept as a frozen buffer.
        input_embedding: *root* path of the module that embeds the model's own input tokens (an
            ``nn.Embedding`` of words or a patch ``nn.Conv2d``); only its typical output norm is
            read (:meth:`input_scale`), to give the point tokens the scale the first block expects.
        drop: *root* paths of other modules Any2Point never uses (poolers); removed.
        num_prefix_tokens: learnable prefix tokens prepended to the point tokens: 1 (``[CLS]``),
            2 for DeiT/AST (``[CLS]`` + distillation). The head reads the first one.
    """

    name: str
    model_types: tuple[str, ...]
    modality: Modality
    norm_placement: Literal["pre", "post"]
    layers: str
    attention: str
    ffn: tuple[str, ...]
    pe: PESpec
    root: str = ""
    embeddings: str = "embeddings"
    attention_norm: str | None = None
    attention_post: tuple[str, ...] = ()
    ffn_norm: str | None = None
    ffn_post: tuple[str, ...] = ()
    output_norm: str | None = None
    final_norm: str | None = None
    input_norm: str | None = None
    input_bias: str | None = None
    input_embedding: str | None = None
    drop: tuple[str, ...] = ()
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"BackboneSpec {self.name!r}: {message}")

        need(bool(self.model_types), "model_types is empty")
        need(self.modality in ("language", "vision", "audio"), f"unknown modality {self.modality!r}")
        need(self.norm_placement in ("pre", "post"),
             f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}")
        need(bool(self.ffn), "ffn is empty")
        need(self.num_prefix_tokens >= 1, "num_prefix_tokens must be >= 1 (the head reads [CLS])")
        if self.norm_placement == "pre":
            need(self.attention_norm is not None and self.ffn_norm is not None,
                 "pre-LN blocks need attention_norm and ffn_norm")
            need(self.output_norm is None, "pre-LN blocks have no output_norm")
        else:
            need(self.output_norm is not None, "post-LN blocks need output_norm")
            need(self.attention_norm is None and self.ffn_norm is None and not self.attention_post
                 and not self.ffn_post, "post-LN blocks take attention_norm/ffn_norm/…_post from their own modules")

    # ------------------------------------------------------------------ structure
    def encoder_root(self, model: nn.Module) -> nn.Module:
        """The encoder root inside a loaded HF model (task heads' ``base_model`` unwrapped)."""
        return get_path(getattr(model, "base_model", model), self.root)

    def layer_list(self, root: nn.Module) -> nn.ModuleList:
        return get_path(root, self.layers)

    def input_scale(self, root: nn.Module) -> float | None:
        """The typical L2 norm of one input token as the model embeds it (``None``: no
        ``input_embedding``; NaN on the meta device): an ``nn.Embedding``'s mean row norm; for a patch
        ``nn.Conv2d``, the output norm for inputs of unit variance per pixel, ``sqrt(Σ_c ‖w_c‖² + b_c²)``."""
        module = get_path(root, self.input_embedding) if self.input_embedding else None
        if module is None:
            return None
        if _tensor(module).is_meta:  # structure only (built on the meta device): no values to read
            return float("nan")
        with torch.no_grad():
            if isinstance(module, nn.Embedding):
                return float(module.weight.float().norm(dim=1).mean())
            weight = _tensor(module).float()
            bias = getattr(module, "bias", None)
            total = weight.pow(2).sum() + (bias.float().pow(2).sum() if bias is not None else 0.0)
            return float(total.sqrt())

    # ------------------------------------------------------------------ one block
    def attention_part(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``h``: pre-LN ``x + post(Attn(LN1(x)))``; post-LN ``LN(x + Attn(x))``. Bidirectional."""
        attention = get_path(layer, self.attention)
        if self.norm_placement == "post":
            return _first(attention(x, is_causal=False))
        y = _first(attention(get_path(layer, self.attention_norm)(x), is_causal=False))
        for path in self.attention_post:
            y = get_path(layer, path)(y)
        return x + y

    def ffn_part(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``f``: the FFN output the residual stream would receive (before any residual/post-LN)."""
        y = get_path(layer, self.ffn_norm)(h) if self.norm_placement == "pre" else h
        for path in (*self.ffn, *self.ffn_post):
            y = get_path(layer, path)(y)
        return y

    def output_part(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Post-LN: the layer's output LN over ``h + f + adapter``; pre-LN: identity."""
        return get_path(layer, self.output_norm)(out) if self.norm_placement == "post" else out

    def run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The unadapted block, ``O(h + F(h))``: equals the layer's own forward (tested)."""
        h = self.attention_part(layer, x)
        return self.output_part(layer, h + self.ffn_part(layer, h))

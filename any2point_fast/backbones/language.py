"""Language backbones: a 1D PE table, tokeniser embeddings dropped.

- CLIP text (pre-LN, ``L = 77``): ``model_type`` ``"clip"`` (the text tower of a full CLIP
  checkpoint) or ``"clip_text_model"``. Run bidirectionally: its causal mask is never built.
- BERT (MiniLM, e.g. all-MiniLM-L6-v2, is a BERT) and RoBERTa / XLM-R (post-LN, ``L = 512``).
  Their embedding output is ``LN(word + position + token_type)``: the LN and the token-type-0
  row are kept frozen and applied to the first block's input. RoBERTa numbers positions from
  ``padding_idx + 1``: its first ``pad_token_id + 1`` rows are never used and are stripped.
"""

from __future__ import annotations

import dataclasses

from .spec import BackboneSpec, PESpec

CLIP_TEXT = BackboneSpec(
    name="CLIP text",
    model_types=("clip_text_model",),
    modality="language",
    norm_placement="pre",
    layers="encoder.layers",
    attention_norm="layer_norm1",
    attention="self_attn",
    ffn_norm="layer_norm2",
    ffn=("mlp",),
    final_norm="final_layer_norm",
    pe=PESpec("embeddings.position_embedding", "1d"),
    input_embedding="embeddings.token_embedding",
)

#: A full CLIP checkpoint: its text tower (the vision tower is not kept).
CLIP = dataclasses.replace(CLIP_TEXT, name="CLIP (text tower)", model_types=("clip",), root="text_model")

BERT = BackboneSpec(
    name="BERT",
    model_types=("bert",),
    modality="language",
    norm_placement="post",
    layers="encoder.layer",
    attention="attention",
    ffn=("intermediate", "output.dense", "output.dropout"),
    output_norm="output.LayerNorm",
    pe=PESpec("embeddings.position_embeddings", "1d"),
    input_norm="embeddings.LayerNorm",
    input_bias="embeddings.token_type_embeddings",
    input_embedding="embeddings.word_embeddings",
    drop=("pooler",),
)



def _roberta_offset(config) -> int:
    """RoBERTa's positions start at ``padding_idx + 1``; the rows before are never used."""
    return config.pad_token_id + 1


ROBERTA = dataclasses.replace(
    BERT,
    name="RoBERTa",
    model_types=("roberta", "xlm-roberta"),
    pe=PESpec("embeddings.position_embeddings", "1d", offset=_roberta_offset),
)

SPECS = (CLIP_TEXT, CLIP, BERT, ROBERTA)

"""Backbone attention through transformers' registry: dispatch, equality with eager, bidirectionality."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from any2point_fast import attention  # noqa: E402
from any2point_fast.attention import (  # noqa: E402
    AUTO_NAME,
    XFORMERS_NAME,
    AttentionBackendError,
    resolve_attn_implementation,
    select_kernel,
    xformers_attention_forward,
    xformers_available,
    xformers_not_supported_reasons,
)
from any2point_fast.backbones import get_backbone_spec  # noqa: E402
from any2point_fast.model import Any2PointModel  # noqa: E402

from .test_backbones import SMALL_CONFIG, load_hf, save_tiny_backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_backbones")
    return {t: save_tiny_backbone(t, root / t) for t in ("bert", "clip_text_model", "vit", "dinov2")}


def test_registered_with_transformers():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert AttentionInterface._global_mapping[AUTO_NAME] is attention.any2point_attention_forward
    assert AttentionInterface._global_mapping[XFORMERS_NAME] is xformers_attention_forward
    assert AUTO_NAME in AttentionMaskInterface._global_mapping
    assert resolve_attn_implementation("auto") == resolve_attn_implementation(None) == AUTO_NAME
    assert resolve_attn_implementation("eager") == "eager" and resolve_attn_implementation("sdpa") == "sdpa"


def test_cpu_calls_choose_sdpa_and_say_why_not_xformers():
    q = torch.randn(2, 4, 5, 8)
    assert select_kernel(q) == "sdpa"
    reasons = xformers_not_supported_reasons(q, q, torch.zeros(2, 1, 5, 5))
    assert any("on cpu" in r for r in reasons) and any("float32" in r for r in reasons)
    assert any("mask" in r for r in reasons)
    assert any("on cpu" in r for r in xformers_not_supported_reasons(q.half()))
    assert not any("float16" in r for r in xformers_not_supported_reasons(q.half()))
    with pytest.raises(AttentionBackendError, match="cannot run this call: tensors on cpu"):
        xformers_attention_forward(torch.nn.Module(), q, q, q, None)


@pytest.mark.skipif(xformers_available(), reason="xformers is installed")
def test_xformers_requested_without_xformers_is_a_clear_error(tiny_dirs):
    with pytest.raises(AttentionBackendError, match="xformers is not importable"):
        resolve_attn_implementation("xformers")
    with pytest.raises(AttentionBackendError, match="use 'auto'"):
        Any2PointModel.from_pretrained(tiny_dirs["vit"], num_classes=3, attn_implementation="xformers", **SMALL_CONFIG)


@pytest.mark.parametrize("model_type", ["bert", "clip_text_model", "vit", "dinov2"])
def test_hf_forward_with_our_attention_equals_eager(tiny_dirs, model_type):
    """The model's own forward (its masks included: BERT padding, CLIP causal) under "any2point" == eager."""
    eager = load_hf(tiny_dirs[model_type], "eager")
    ours = load_hf(tiny_dirs[model_type], AUTO_NAME)
    assert ours.config._attn_implementation == AUTO_NAME
    if model_type in ("bert", "clip_text_model"):
        inputs = dict(input_ids=torch.randint(2, 99, (2, 9)),
                      attention_mask=torch.tensor([[1] * 9, [1] * 6 + [0] * 3]))
    else:
        inputs = dict(pixel_values=torch.randn(2, 3, 32, 32))
    with mock.patch.object(attention, "_sdpa_forward", wraps=attention._sdpa_forward) as sdpa, torch.no_grad():
        got = ours(**inputs).last_hidden_state
    assert sdpa.call_count == 2  # one per layer: our function ran, and chose SDPA on the CPU
    with torch.no_grad():
        expected = eager(**inputs).last_hidden_state
    valid = inputs.get("attention_mask", torch.ones(2, got.shape[1])).bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("model_type", ["bert", "vit"])
def test_any2point_model_logits_do_not_depend_on_the_implementation(tiny_dirs, model_type):
    logits = {}
    for name in ("eager", "sdpa", "auto"):
        torch.manual_seed(0)
        model = Any2PointModel.from_pretrained(tiny_dirs[model_type], num_classes=3, attn_implementation=name,
                                               **SMALL_CONFIG).eval()
        assert model.backbone.config._attn_implementation == resolve_attn_implementation(name)
        with torch.no_grad():
            logits[name] = model(torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(logits["auto"], logits["eager"], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", AUTO_NAME])
def test_clip_text_blocks_run_bidirectionally(tiny_dirs, implementation):
    """Changing the last token changes the first token's output inside the wrapped blocks; the
    model's own (causal) forward is the control: there the first token cannot see the last."""
    hf = load_hf(tiny_dirs["clip_text_model"], implementation)
    spec = get_backbone_spec("clip_text_model")
    layer = spec.layer_list(spec.encoder_root(hf))[0]
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[0, -1] = torch.randn(32)
    with torch.no_grad():
        assert not torch.allclose(spec.attention_part(layer, x)[0, 0], spec.attention_part(layer, y)[0, 0])
        ids = torch.randint(2, 99, (1, 6))
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 97 + 2
        causal = hf(input_ids=ids).last_hidden_state[0, 0], hf(input_ids=changed).last_hidden_state[0, 0]
    torch.testing.assert_close(*causal, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_on_cuda_matches_eager(tiny_dirs, dtype):
    hf_eager = load_hf(tiny_dirs["vit"], "eager").cuda().to(dtype)
    hf_ours = load_hf(tiny_dirs["vit"], AUTO_NAME).cuda().to(dtype)
    pixels = torch.randn(2, 3, 32, 32, device="cuda", dtype=dtype)
    q = torch.randn(2, 4, 17, 8, device="cuda", dtype=dtype)
    assert select_kernel(q, q) == "xformers"
    with torch.no_grad():
        got, expected = hf_ours(pixel_values=pixels).last_hidden_state, hf_eager(pixel_values=pixels).last_hidden_state
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol * 4, rtol=tol * 4)

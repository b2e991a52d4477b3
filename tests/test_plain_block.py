"""``PlainBlock``: the stand-in backbone's pre-LN layer, against a hand-written attention and the oracle's block."""

from __future__ import annotations

import torch

from any2point_fast.plain_block import PlainBlock
from any2point_fast.reference.model import PlainBlock as ReferenceBlock


def _twins(seed: int = 0) -> tuple[PlainBlock, ReferenceBlock]:
    torch.manual_seed(seed)
    ours = PlainBlock(24, num_heads=4)
    torch.manual_seed(seed)
    return ours, ReferenceBlock(24, num_heads=4)


def test_attention_and_ffn_by_hand():
    block, _ = _twins()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    q, k, v = block.qkv(block.norm1(x)).split(24, dim=-1)
    heads = [slice(6 * h, 6 * h + 6) for h in range(4)]
    attended = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 6**0.5, dim=-1) @ v[..., s]
                          for s in heads], dim=-1)
    h = block.attention(x)
    torch.testing.assert_close(h, x + block.proj(attended), atol=1e-5, rtol=1e-5)
    ffn = block.mlp[2](torch.nn.functional.gelu(block.mlp[0](block.norm2(h))))
    torch.testing.assert_close(block.ffn(h), ffn, atol=0, rtol=0)
    # every cloud attends only to its own tokens
    changed = x.clone()
    changed[1] += 1
    torch.testing.assert_close(block.attention(changed)[[0, 2]], h[[0, 2]], atol=0, rtol=0)


def test_state_dict_seeded_weights_and_values_are_the_oracles():
    ours, oracle = _twins(3)
    assert list(ours.state_dict()) == list(oracle.state_dict())
    for name, value in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours.attention(x), oracle.attention(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.ffn(x), oracle.ffn(x), atol=0, rtol=0)

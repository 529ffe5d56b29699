"""Attention whose backward pass also yields Chefer's weighting (``workers.probes.fused_attention``).

Actor: the *chefer* method, which needs ``mean_heads((dS/dA * A)+)`` per layer and gradients that
still flow to the layers below, exactly as autograd through an explicit softmax would give them.
"""

from __future__ import annotations

import pytest
import torch

from workers.probes import fused_attention
from workers.probes.chefer import weighted_attention
from workers.probes.fused_attention import WeightedAttentionSink

pytestmark = pytest.mark.slow


def _inputs(b: int, h: int, n: int, t: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, rows, d, generator=g) for rows in (n, t, t)]


def test_it_matches_explicit_softmax_attention_and_autograd_block_by_block(monkeypatch):
    # 8 KiB blocks: 2 images of [3, 7, 7] float32 each (5 images -> blocks of 2, 2, 1)
    monkeypatch.setattr(fused_attention, "CPU_BLOCK_BYTES", 2 * 3 * 7 * 7 * 4)
    q, k, v = _inputs(5, 3, 7, 7, 4)
    weights = torch.randn(5, 3, 7, 4, generator=torch.Generator().manual_seed(1))
    scale = 0.5

    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    probs = torch.softmax(qa @ ka.transpose(-1, -2) * scale, dim=-1)
    out = probs @ va
    *expected_grads, grad_probs = torch.autograd.grad((out * weights).sum(), [qa, ka, va, probs])

    sink = WeightedAttentionSink("cpu")
    qb, kb, vb = (x.clone().requires_grad_(True) for x in (q, k, v))
    fused = sink.attend(qb, kb, vb, scale)
    torch.testing.assert_close(fused, out.detach())
    grads = torch.autograd.grad((fused * weights).sum(), [qb, kb, vb])
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    (weighted,) = sink.weighted()
    assert weighted.shape == (5, 7, 7) and (weighted >= 0).all()
    torch.testing.assert_close(weighted, weighted_attention(probs.detach(), grad_probs), rtol=1e-5, atol=1e-7)


def test_it_weighs_a_readout_row_whose_inputs_need_no_gradient():
    # the first traced layer (nothing below it needs a gradient) and CLIP's last layer (one query row)
    q, k, v = _inputs(3, 2, 1, 6, 4, seed=3)
    sink = WeightedAttentionSink("cpu")
    first = sink.attend(q, k, v, 0.25)
    second = sink.attend(first.expand(3, 2, 6, 4).contiguous(), k, v, 0.25)
    torch.autograd.grad(second.sum() + first.sum(), sink.anchor)
    low, high = sink.weighted()  # in forward order
    assert low.shape == (3, 1, 6) and high.shape == (3, 6, 6)

    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1).requires_grad_(True)
    dense = probs @ v
    loss = (torch.softmax(dense.expand(3, 2, 6, 4) @ k.transpose(-1, -2) * 0.25, dim=-1) @ v).sum() + dense.sum()
    (grad_probs,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(low, weighted_attention(probs.detach(), grad_probs), rtol=1e-5, atol=1e-7)


def test_it_says_so_when_no_backward_pass_reached_a_call():
    sink = WeightedAttentionSink("cpu")
    q, k, v = _inputs(1, 1, 2, 2, 2)
    sink.attend(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match=r"no backward pass reached fused attention call\(s\) \[0\]"):
        sink.weighted()

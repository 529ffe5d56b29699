"""Gradient-weighted attention relevance (Chefer, Gur & Wolf, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).

For each self-attention layer ``l`` (from ``start_layer`` to the last) with attention
probabilities ``A_l`` ``[H, T, T]`` and their gradients ``dS/dA_l`` for the explained score ``S``::

    A_bar_l = mean_heads((dS/dA_l * A_l).clamp(min=0))
    R <- R + A_bar_l @ R,      R initialised to the identity

and the image map is the readout row of ``R`` over the patch tokens (``R[cls, patches]`` for
CLIP; for SigLIP's pooling head see ``relevance.py``). The text-side relevance is the same rule
on the text tower, read at the token the text embedding is taken from.

Implementation note (exact, not an approximation): ``R_L = (I + A_bar_L) ... (I + A_bar_s)``, and
only one row of it is needed, so we propagate that row from the top layer down,
``r <- r + r @ A_bar_l``: ``O(T^2)`` per layer instead of the ``O(T^3)`` matrix product. The tests
check it against the literal matrix recursion.

Batching: the scores of the ``B`` image-prompt pairs don't interact, so one backward pass of
their sum yields every pair's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.probes.registry import register
from workers.probes.relevance import chunks, readout_row, to_grid


@dataclass
class CheferRelevance:
    image: torch.Tensor  # [B, gh, gw] float32 CPU
    text: torch.Tensor | None = None  # [B, Tt] float32 CPU, 0 on padding
    tokens: list[list[str]] | None = None  # the text tokens ``text`` refers to


def weighted_attention(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``mean_heads((grad * A)+)``: ``[B, H, ...]`` -> ``[B, ...]`` float32."""
    return (grad.float() * attn.float()).clamp(min=0).mean(1)


def propagate_row(row: torch.Tensor, attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``row [B, T]`` times ``(I + A_L) ... (I + A_1)``; ``attentions`` are the head-fused
    ``[B, T, T]`` matrices in layer order (first to last)."""
    for a in reversed(attentions):
        row = row + torch.bmm(row.unsqueeze(1), a).squeeze(1)
    return row


def relevance(adapter, pixel_values: torch.Tensor, prompts: Sequence[str], *, start_layer: int = 0,
              text: bool = False) -> CheferRelevance:
    """Chefer relevance for ``B`` image-prompt pairs in one forward and one backward pass."""
    trace = adapter.trace(pixel_values, prompts, grad_from_layer=start_layer, text=text, retain_grads=False)
    vision = list(trace.attentions[start_layer:])
    pooled = [trace.pool_attention] if trace.pool_attention is not None else []
    texts = list(trace.text_attentions) if text else []
    # Gradients of exactly the attention maps: autograd skips what doesn't lead to them (the
    # first layer's projections, layer norms, patch embedding), ~15% of the backward pass.
    grads = torch.autograd.grad(trace.score.sum(), vision + pooled + texts)
    layers = [weighted_attention(a, g) for a, g in zip(vision, grads)]
    b, t = layers[0].shape[:2]
    pool = weighted_attention(pooled[0], grads[len(vision)]) if pooled else None
    row = readout_row(adapter, pool, b, t).to(layers[0].device)
    image = to_grid(adapter, propagate_row(row, layers))
    if not text:
        return CheferRelevance(image=image)

    text_layers = [weighted_attention(a, g) for a, g in zip(texts, grads[len(vision) + len(pooled):])]
    tt = text_layers[0].shape[-1]
    text_row = torch.nn.functional.one_hot(trace.text_readout, tt).float()
    text_rel = propagate_row(text_row, text_layers) * trace.text_attention_mask.float()
    tokens = [adapter.tokenizer.convert_ids_to_tokens(ids.tolist()) for ids in trace.text_input_ids]
    return CheferRelevance(image=image, text=text_rel.detach().float().cpu(), tokens=tokens)


@register("chefer")
def chefer(adapter, pixel_values: torch.Tensor, prompts: Sequence[str], *, start_layer: int = 0,
           batch_size: int = 32) -> torch.Tensor:
    """Image-side Chefer relevance ``[B, gh, gw]``; ``start_layer`` (default 0: all layers) is the
    first layer whose attention enters ``R``. Pairs are processed ``batch_size`` at a time with one
    backward pass per batch."""
    prompts = adapter.pair_prompts(pixel_values, prompts)
    maps = [relevance(adapter, pixel_values[s], prompts[s], start_layer=start_layer).image
            for s in chunks(len(prompts), batch_size)]
    return torch.cat(maps)

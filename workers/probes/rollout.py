"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per layer: fuse heads (mean/max/min), optionally discard the weakest attention, add the residual
connection as ``0.5 * A + 0.5 * I`` and re-normalise each *row* (the attention a query token pays
sums to one; a common implementation divides by the wrong axis). The rollout is the product
``A_L ... A_1``; the map is its readout row over the patch tokens.

Rollout uses no gradients, so it does not depend on the prompt: it shows where the image
encoder looks, not what matches the text. ``prompts`` are accepted for the common contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from workers.probes.errors import ProbeInputError
from workers.probes.registry import register
from workers.probes.relevance import chunks, fuse_heads, readout_row, to_grid

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


def discard_weakest(a: torch.Tensor, ratio: float, keep_columns: int) -> torch.Tensor:
    """Zero the ``ratio`` weakest entries of each row of ``a [B, T, T]``, never the first
    ``keep_columns`` columns (attention to CLS/prefix tokens carries the global information)."""
    if ratio <= 0:
        return a
    body = a[..., keep_columns:]
    k = int(body.shape[-1] * ratio)
    if k == 0:
        return a
    idx = body.topk(k, dim=-1, largest=False).indices
    body = body.scatter(-1, idx, 0.0)
    return torch.cat([a[..., :keep_columns], body], dim=-1)


def residual_normalised(a: torch.Tensor) -> torch.Tensor:
    """``0.5 * A + 0.5 * I``, rows normalised to sum to one. ``[B, T, T]``."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye
    return a / a.sum(dim=-1, keepdim=True)


def layer_matrices(attentions: Sequence[torch.Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   keep_columns: int = 1) -> list[torch.Tensor]:
    """Per-layer ``[B, T, T]`` transition matrices as rollout and flow use them."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ProbeInputError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    return [residual_normalised(discard_weakest(fuse_heads(a.float(), head_fusion), discard_ratio, keep_columns))
            for a in attentions]


@register("rollout")
def rollout(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *,
            head_fusion: str = "mean",
            discard_ratio: float = 0.0, start_layer: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Attention rollout ``[B, gh, gw]``."""
    adapter.pair_prompts(pixel_values, prompts)  # same validation as every method
    maps = []
    for s in chunks(pixel_values.shape[0], batch_size):
        attentions, pool = adapter.attentions(pixel_values[s])
        mats = layer_matrices(attentions[start_layer:], head_fusion=head_fusion, discard_ratio=discard_ratio,
                              keep_columns=adapter.num_prefix_tokens)
        b, t = mats[0].shape[:2]
        row = readout_row(adapter, None if pool is None else fuse_heads(pool.float(), head_fusion), b, t)
        for a in reversed(mats):  # row @ A_L @ ... @ A_1
            row = torch.bmm(row.unsqueeze(1).to(a.device), a).squeeze(1)
        maps.append(to_grid(adapter, row))
    return torch.cat(maps)

"""Small pieces the attention-based grounding methods share: where the image embedding is read
out, how heads are fused, and how a token vector becomes a patch map.

The *readout* is the set of weights with which the final token states make the image embedding:

- CLIP reads the CLS token, so the readout is the one-hot row of the CLS token;
- SigLIP's MAP head is one attention step of a learned probe query over all tokens, so its
  readout is that step's attention row (head-fused; for ``chefer`` gradient-weighted, exactly as
  the rule treats any other attention layer). The probe is not itself a sequence token, so it
  carries no identity (residual) term.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from workers.probes.errors import ProbeInputError

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``[B, H, ...]`` -> ``[B, ...]`` by mean/max/min over heads."""
    if how == "mean":
        return attn.mean(1)
    if how == "max":
        return attn.amax(1)
    if how == "min":
        return attn.amin(1)
    raise ProbeInputError(f"unknown head fusion {how!r}; use one of {', '.join(HEAD_FUSIONS)}")


def readout_row(adapter: DualEncoderAdapter, pool: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor:
    """Readout weights ``[B, T]``; ``pool`` is the already head-fused pooling row ``[B, T]`` or ``None``."""
    if pool is not None:
        return pool.float()
    if adapter.num_prefix_tokens < 1:
        raise ProbeInputError("model has neither a CLS token nor a pooling head to read relevance from")
    row = torch.zeros(batch, tokens)
    row[:, 0] = 1.0
    return row


def to_grid(adapter: DualEncoderAdapter, token_relevance: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` token relevance -> ``[B, gh, gw]`` float32 CPU map of the patch tokens."""
    patches = token_relevance[:, adapter.num_prefix_tokens:]
    return patches.reshape(patches.shape[0], *adapter.grid).detach().float().cpu()


def chunks(n: int, size: int) -> Iterator[slice]:
    """``range`` slices of at most ``size`` items covering ``0..n``."""
    if size < 1:
        raise ProbeInputError(f"batch size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))

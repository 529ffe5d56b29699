"""ViT-aware Grad-CAM (Selvaraju et al. 2017, applied to transformer tokens).

Grad-CAM weights a layer's activation channels by their spatially averaged gradient:
``cam = relu(sum_c mean_tokens(dS/dh_c) * h_c)`` over the *patch* tokens, reshaped to the grid.

Which layer: in a CLS-pooled ViT (CLIP) the last layer's output is only read at the CLS token,
so the patch tokens of that output get exactly zero gradient and Grad-CAM there is empty. The
default is therefore the residual stream *entering* the last layer (the penultimate layer's
output), whose patch tokens reach the CLS token through the last attention. SigLIP's pooling
head attends over every token of the last layer, so its default is the last layer's output.

Only the layers above the chosen one are back-propagated, and never into the weights (the
adapter freezes them); that is the whole speed difference to generic Grad-CAM libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from workers.probes.errors import ProbeInputError
from workers.probes.registry import register
from workers.probes.relevance import chunks

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


def default_layer(adapter: DualEncoderAdapter) -> int:
    """Index into ``hidden_states`` (0 = embeddings, L = last layer's output)."""
    return adapter.num_layers - 1 if adapter.num_prefix_tokens > 0 else adapter.num_layers


def cam_from(activations: torch.Tensor, gradients: torch.Tensor, adapter: DualEncoderAdapter) -> torch.Tensor:
    """``[B, T, D]`` activations and gradients -> ``[B, gh, gw]`` Grad-CAM of the patch tokens."""
    acts = adapter.patch_tokens(activations.float())  # [B, gh, gw, D]
    grads = adapter.patch_tokens(gradients.float())
    weights = grads.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1, D]
    return (weights * acts).sum(-1).clamp(min=0)


@register("gradcam")
def gradcam(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *,
            layer: int | None = None,
            batch_size: int = 32) -> torch.Tensor:
    """Grad-CAM ``[B, gh, gw]`` at ``hidden_states[layer]`` (default: see module docstring)."""
    layer = default_layer(adapter) if layer is None else int(layer)
    if not 0 <= layer <= adapter.num_layers:
        raise ProbeInputError(f"gradcam layer {layer} out of range 0..{adapter.num_layers}")
    prompts = adapter.pair_prompts(pixel_values, prompts)
    maps = []
    for s in chunks(len(prompts), batch_size):
        trace = adapter.trace(pixel_values[s], prompts[s], grad_from_layer=min(layer, adapter.num_layers - 1),
                              retain_grads=False)
        h = trace.hidden_states[layer]
        # one backward for the whole batch, into this tensor only (``backward(inputs=...)`` rather
        # than ``autograd.grad``: the latter refuses leaf tensors under module hooks such as
        # torch's FlopCounterMode, which the GPU benchmark uses)
        trace.score.sum().backward(inputs=[h])
        assert h.grad is not None  # populated by the backward pass just above
        maps.append(cam_from(h.detach(), h.grad, adapter).cpu())
    return torch.cat(maps)

"""Model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

An explanation that does not change when the model's learned weights are destroyed explains the
input (edges, colours), not the model. The *cascading* test randomises the model stage by stage from
the top (projection heads and final norms) down through each transformer layer to the embeddings,
explains the same inputs after each stage, and compares with the trained model's explanations by
Spearman rank correlation.

*Every* parameter is randomised, not only modules that have ``reset_parameters``: attention
projections, layer norms, position and patch embeddings, class tokens, the logit scale. Each
tensor is replaced by Gaussian noise with that tensor's own mean and standard deviation, so
activations keep a plausible scale (a tensor of all-zero init would otherwise silence the network,
and the check would test the numerics, not the method). Scalars (logit scale/bias) have no spread of
their own and get ``N(value, max(|value|, 1e-2))``. Buffers (position ids) are not weights and are kept.

The model is restored exactly afterwards (``randomised`` is a context manager).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# "<tower>.<...>.layers.<i>." / ".layer.<i>." / ".blocks.<i>." / ".h.<i>.": a transformer block.
_LAYER = re.compile(r"^(?P<tower>.*?)\.(?:layers|layer|blocks|h)\.(?P<index>\d+)\.")
# Parameters below the first block: embeddings and the norm applied before the blocks.
_BOTTOM = ("embed", "pre_layrnorm", "pre_layernorm", "class_token", "cls_token", "patch_proj")


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: the parameters randomised in addition to all earlier stages."""

    name: str
    parameters: tuple[str, ...]


def randomisation_stages(model: torch.nn.Module) -> list[Stage]:
    """Every parameter of ``model`` in cascade order: ``head``, ``block -1`` (each tower's top
    block), ``block -2``, ..., ``embeddings``. Towers of different depth are aligned at the top."""
    names = [name for name, _ in model.named_parameters()]
    depth: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            depth[match["tower"]] = max(depth.get(match["tower"], -1), int(match["index"]))
    head: list[str] = []
    bottom: list[str] = []
    blocks: dict[int, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            from_top = depth[match["tower"]] - int(match["index"])
            blocks.setdefault(from_top, []).append(name)
        elif any(marker in name for marker in _BOTTOM):
            bottom.append(name)
        else:
            head.append(name)
    stages = [Stage("head", tuple(head))] if head else []
    stages += [Stage(f"block -{k + 1}", tuple(blocks[k])) for k in sorted(blocks)]
    if bottom:
        stages.append(Stage("embeddings", tuple(bottom)))
    return stages


@torch.no_grad()
def randomise_(model: torch.nn.Module, names: set[str] | tuple[str, ...], generator: torch.Generator) -> int:
    """Replace the named parameters in place by noise with each tensor's mean and std. Returns the
    number of scalars changed."""
    wanted = set(names)
    changed = 0
    for name, param in model.named_parameters():
        if name not in wanted:
            continue
        data = param.detach().float()
        mean = data.mean()
        std = data.std() if data.numel() > 1 else torch.tensor(0.0)
        if not torch.isfinite(std) or std <= 0:
            std = torch.clamp(mean.abs(), min=1e-2)
        noise = torch.randn(param.shape, generator=generator) * std.cpu() + mean.cpu()
        param.copy_(noise.to(param.device, param.dtype))
        changed += param.numel()
    return changed


def forget_cached_outputs(adapter) -> None:
    """Drop whatever the adapter cached from the model's outputs (CLIP's adapter caches text
    embeddings): after randomising, they belong to another model. Uses the adapter's public
    ``clear_caches()`` where it has one."""
    clear = getattr(adapter, "clear_caches", None)
    if callable(clear):
        clear()
        return
    cache = getattr(adapter, "_text_cache", None)
    if isinstance(cache, dict):
        cache.clear()


@contextmanager
def randomised(model: torch.nn.Module, *, on_change: Callable[[], None] | None = None) -> Iterator[None]:
    """Snapshot every parameter; restore them all on exit, whatever happened inside.

    ``on_change`` runs after the restore (e.g. ``forget_cached_outputs``), so nothing computed from
    the randomised weights outlives the check: a worker may keep this model cached for later probes.
    """
    snapshot = {name: param.detach().clone() for name, param in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(snapshot[name])
        if on_change is not None:
            on_change()


def cascade(model: torch.nn.Module, *, seed: int = 0) -> Iterator[tuple[Stage, int]]:
    """Randomise ``model`` stage by stage (cumulatively), yielding ``(stage, scalars changed)`` after
    each. Use inside ``randomised(model)`` so the trained weights come back."""
    generator = torch.Generator().manual_seed(seed)
    for stage in randomisation_stages(model):
        yield stage, randomise_(model, stage.parameters, generator)

"""Memory planning: a probe's peak device memory, estimated from the model's config before it runs.

A GPU run that dies of out-of-memory part-way wastes the device time spent so far, and a model
that cannot fit at all should be refused before it is loaded, with the numbers that say why. So,
before a CUDA run, ``suite.run`` asks :func:`plan` for batch sizes that fit the device's free
memory, and refuses a model whose weights and a batch of one cannot fit. The memory backoff in
``suite.run`` (halving after a real out-of-memory error) stays as the safety net for what an
estimate cannot know (other processes, allocator fragmentation).

The estimate has two parts:

- **weights**: the model instantiated on PyTorch's ``meta`` device (no memory, no download) and its
  parameters counted, so every architecture transformers builds is counted exactly, whatever its
  layout (projectors, resamplers, cross-attention layers, untied heads);
- **activations**: per transformer layer, the tensors a forward pass keeps for the backward pass,
  after Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022),
  eq. 1: ``s b h (34 + 5 a s / h)`` bytes at 16 bits for ``s`` tokens, batch ``b``, width ``h``, ``a``
  heads, with the MLP's share scaled to the config's intermediate width. A batch parameter that
  sizes differentiated passes (``Batch(backward=True)``: Chefer, Grad-CAM, token attribution) keeps
  every layer's activations alive; one that sizes scoring passes keeps one layer's.

The attention probabilities are counted in full (``5 a s^2 b``): the explanation methods run eager
attention because they read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: bytes per element of the dtypes a probe runs in (``None``: float32)
DTYPE_BYTES = {None: 4, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
#: the share of the device's free memory a plan may use: the CUDA context, the allocator's
#: rounding and fragmentation, and the estimate's own error take the rest
USABLE_SHARE = 0.85
#: prompt and generated text a generative probe adds to the image tokens, when the plan does not say
TEXT_TOKENS = 96


@dataclass(frozen=True)
class Tower:
    """One transformer stack a probe runs: its depth, width, heads, MLP width and tokens per item."""

    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    tokens: int

    def layer_bytes(self, batch: int, element_bytes: int) -> int:
        """Activations one layer keeps for a batch (Korthikanti et al. eq. 1, MLP share scaled)."""
        s, b, h, a = self.tokens, batch, self.hidden, self.heads
        per_16bit = s * b * (15 * h + 19 * self.intermediate / 4) + 5 * a * s * s * b
        return int(per_16bit * element_bytes / 2)


@dataclass(frozen=True)
class Footprint:
    """What a model needs on the device: its parameter count and the stacks a probe runs."""

    model_type: str
    parameters: int
    towers: tuple[Tower, ...]

    def weight_bytes(self, element_bytes: int) -> int:
        return self.parameters * element_bytes

    def peak_bytes(self, batch: int, *, backward: bool, element_bytes: int) -> int:
        """Weights plus the activations of one pass over ``batch`` items."""
        if backward:
            acts = sum(t.layers * t.layer_bytes(batch, element_bytes) for t in self.towers)
        else:
            acts = max((t.layer_bytes(batch, element_bytes) for t in self.towers), default=0)
        return self.weight_bytes(element_bytes) + acts


def _get(cfg: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ValueError(f"the config gives none of {', '.join(names)}")
    return default


def _vision_tower(cfg: Any, image_size: int | None) -> Tower:
    hidden = _get(cfg, "hidden_size", "embed_dim", "width")
    side = image_size or _get(cfg, "image_size", default=448)  # dynamic-resolution towers name no size
    patch = _get(cfg, "patch_size", default=14)
    tiles = _get(cfg, "max_num_tiles", default=1)  # mllama: every tile is a full image
    return Tower("vision", layers=_get(cfg, "num_hidden_layers", "depth", "num_layers"), hidden=hidden,
                 heads=_get(cfg, "num_attention_heads", "num_heads", "attention_heads"),
                 intermediate=_get(cfg, "intermediate_size", "mlp_dim", default=4 * hidden),
                 tokens=tiles * (side // patch) ** 2 + 1)


def _text_tower(cfg: Any, tokens: int) -> Tower:
    hidden = _get(cfg, "hidden_size", "d_model")
    return Tower("text", layers=_get(cfg, "num_hidden_layers", "num_layers"), hidden=hidden,
                 heads=_get(cfg, "num_attention_heads", "num_heads"),
                 intermediate=_get(cfg, "intermediate_size", "ffn_dim", default=4 * hidden), tokens=tokens)


def is_generative(config: Any) -> bool:
    """Whether transformers builds ``config`` as an image-text-to-text model (else: a dual encoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _token_merge(config: Any, vision_cfg: Any) -> int:
    """How many vision tokens become one language-model token: Qwen's and Pixtral's spatial merge,
    Idefics3's pixel shuffle (``scale_factor``), InternVL's ``downsample_ratio``."""
    merge = getattr(vision_cfg, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", None)
    if isinstance(merge, int) and merge > 1:
        return merge * merge
    scale = getattr(config, "scale_factor", None)
    if isinstance(scale, int) and scale > 1:
        return scale * scale
    ratio = getattr(config, "downsample_ratio", None)
    if isinstance(ratio, float) and 0 < ratio < 1:
        return round(1 / (ratio * ratio))
    return 1


def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` describes, counted on the ``meta`` device (exact, no memory)."""
    from transformers import AutoModel, AutoModelForImageTextToText

    with torch.device("meta"):
        auto = AutoModelForImageTextToText if is_generative(config) else AutoModel
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def footprint(config: Any, *, image_size: int | None = None, text_tokens: int = TEXT_TOKENS) -> Footprint:
    """The model's :class:`Footprint`. Dual encoders run their vision tower (the text embeddings are
    computed once, without gradients); generative models run the vision tower and the language
    model over the image tokens it receives plus ``text_tokens``."""
    vision_cfg = getattr(config, "vision_config", None)
    if vision_cfg is None:
        raise ValueError(f"{getattr(config, 'model_type', 'this model')} has no vision config")
    vision = _vision_tower(vision_cfg, image_size)
    towers = [vision]
    if is_generative(config):
        text_cfg = getattr(config, "text_config", None) or config
        if getattr(text_cfg, "cross_attention_layers", None):  # mllama: image states enter by cross-attention
            sequence = text_tokens
        else:
            sequence = _get(config, "image_seq_length", "mm_tokens_per_image",
                            default=(vision.tokens - 1) // _token_merge(config, vision_cfg)) + text_tokens
        towers.append(_text_tower(text_cfg, sequence))
    return Footprint(model_type=str(getattr(config, "model_type", "")), parameters=parameter_count(config),
                     towers=tuple(towers))


@dataclass(frozen=True)
class Plan:
    """Batch sizes that fit, or why nothing does."""

    fits: bool
    budget_bytes: int
    weight_bytes: int
    minimum_bytes: int  # weights and one item through one layer: below this nothing runs
    batch_sizes: dict[str, int]
    estimates_bytes: dict[str, int]  # per batch parameter, at the planned size

    def as_dict(self) -> dict[str, Any]:
        """What the evidence records: sizes in GiB, rounded."""
        gib = 2 ** 30
        return {"batch_sizes": dict(self.batch_sizes), "weights_gib": round(self.weight_bytes / gib, 2),
                "plannable_gib": round(self.budget_bytes / gib, 2),
                "estimated_peak_gib": {k: round(v / gib, 2) for k, v in self.estimates_bytes.items()}}

    def refusal(self, device: str) -> str:
        gib = 2 ** 30
        return (f"the model does not fit {device}: its weights alone take {self.weight_bytes / gib:.1f} GiB and "
                f"a batch of one needs at least {self.minimum_bytes / gib:.1f} GiB, but "
                f"{self.budget_bytes / gib:.1f} GiB of the device's free memory can be planned for "
                f"({USABLE_SHARE:.0%})")


def plan(fp: Footprint, requested: dict[str, int], backward: dict[str, bool], *, free_bytes: int,
         element_bytes: int) -> Plan:
    """The largest batch size up to ``requested[name]`` for each batch parameter whose estimate fits
    ``USABLE_SHARE`` of ``free_bytes``; ``fits`` is False when not even one item can run."""
    budget = int(free_bytes * USABLE_SHARE)
    minimum = fp.peak_bytes(1, backward=False, element_bytes=element_bytes)
    sizes: dict[str, int] = {}
    estimates: dict[str, int] = {}
    for name, wanted in requested.items():
        grads = backward.get(name, True)
        size = max(1, wanted)
        while size > 1 and fp.peak_bytes(size, backward=grads, element_bytes=element_bytes) > budget:
            size = max(1, math.floor(size / 2))
        sizes[name] = size
        estimates[name] = fp.peak_bytes(size, backward=grads, element_bytes=element_bytes)
    return Plan(fits=minimum <= budget, budget_bytes=budget, weight_bytes=fp.weight_bytes(element_bytes),
                minimum_bytes=minimum, batch_sizes=sizes, estimates_bytes=estimates)


def footprint_of(model_dir: str) -> Footprint:
    """:func:`footprint` of the model in a local directory, from its ``config.json`` alone."""
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():  # never a hub id: nothing is downloaded
        raise ValueError(f"{model_dir} has no config.json")
    return footprint(AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True))


def device_free_bytes(device: str) -> int:
    """Free memory on a CUDA device now (other processes' allocations excluded)."""
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)

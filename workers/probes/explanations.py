"""Explaining a grounding dataset with one method: the inputs every grounding kind shares.

How an image reaches a method: it is resized to the model's ``S x S`` input (squashed, not
cropped) before the model's own image processor runs, so the map covers the whole stored image and
maps back onto it by a plain resize. (CLIP's processor would otherwise centre-crop non-square
images and cut away objects whose boxes are scored.)

The pseudo-method ``"random"`` draws uniform noise maps, seeded per example: the chance baseline
every grounding score is read against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from workers.probes import faithfulness, registry, suite
from workers.probes.datasets import DEFAULT_PROMPT_TEMPLATE, GroundingDataset, GroundingExample, load_dataset
from workers.probes.errors import ProbeInputError
from workers.probes.kinds import BatchSize, KindParams, Limit, Seed

RANDOM = "random"


def load_dual_encoder(model: str, device: str = "cpu") -> Any:
    """``suite.load_model`` for grounding, which needs a dual encoder."""
    return suite.load_model(model, device, family="dual_encoder")


def dataset_for(dataset_dir: str | None, *, limit: int | None = None, format: str = "jsonl",
                prompt_template: str | None = None, default_split: str = "heldout") -> GroundingDataset:
    """The dataset named by ``dataset_dir`` (the zoo's ``default_split`` when ``None``)."""
    if dataset_dir is None:
        from workers.probes import zoo

        dataset_dir = str(zoo.dataset_dir(default_split))
    return load_dataset(dataset_dir, format=format, limit=limit,
                        prompt_template=prompt_template or DEFAULT_PROMPT_TEMPLATE)


def model_inputs(adapter: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> ``[B, 3, S, S]``: squash to ``S x S`` first (see the module docstring)."""
    size = adapter.image_size
    pixels: torch.Tensor = adapter.preprocess([image.resize((size, size), Image.Resampling.BICUBIC)
                                               for image in images])
    return pixels


@dataclass
class Batch:
    examples: list[GroundingExample]
    indices: list[int]  # position of each example in the dataset (seeds random maps and orders)
    images: list[Image.Image]
    pixel_values: torch.Tensor
    prompts: list[str]


def batches(adapter: Any, dataset: GroundingDataset, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(dataset), batch_size):
        examples = dataset.examples[start:start + batch_size]
        images = [example.load_image() for example in examples]
        yield Batch(examples, list(range(start, start + len(examples))), images, model_inputs(adapter, images),
                    [example.prompt for example in examples])


def example_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per dataset example (``indices``), so an example draws the same numbers in
    whatever batch it is processed."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def random_maps(grid: tuple[int, int], indices: Sequence[int], seed: int) -> torch.Tensor:
    """``[B, gh, gw]`` uniform noise, one seeded generator per example (independent of batching)."""
    return torch.stack([torch.rand(grid, generator=g) for g in example_generators(seed, indices)])


def explain(adapter: Any, method: str, pixel_values: torch.Tensor, prompts: Sequence[str], *,
            params: dict[str, Any] | None = None, indices: Sequence[int] = (), seed: int = 0) -> torch.Tensor:
    """Run grounding ``method`` (or ``"random"``) -> ``[B, gh, gw]`` float32 on CPU."""
    if method == RANDOM:
        return random_maps(adapter.grid, indices or range(len(prompts)), seed)
    fn = registry.get(method)
    try:
        maps = fn(adapter, pixel_values, list(prompts), **(params or {}))
    except TypeError as exc:
        if params and "unexpected keyword" in str(exc):
            raise ProbeInputError(f"method {method!r}: {exc}") from None
        raise
    maps = maps.detach().float().cpu()
    expected = (len(prompts), *adapter.grid)
    if tuple(maps.shape) != expected:
        raise RuntimeError(f"method {method!r} returned maps of shape {tuple(maps.shape)}, expected {expected}")
    return maps


def explain_dataset(adapter: Any, dataset: GroundingDataset, method: str, *, batch_size: int,
                    params: dict[str, Any], seed: int) -> torch.Tensor:
    """``[N, gh, gw]``: ``method``'s maps for every example of ``dataset``."""
    maps = [explain(adapter, method, batch.pixel_values, batch.prompts, params=params, indices=batch.indices,
                    seed=seed) for batch in batches(adapter, dataset, batch_size)]
    return torch.cat(maps)


def explain_image(adapter: Any, image: Image.Image, prompt: str, method: str, *,
                  params: dict[str, Any] | None = None) -> torch.Tensor:
    """``[gh, gw]`` map of ``method`` for one image and prompt."""
    return explain(adapter, method, model_inputs(adapter, [image]), [prompt], params=params)[0]


def pointing(maps: torch.Tensor, dataset: GroundingDataset, tolerance_px: float) -> float:
    """The pointing game of ``maps`` over ``dataset``."""
    return float(np.mean([faithfulness.localisation(m, e.boxes, e.width, e.height, tolerance_px=tolerance_px).hit
                          for m, e in zip(maps, dataset.examples, strict=True)]))


def method_names(requested: str | Sequence[str] | None) -> list[str]:
    """``"all"``/``None`` -> every registered method; otherwise the named ones (checked)."""
    if requested is None or requested == "all":
        return registry.available()
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise ProbeInputError("no method given")
    for name in names:
        if name != RANDOM:
            registry.get(name)  # raises ProbeInputError naming the available methods
    return names


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


class DatasetParams(KindParams):
    """Parameters every kind that explains a grounding dataset shares."""

    limit: Limit = None
    batch_size: BatchSize = 16
    format: Literal["jsonl", "coco"] = Field("jsonl", description="dataset format: annotations.jsonl or COCO "
                                                                  "instances JSON")
    prompt_template: str | None = Field(None, min_length=1, max_length=200,
                                        description="COCO only: prompt from the category name "
                                                    f"(default {DEFAULT_PROMPT_TEMPLATE!r})")
    seed: Seed = 0

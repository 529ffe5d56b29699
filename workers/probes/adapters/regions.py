"""Image-token -> image-region maps for VLMs whose image tokens depend on the image's size and shape.

In LLaVA every image becomes the same ``gh x gw`` grid of tokens, so an image token *is* a grid
cell. In any-resolution and dynamic-resolution families (LLaVA-NeXT / OneVision tiles plus a base
image, with padding removed and a newline token per row; Qwen's merged patches; Idefics3's pixel
shuffle) the number of image tokens and what each one covers depend on the stored image. Probes
still report relevance over one fixed grid of **regions of the stored image** (``grid``, boxes from
``patch_boxes``), so these adapters describe each image token by the box it covers in stored-image
pixels (``token_boxes``) and turn that into a ``[n_img, G]`` map: the share of token ``j``'s box that
lies in region ``g``. Every row sums to 1, so relevance over regions sums to the relevance of the
image tokens: a token's image share is kept exactly. A token that stands for a layout marker rather
than pixels (a row's newline) gets the box of the row it ends.

Because the token count depends on the image, ``encode`` needs the image's layout: ``preprocess``
records it, and ``prepare`` / ``attribute`` preprocess before they encode. A batch must share one
layout (same stored size), since its rows share one prompt.

Processors: several of these families' ``AutoProcessor`` also builds a video processor that needs
torchvision, which Loupe does not depend on (CPU torch wheels and PyPI's torchvision do not import
together here). Probes only read images, so ``image_only_processor`` assembles what they use — the
directory's own image processor (PIL backend), tokenizer and chat template — through the Auto
classes, and a provider's checkpoint loads without torchvision.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.probes.adapters.base import Encoded, FusionAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError


@dataclass
class RegionEncoded(Encoded):
    """``Encoded`` plus ``regions`` ``[n_img, G]``: the share of image token ``j`` in region ``g``."""

    regions: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """What the processor made of one stored image: its size and the family's own extras
    (``image_sizes``, ``image_grid_thw``...) that ``image_features`` passes to the model."""

    size: tuple[int, int]  # stored image (width, height)
    extras: tuple[tuple[str, Any], ...] = ()


def region_boxes(image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``[gh * gw, 4]`` boxes ``(x0, y0, x1, y1)`` of a uniform ``grid`` over a stored image of
    ``(width, height)``, row-major."""
    w, h = image_size
    gh, gw = grid
    ys, xs = np.linspace(0, h, gh + 1), np.linspace(0, w, gw + 1)
    return np.array([(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(gh) for c in range(gw)], dtype=np.float64)


def overlap_matrix(boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[n, gh * gw]``: the share of each box ``(x0, y0, x1, y1)`` (stored-image pixels) lying in each
    region of ``grid``. Boxes are clipped to the image; a box with no area left (a cell of padding
    that a rounding kept) is widened to the one-pixel strip at the nearest edge, so that no token's
    relevance is dropped and every row sums to 1."""
    w, h = image_size
    b = boxes.double().clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    for lo, hi, limit in ((0, 2, w), (1, 3, h)):
        empty = b[:, hi] - b[:, lo] <= 1e-9
        start = b[empty, lo].clamp(max=limit - 1)
        b[empty, lo], b[empty, hi] = start, start + 1
    regions = torch.from_numpy(region_boxes(image_size, grid))
    ix = (torch.minimum(b[:, None, 2], regions[None, :, 2])
          - torch.maximum(b[:, None, 0], regions[None, :, 0])).clamp(min=0)
    iy = (torch.minimum(b[:, None, 3], regions[None, :, 3])
          - torch.maximum(b[:, None, 1], regions[None, :, 1])).clamp(min=0)
    area = ix * iy
    return (area / area.sum(1, keepdim=True)).float()


class ImageOnlyProcessor:
    """What the probes read from a processor: ``image_processor``, ``tokenizer``, ``chat_template``."""

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template


def image_only_processor(directory: str | Path) -> ImageOnlyProcessor:
    """The directory's image processor (the PIL backend when torchvision is absent), tokenizer and chat
    template, without the video processor some families' ``AutoProcessor`` insists on."""
    from transformers import AutoImageProcessor, AutoTokenizer

    directory = Path(directory)
    image_processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    template = getattr(tokenizer, "chat_template", None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    elif (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return ImageOnlyProcessor(image_processor, tokenizer, template)


class RegionMappedAdapter(FusionAdapter):
    """A fusion adapter whose image tokens depend on the image's layout (see the module docstring).

    Subclasses implement ``layout_of`` (what the processor returned for one image), ``token_boxes``
    (each image token's box in stored-image pixels, in sequence order) and ``image_features``.
    """

    patch_aligned = False
    image_token_string = "<image>"
    #: None: relevance is not carried through the vision tower (one tower pass per tile or frame; the
    #: vision rule assumes one grid), so ``chefer_full`` is not offered
    vision_trace = None
    #: ``directory -> processor``; None: ``AutoProcessor`` (families whose processor needs no torchvision)
    processor_loader: Callable[[str | Path], Any] | None = staticmethod(image_only_processor)
    _layouts: list[Layout] | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> FusionAdapter:
        from workers.probes.adapters.loading import load_generative, resolve_dtype

        autocast_dtype = resolve_dtype(dtype, torch.device(device))
        model, processor = load_generative(path, cls.hf_class, cls.model_types, cls.family,
                                           processor_loader=cls.processor_loader)
        adapter = cls(model.to(device), processor, device)  # type: ignore[call-arg]
        adapter.autocast_dtype = autocast_dtype
        return adapter

    # --- layout ------------------------------------------------------------------------------

    @abstractmethod
    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        """The ``Layout`` of image ``index`` from the image processor's output ``processed``."""

    @abstractmethod
    def token_boxes(self, layout: Layout) -> torch.Tensor:
        """``[n_img, 4]`` box ``(x0, y0, x1, y1)`` in stored-image pixels of each image token, in the
        order the tokens sit in the sequence (NaN rows: layout markers, given their row's box)."""

    def token_regions(self, layout: Layout) -> torch.Tensor:
        """``[n_img, G]`` share of each image token in each region of ``grid`` (rows sum to 1)."""
        boxes = self.token_boxes(layout).double().clone()
        w, _ = layout.size
        for j in range(len(boxes)):
            if torch.isnan(boxes[j]).any():  # a newline: the row it ends
                prev = boxes[j - 1] if j else torch.tensor([0.0, 0.0, w, 1.0], dtype=boxes.dtype)
                boxes[j] = torch.tensor([0.0, float(prev[1]), float(w), float(prev[3])], dtype=boxes.dtype)
        return overlap_matrix(boxes, layout.size, self.grid)

    def _image_processor_call(self, images: Sequence[Image.Image]) -> dict:
        return self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        processed = self._image_processor_call(images)
        self._layouts = [self.layout_of(processed, i, im.size) for i, im in enumerate(images)]
        pixel_values = processed["pixel_values"].to(self.device, dtype=self.model.dtype)
        # The layout travels with the pixels too: a caller may preprocess another batch before it runs
        # the image path on this one (head ablation keeps every batch's pixels for later passes).
        pixel_values.loupe_layouts = tuple(self._layouts)
        return pixel_values

    def current_layout(self, pixel_values: torch.Tensor | None = None) -> Layout:
        """The layout shared by ``pixel_values`` (as ``preprocess`` returned them), else by the images
        last passed to ``preprocess``."""
        layouts = getattr(pixel_values, "loupe_layouts", None) or self._layouts
        if not layouts:
            raise ProbeInputError(f"{self.family}: the number of image tokens depends on the image; "
                                  "preprocess the image before encoding the prompt")
        if any(lay != layouts[0] for lay in layouts):
            raise ProbeInputError(f"{self.family}: images of different sizes make different numbers of image tokens; "
                                  "run them one at a time (batch size 1)")
        return layouts[0]

    # --- inputs --------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """Token ids of ``prompt`` with its image placeholder (or one put first) expanded."""
        mark = self.image_token_string
        text = prompt if mark in prompt else f"{mark} {prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one image placeholder, got {prompt!r}")
        return list(self.tokenizer(text.replace(mark, mark * n_image_tokens, 1)).input_ids)

    def encode(self, prompt: str) -> RegionEncoded:
        layout = self.current_layout()
        regions = self.token_regions(layout)
        prompt = self.chat_prompt(prompt, self.image_token_string)
        input_ids = torch.tensor([self.prompt_ids(prompt, len(regions))], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != len(regions):
            raise ProbeInputError(f"the prompt {prompt!r} does not encode to {len(regions)} image tokens")
        return RegionEncoded(input_ids=input_ids, image_positions=positions, regions=regions.to(self.device))

    def prepare(self, images: Sequence[Image.Image], prompt: str) -> tuple[Encoded, torch.Tensor]:
        pixel_values = self.preprocess(images)  # first: the prompt's image tokens follow the layout
        enc = self.encode(prompt)
        with torch.no_grad():
            return enc, self.image_features(pixel_values)

    def image_token_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        regions = self.token_regions(self.current_layout(pixel_values)).to(self.device)
        return regions[None].expand(pixel_values.shape[0], -1, -1)

    def patch_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        return region_boxes(image_size, self.grid)

    def feature_swap_refusal(self, site: str) -> str | None:
        """Why ``interventions.feature_swap`` is refused at every site: it swaps an object's cells of ONE
        vision grid."""
        return (f"feature swap is not supported for {self.family}: its image tokens follow the image's layout "
                f"({self.layout_description}), so an object has no single set of grid cells to swap at the patch "
                "embedding or the projector")

    layout_description = "the tokens depend on the image's size"

    def patch_relevance(self, method: str, rows_rel: torch.Tensor, image_positions: torch.Tensor,
                        attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        vision_rows: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(f"{self.family}: relevance through the vision tower (chefer_full) is not "
                                    "supported; image-token relevance is mapped to regions by the token layout")

"""InternVL (tiles plus a thumbnail, pixel shuffle) behind ``RegionMappedAdapter``.

The image processor (``GotOcr2ImageProcessor``, ``crop_to_patches``, which ``InternVLProcessor`` always
turns on) picks a ``cols x rows`` arrangement of ``S x S`` tiles whose aspect ratio is closest to the
stored image's (``get_optimal_tiled_canvas``), squashes the image onto that ``cols*S x rows*S`` canvas
(no padding, no crop) and cuts it into tiles, row-major; when there is more than one tile it appends
a thumbnail (the whole image squashed to ``S x S``). InternViT reads each tile as a ``g x g`` grid of
patches after a CLS token (dropped: ``vision_feature_select_strategy`` "default"), and the model's
``pixel_shuffle`` (``downsample_ratio`` 0.5) folds every 2 x 2 block of patches into one token. The
tokens of all tiles sit in one run of ``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``.

``token_boxes`` gives every patch of every tile its box in stored-image pixels and runs the model's
OWN ``pixel_shuffle`` on those coordinates, so each token's box is the union of the patches folded
into it in whatever order that transformers version folds them.

Supported: loading (image-only processor: its ``AutoProcessor`` needs torchvision for video),
captioning, ``attribute`` / ``token_attribution`` (``chefer``, ``raw``) and attention statistics over
regions, head ablation over the decoder and the vision tower. Refused with a message: ``chefer_full``
(each tile runs through the tower separately), feature swap (an object lies in a tile and in the
thumbnail), ``vision_feature_select_strategy`` "full" (the model itself cannot fold a CLS token into
its square grid), several ``vision_feature_layer`` values, tiles that differ from the tower's input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workers.probes.adapters.base import autocast_forward
from workers.probes.adapters.regions import Layout, RegionMappedAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class InternVLAdapter(RegionMappedAdapter):
    architecture = "internvl"
    hf_class = "InternVLForConditionalGeneration"
    model_types = ("internvl",)
    family = "InternVL"
    layout_description = "tiles plus a thumbnail, each its own vision grid, pixel-shuffled"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        cfg: Any = model.config
        if not isinstance(getattr(cfg, "vision_feature_layer", -1), int):
            raise UnsupportedModelError(f"{self.family} with several vision feature layers is not supported")
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError(f"{self.family}: vision_feature_select_strategy "
                                        f"{cfg.vision_feature_select_strategy!r} is not supported (the model folds "
                                        "a square grid of patches, without the CLS token)")
        self.setup(model, processor, device)
        self.ratio = float(cfg.downsample_ratio)
        g = self.image_size // self.patch_size
        self.tokens_per_tile = int(round(g * self.ratio)) ** 2
        tok: Any = self.tokenizer
        try:
            self.start_image_token, self.end_image_token = tok.start_image_token, tok.end_image_token
            self.image_token_string = tok.context_image_token
        except AttributeError:
            raise UnsupportedModelError(f"{self.family}: the tokenizer does not name InternVL's image tokens "
                                        "(start_image_token, end_image_token, context_image_token)") from None
        ip = processor.image_processor
        tile = (getattr(ip, "size", None) or {}).get("height")
        if tile is not None and int(tile) != self.image_size:
            raise UnsupportedModelError(f"{self.family}: the image processor's tiles are {tile} px but the vision "
                                        f"tower reads {self.image_size} px; the token -> region map assumes they agree")
        seq = self._processor_seq_length(Path(getattr(model, "name_or_path", "") or "."))
        if seq is not None and seq != self.tokens_per_tile:
            raise UnsupportedModelError(f"{self.family}: the processor writes {seq} image tokens per tile but the "
                                        f"model makes {self.tokens_per_tile}")

    @property
    def hf_model(self) -> Any:
        """The transformers model, untyped (transformers' modules are not annotated)."""
        return self.model

    @property
    def hf_processor(self) -> Any:
        """The processor (image processor, tokenizer, chat template), untyped."""
        return self.processor

    @staticmethod
    def _processor_seq_length(directory: Path) -> int | None:
        """``image_seq_length`` from the directory's ``processor_config.json`` (what ``InternVLProcessor``
        would expand a tile to), or None."""
        config = directory / "processor_config.json"
        if not config.is_file():
            return None
        value = json.loads(config.read_text(encoding="utf-8")).get("image_seq_length")
        return int(value) if value is not None else None

    # --- layout --------------------------------------------------------------------------------

    def _image_processor_call(self, images: Any) -> dict:
        # InternVLProcessor passes crop_to_patches=True whatever the image processor's own default says
        return self.hf_processor.image_processor([im.convert("RGB") for im in images], crop_to_patches=True,
                                                 return_tensors="pt")

    def _tiling(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(cols, rows)`` of the tiled canvas the image processor picks for a stored image of ``size``."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip: Any = self.hf_processor.image_processor
        w, h = size
        lo, hi = int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 12))
        if hi <= 1:
            return 1, 1
        cols, rows = get_optimal_tiled_canvas((h, w), (self.image_size, self.image_size), lo, hi)
        return int(cols), int(rows)

    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        cols, rows = self._tiling(size)
        n = int(processed["num_patches"][index])
        if n != cols * rows + (cols * rows > 1):
            raise ProbeInputError(f"{self.family}: the image processor made {n} tiles for a {size[0]}x{size[1]} "
                                  f"image, not the {cols}x{rows} tiling (plus thumbnail) the region map expects")
        return Layout(size=size, extras=(("cols", cols), ("rows", rows), ("tiles", n)))

    def token_boxes(self, layout: Layout) -> torch.Tensor:
        w, h = layout.size
        extras = dict(layout.extras)
        cols, rows = extras["cols"], extras["rows"]
        g = self.image_size // self.patch_size
        cells = torch.arange(g, dtype=torch.float64)
        y0, x0 = torch.meshgrid(cells, cells, indexing="ij")
        unit = torch.stack([x0, y0, x0 + 1, y0 + 1], -1).reshape(g * g, 4) / g  # one tile, in [0, 1]
        tiles = [(unit + torch.tensor([c, r, c, r], dtype=torch.float64))
                 / torch.tensor([cols, rows, cols, rows], dtype=torch.float64)
                 for r in range(rows) for c in range(cols)]
        if len(tiles) > 1:
            tiles.append(unit)  # the thumbnail: the whole image
        boxes = torch.stack(tiles) * torch.tensor([w, h, w, h], dtype=torch.float64)  # the canvas is the image
        shuffled = self.hf_model.model.pixel_shuffle(boxes.reshape(len(tiles), g, g, 4), scale_factor=self.ratio)
        parts = shuffled.reshape(len(tiles), -1, shuffled.shape[-1] // 4, 4)
        union = torch.cat([parts[..., :2].amin(2), parts[..., 2:].amax(2)], -1)
        return union.reshape(-1, 4)

    def preprocess(self, images: Any) -> torch.Tensor:
        """``[B, tiles, 3, S, S]``: the processor stacks every image's tiles along one axis; a batch shares
        one layout, so they are regrouped per image."""
        pixel_values = super().preprocess(images)
        layouts = pixel_values.loupe_layouts  # type: ignore[attr-defined]
        grouped = pixel_values.reshape(len(images), -1, *pixel_values.shape[1:])
        grouped.loupe_layouts = layouts  # type: ignore[attr-defined]
        return grouped

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """``InternVLProcessor.replace_image_token``'s expansion: ``<img>``, the tiles' context tokens,
        ``</img>``."""
        mark = self.image_token_string
        text = prompt if mark in prompt else f"{mark} {prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one {mark}, got {prompt!r}")
        expanded = f"{self.start_image_token}{mark * n_image_tokens}{self.end_image_token}"
        tokenizer: Any = self.tokenizer
        return list(tokenizer(text.replace(mark, expanded, 1)).input_ids)

    # --- running -------------------------------------------------------------------------------

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D]`` (images of one layout; ``pixel_values`` as ``preprocess`` groups them)."""
        self.current_layout(pixel_values)
        b = pixel_values.shape[0]
        out = self.hf_model.model.get_image_features(pixel_values=pixel_values.flatten(0, 1), return_dict=True)
        return out.pooler_output.reshape(b, -1, out.pooler_output.shape[-1])

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer$",
                           self.vision_num_layers, self.vision_num_heads)}

"""LLaVA-NeXT and LLaVA-OneVision (any-resolution tiling) behind ``RegionMappedAdapter``.

The image processor squashes the stored image into one ``S x S`` base image and, separately,
resizes it (aspect kept) into the best-fitting canvas of ``image_grid_pinpoints``, pads it
(centred) and cuts the canvas into ``S x S`` tiles. The model packs the tokens as: the base image's
``g x g`` cells, then the tiles' cells as one big grid with the padding removed (``unpad_image``) and
a learned ``image_newline`` token closing every row; OneVision further shrinks that grid bilinearly
when it exceeds ``anyres_max_N`` tiles' worth of cells.

``token_boxes`` does not re-implement that packing: it gives every base and tile cell its box in
stored-image pixels (undoing the squash, or the resize and padding) and runs the model's OWN
``pack_image_features`` on those four coordinates, with a NaN newline. Whatever the checkpoint's
transformers version does to tokens (unpadding, rounding, OneVision's bilinear shrink, which blends
neighbouring boxes) therefore happens to their boxes too.

Supported: loading (image-only processor, no torchvision), captioning, ``attribute`` /
``token_attribution`` (decoder relevance over image tokens mapped to regions), attention
statistics (decoder attention spread over regions by the same map), head ablation over the decoder
and the vision tower (which reads every tile and the base image). Refused with a message:
``chefer_full`` (relevance through the vision tower: every tile runs through the tower separately
and the probes' vision rule assumes one grid), feature swap (an object's cells lie in the base
image and in one or more tiles, so there is no single set of cells to swap), several
``vision_feature_layer`` values, a tile size that differs from the vision tower's input (crop).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.probes.adapters.base import HFModule, autocast_forward
from workers.probes.adapters.regions import Layout, RegionMappedAdapter
from workers.probes.errors import UnsupportedModelError


class LlavaNextAdapter(RegionMappedAdapter):
    architecture = "llava_next"
    hf_class = "LlavaNextForConditionalGeneration"
    model_types = ("llava_next",)
    family = "LLaVA-NeXT"
    layout_description = "a base image plus tiles, each its own vision grid"

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        cfg = model.config
        if not isinstance(getattr(cfg, "vision_feature_layer", -2), int):
            raise UnsupportedModelError(f"{self.family} with several vision feature layers is not supported")
        self.setup(model, processor, device)
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        self.pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        tile = (crop.get("height") if getattr(ip, "do_center_crop", False) and crop else None) \
            or size.get("height") or size.get("shortest_edge")
        if tile is not None and int(tile) != self.image_size:
            raise UnsupportedModelError(f"{self.family}: the image processor's tiles are {tile} px but the vision "
                                        f"tower reads {self.image_size} px; the token -> region map assumes they agree")
        self.image_token_string = getattr(self.tokenizer, "image_token", None) or "<image>"
        #: the vision sequence starts with a CLS token (CLIP; SigLIP has none)
        self.vision_cls = getattr(cfg.vision_config, "model_type", "") != "siglip_vision_model"

    # --- layout ------------------------------------------------------------------------------

    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        h, w = (int(v) for v in processed["image_sizes"][index])
        return Layout(size=size, extras=(("image_sizes", (h, w)),))

    def _cell_boxes(self, layout: Layout) -> torch.Tensor:
        """``[1 + tiles, g * g, 4]``: the stored-image box of every cell of the base image and of each tile."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension

        w, h = layout.size
        ph, pw = dict(layout.extras)["image_sizes"]  # what the processor saw (after RGB conversion), (H, W)
        s, p = self.image_size, self.patch_size
        g = s // p
        th, tw = select_best_resolution((ph, pw), self.pinpoints)
        nh, nw = get_patch_output_size(np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (1, ph, pw)), (th, tw),
                                       ChannelDimension.FIRST)
        top, left = (th - nh) // 2, (tw - nw) // 2
        cells = np.arange(g)
        base = np.array([(c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g) for r in cells for c in cells])
        tiles = []
        for ty in range(th // s):
            for tx in range(tw // s):
                boxes = []
                for r in cells:
                    for c in cells:
                        x0, y0 = tx * s + c * p - left, ty * s + r * p - top  # canvas pixels, padding removed
                        boxes.append((x0 * w / nw, y0 * h / nh, (x0 + p) * w / nw, (y0 + p) * h / nh))
                tiles.append(boxes)
        return torch.tensor(np.stack([base, *np.array(tiles)]), dtype=torch.float64)

    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        packed, _ = self.model.model.pack_image_features(features, image_sizes, self.strategy, image_newline=newline)
        return packed[0]

    def token_boxes(self, layout: Layout) -> torch.Tensor:
        cells = self._cell_boxes(layout)
        # the CLS token is kept: it stands for its whole (base or tile) image
        if self.vision_cls and self.strategy == "full":
            whole = torch.stack([cells[:, :, 0].amin(1), cells[:, :, 1].amin(1), cells[:, :, 2].amax(1),
                                 cells[:, :, 3].amax(1)], -1)[:, None]
            cells = torch.cat([whole, cells], 1)
        sizes = torch.tensor([dict(layout.extras)["image_sizes"]], dtype=torch.long)
        newline = torch.full((4,), float("nan"), dtype=torch.float64)
        return self._pack([cells], sizes, newline)

    # --- running -------------------------------------------------------------------------------

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D]`` features at the language model's input (images of one layout)."""
        layout = self.current_layout(pixel_values)
        sizes = torch.tensor([dict(layout.extras)["image_sizes"]] * pixel_values.shape[0], dtype=torch.long,
                             device=pixel_values.device)
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.(?:model\.)?layers\.(\d+)\.self_attn\.o_proj$", self.num_layers,
                            self.num_heads),
                "vision": (r"vision_tower\..*layers\.(\d+)\.self_attn\.out_proj$", self.vision_num_layers,
                           self.vision_num_heads)}


class LlavaOnevisionAdapter(LlavaNextAdapter):
    architecture = "llava_onevision"
    hf_class = "LlavaOnevisionForConditionalGeneration"
    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"

    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        aspect = getattr(self.model.config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = self.model.model.pack_image_features(features, image_sizes, image_newline=newline,
                                                         vision_aspect_ratio=aspect)
        return packed[0]

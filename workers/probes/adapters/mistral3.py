"""Mistral 3 (Pixtral vision tower at the image's own aspect ratio, patch merger) behind ``RegionMappedAdapter``.

The image processor (``PixtralImageProcessor``, called the way ``PixtralProcessor`` calls it: with a
patch size of ``patch_size * spatial_merge_size``) shrinks the stored image to fit ``longest_edge``
(aspect kept) and stretches it up to whole multiples of ``p * m`` pixels in each direction; the
Pixtral tower reads it as one ``rh/p x rw/p`` grid of patches, and the projector's patch merger folds
every ``m x m`` block of patches into one token (``unfold``), row-major. The processor writes a row of
``[IMG]`` tokens per token row, each row closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]``:
those markers are ordinary vocabulary tokens (no image features), so they count as text.

``token_boxes`` gives every patch its box in stored-image pixels and runs the model's OWN patch merger
on those coordinates (with its learned merging layer set aside: the ``unfold`` alone places the
patches), so each token's box is the union of the patches merged into it.

Relevance is reported over a fixed ``k x k`` grid of regions of the stored image, ``k`` the token grid
of an image at the longest edge (``longest_edge / (p * m)``): no region is finer than a token.

Supported: loading (image-only processor: ``PixtralProcessor`` needs torchvision), captioning,
``attribute`` / ``token_attribution`` (``chefer``, ``raw``) and attention statistics over regions,
head ablation over the decoder and the vision tower. Refused with a message: ``chefer_full`` (the
patch merger between the tower and the tokens is not part of the vision rule), feature swap (the
probe swaps cells of one fixed grid; here the token grid follows each image's shape), several
``vision_feature_layer`` values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workers.probes.adapters.base import autocast_forward
from workers.probes.adapters.regions import Layout, RegionMappedAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class Mistral3Adapter(RegionMappedAdapter):
    architecture = "mistral3"
    hf_class = "Mistral3ForConditionalGeneration"
    model_types = ("mistral3",)
    family = "Mistral 3"
    layout_description = "one grid of merged patches shaped like the image"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        cfg: Any = model.config
        if not isinstance(getattr(cfg, "vision_feature_layer", -1), int):
            raise UnsupportedModelError(f"{self.family} with several vision feature layers is not supported")
        self.setup(model, processor, device)
        self.merge = int(cfg.spatial_merge_size)
        self.unit = self.patch_size * self.merge  # one token's square, in processed pixels
        tok: Any = self.tokenizer
        self.image_token_string = getattr(tok, "image_token", None) or "[IMG]"
        self.image_break_token = getattr(tok, "image_break_token", None) or "[IMG_BREAK]"
        self.image_end_token = getattr(tok, "image_end_token", None) or "[IMG_END]"
        extra = self._processor_config(Path(getattr(model, "name_or_path", "") or "."))
        for key, expected in (("patch_size", self.patch_size), ("spatial_merge_size", self.merge)):
            if key in extra and int(extra[key]) != expected:
                raise UnsupportedModelError(f"{self.family}: the processor's {key} is {extra[key]} but the model's is "
                                            f"{expected}; the prompt would not match the image features")
        for key in ("image_token", "image_break_token", "image_end_token"):
            if key in extra:
                setattr(self, key if key != "image_token" else "image_token_string", str(extra[key]))
        longest = int((getattr(processor.image_processor, "size", None) or {}).get("longest_edge", self.image_size))
        side = max(1, min(longest, self.image_size) // self.unit)
        self.grid = (side, side)

    @staticmethod
    def _processor_config(directory: Path) -> dict[str, Any]:
        """The directory's ``processor_config.json`` (``PixtralProcessor``'s settings), or nothing."""
        config = directory / "processor_config.json"
        if not config.is_file():
            return {}
        data = json.loads(config.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}

    @property
    def hf_model(self) -> Any:
        """The transformers model, untyped (transformers' modules are not annotated)."""
        return self.model

    # --- layout --------------------------------------------------------------------------------

    def _image_processor_call(self, images: Any) -> dict:
        ip: Any = self.processor
        # as PixtralProcessor._process_images: the image is sized in whole tokens (merged patches)
        return ip.image_processor([im.convert("RGB") for im in images],
                                  patch_size={"height": self.unit, "width": self.unit}, return_tensors="pt")

    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        rh, rw = (int(v) for v in processed["image_sizes"][index])
        return Layout(size=size, extras=(("image_sizes", (rh, rw)),))

    def token_boxes(self, layout: Layout) -> torch.Tensor:
        w, h = layout.size
        rh, rw = dict(layout.extras)["image_sizes"]
        gh, gw = rh // self.patch_size, rw // self.patch_size
        ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
        sx, sy = w / gw, h / gh  # the resize stretches the whole stored image over the patch grid
        boxes = torch.stack([xs * sx, ys * sy, (xs + 1) * sx, (ys + 1) * sy], -1).reshape(gh * gw, 4)
        merger = self.hf_model.model.multi_modal_projector.patch_merger
        learned = merger.merging_layer
        merger.merging_layer = torch.nn.Identity()
        try:
            merged = merger(boxes, torch.tensor([[rh, rw]]))  # [tokens, 4 * m * m], coordinate-major
        finally:
            merger.merging_layer = learned
        parts = merged.reshape(merged.shape[0], 4, -1)
        return torch.cat([parts[:, :2].amin(2), parts[:, 2:].amax(2)], -1)

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """``PixtralProcessor.replace_image_token``'s expansion: a row of ``[IMG]`` per token row, closed by
        ``[IMG_BREAK]``, the last by ``[IMG_END]``."""
        mark = self.image_token_string
        text = prompt if mark in prompt else f"{mark} {prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one {mark}, got {prompt!r}")
        rh, rw = dict(self.current_layout().extras)["image_sizes"]
        rows, cols = rh // self.unit, rw // self.unit
        if rows * cols != n_image_tokens:
            raise ProbeInputError(f"{self.family}: {rows}x{cols} token rows do not make {n_image_tokens} image tokens")
        expanded = self.image_break_token.join([mark * cols] * rows) + self.image_end_token
        tokenizer: Any = self.tokenizer
        return list(tokenizer(text.replace(mark, expanded, 1)).input_ids)

    # --- running -------------------------------------------------------------------------------

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D]`` (images of one layout)."""
        layout = self.current_layout(pixel_values)
        sizes = torch.tensor([dict(layout.extras)["image_sizes"]] * pixel_values.shape[0], dtype=torch.long,
                             device=pixel_values.device)
        out = self.hf_model.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes, return_dict=True)
        return torch.stack(list(out.pooler_output))

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"vision_tower\.transformer\.layers\.(\d+)\.attention\.o_proj$", self.vision_num_layers,
                           self.vision_num_heads)}

"""Idefics3 and SmolVLM (pixel shuffle over split frames) behind ``RegionMappedAdapter``.

The image processor resizes the stored image to a longest edge of ``size`` and then to multiples
of ``max_image_size`` (``M``) in both directions, so the canvas covers the whole stored image (no
padding, no crop); a canvas larger than ``M`` is cut into ``rows x cols`` frames of ``M x M``
(row-major) followed by one global frame (the canvas squashed to ``M x M``). The vision tower reads
each frame as a ``g x g`` grid of patches and the connector's pixel shuffle folds every
``s x s`` block of patches (``scale_factor``) into one token; the processor writes the frames'
tokens between text markers (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``).

``token_boxes`` gives every patch its box in stored-image pixels and runs the model's OWN
``pixel_shuffle`` on those coordinates, so each token's box is the union of the patches folded into
it, in whatever order that transformers version folds them. The prompt is expanded by the
processor's own ``replace_image_token``.

Supported: loading (its ``AutoProcessor`` needs no torchvision), captioning, ``attribute`` /
``token_attribution`` and attention statistics over regions, head ablation over the decoder and the
vision tower. Refused with a message: ``chefer_full`` (each frame runs through the tower separately
and the probes' vision rule assumes one grid) and feature swap (an object's patches lie in a split
frame and in the global frame).

SmolVLM is the same layout with its own classes; its ``AutoProcessor`` also builds a video processor
(torchvision) and needs ``num2words`` for video prompts, so it loads through the image-only processor
and expands the prompt with ``processing_smolvlm.get_image_prompt_string``, the function its processor
calls for images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from workers.probes.adapters.base import HFModule, autocast_forward
from workers.probes.adapters.regions import Layout, RegionMappedAdapter, image_only_processor
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class Idefics3Adapter(RegionMappedAdapter):
    architecture = "idefics3"
    hf_class = "Idefics3ForConditionalGeneration"
    model_types = ("idefics3",)
    family = "Idefics3"
    layout_description = "split frames plus a global frame, pixel-shuffled"
    # Idefics3Processor has no video processor: AutoProcessor loads without torchvision
    processor_loader: Callable[[str | Path], Any] | None = None

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        if not hasattr(processor, "replace_image_token"):
            raise UnsupportedModelError(f"{self.family}: the directory's processor cannot expand the image "
                                        "placeholder (no Idefics3Processor)")
        self.setup(model, processor, device)
        self.scale = int(model.config.scale_factor)
        self.image_token_string = processor.image_token
        ip = processor.image_processor
        frame = int((getattr(ip, "max_image_size", None) or {}).get("longest_edge", self.image_size))
        if frame != self.image_size:
            raise UnsupportedModelError(f"{self.family}: frames of {frame} px but the vision tower reads "
                                        f"{self.image_size} px; the token -> region map assumes they agree")

    # --- layout --------------------------------------------------------------------------------

    def _image_processor_call(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        return self.processor.image_processor([[im.convert("RGB")] for im in images], return_row_col_info=True,
                                              return_tensors="pt")

    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        rows, cols = int(processed["rows"][index][0]), int(processed["cols"][index][0])
        return Layout(size=size, extras=(("rows", rows), ("cols", cols)))

    def token_boxes(self, layout: Layout) -> torch.Tensor:
        w, h = layout.size
        extras = dict(layout.extras)
        rows, cols = extras["rows"], extras["cols"]
        g = self.image_size // self.patch_size
        cells = torch.arange(g, dtype=torch.float64)
        y0, x0 = torch.meshgrid(cells, cells, indexing="ij")
        unit = torch.stack([x0, y0, x0 + 1, y0 + 1], -1).reshape(g * g, 4) / g  # one frame, in [0, 1]
        frames = []
        for r in range(rows):  # split frames, row-major: a frame is 1/rows x 1/cols of the canvas
            for c in range(cols):
                frames.append((unit + torch.tensor([c, r, c, r], dtype=torch.float64))
                              / torch.tensor([cols, rows, cols, rows], dtype=torch.float64))
        frames.append(unit)  # the global frame (or the only one): the whole canvas
        boxes = torch.stack(frames) * torch.tensor([w, h, w, h], dtype=torch.float64)  # the canvas is the image
        shuffled = self.model.model.connector.pixel_shuffle(boxes, self.scale)  # [frames, tokens, 4 * s * s]
        parts = shuffled.reshape(*shuffled.shape[:2], -1, 4)
        union = torch.cat([parts[..., :2].amin(2), parts[..., 2:].amax(2)], -1)
        return union.reshape(-1, 4)

    def expanded_image(self, rows: int, cols: int) -> str:
        """The text the processor puts in place of the image placeholder for a ``rows x cols`` split."""
        return self.processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        mark = self.image_token_string
        text = prompt if mark in prompt else f"{mark} {prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one image placeholder, got {prompt!r}")
        extras = dict(self.current_layout().extras)
        expanded = self.expanded_image(extras["rows"], extras["cols"])
        return list(self.tokenizer(text.replace(mark, expanded, 1)).input_ids)

    # --- running -------------------------------------------------------------------------------

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D]`` (images of one layout; every frame is a full ``M x M`` frame, so no pixel mask)."""
        self.current_layout(pixel_values)
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"text_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj$", self.vision_num_layers,
                           self.vision_num_heads)}


class SmolVLMAdapter(Idefics3Adapter):
    architecture = "smolvlm"
    hf_class = "SmolVLMForConditionalGeneration"
    model_types = ("smolvlm",)
    family = "SmolVLM"
    processor_loader = staticmethod(image_only_processor)

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        self.setup(model, processor, device)
        self.scale = int(model.config.scale_factor)
        tok = self.tokenizer
        self.image_token_string = getattr(tok, "image_token", None) or "<image>"
        self.fake_image_token = getattr(tok, "fake_image_token", None) or "<fake_token_around_image>"
        self.global_image_token = getattr(tok, "global_image_token", None) or "<global-img>"
        # what the processor's image_seq_len must be for this model: tokens per frame after the shuffle
        self.image_seq_len = (self.image_size // self.patch_size // self.scale) ** 2
        frame = int((getattr(processor.image_processor, "max_image_size", None) or {}).get("longest_edge",
                                                                                           self.image_size))
        if frame != self.image_size:
            raise UnsupportedModelError(f"{self.family}: frames of {frame} px but the vision tower reads "
                                        f"{self.image_size} px; the token -> region map assumes they agree")

    def expanded_image(self, rows: int, cols: int) -> str:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        return get_image_prompt_string(rows, cols, self.image_seq_len, self.fake_image_token,
                                       self.image_token_string, self.global_image_token)

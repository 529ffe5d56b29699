"""SigLIP 2 (NaFlex: variable-resolution patch sequences) behind the dual-encoder interface.

A NaFlex tower reads a *sequence* of flattened ``p x p`` patches with its grid shape (``spatial_shapes``)
and resizes its learned position embeddings to that grid, so one checkpoint reads any grid. Its processor
resizes each image, keeping the aspect ratio, to the largest grid of at most ``max_num_patches`` patches.
The dual-encoder probes (Chefer, rollout, Grad-CAM, occlusion, faithfulness curves...) need ONE grid
shared by a batch and pixel values ``[B, 3, S, S]``, so this adapter explains the model on the square
grid the processor itself gives a square image: ``g x g`` with ``g = isqrt(max_num_patches)``,
``S = g p``. ``preprocess`` squashes each stored image to ``S x S`` and ``image_embeds`` cuts the pixels
into the processor's patch sequence (row-major patches, each flattened as rows x columns x channels)
with an all-ones patch mask. Patch ``(r, c)`` is grid cell ``(r, c)``, covering a ``g``-th of the stored
image's width and height: the token -> region map is the grid itself, at every size and aspect ratio.

What that means for an audit: for a square image the adapter's embedding is the processor path's (a test
checks it); for other shapes the probes explain the model's score for the image squashed to a square,
a valid NaFlex input but not the aspect-preserving grid the processor would pick. ``describe`` says so.

Supported: every dual-encoder probe SigLIP supports (through ``SiglipAdapter``: the MAP pooling head,
attention statistics, head ablation of vision and text towers). Refused with a message: feature swap at
the patch embedding (NaFlex embeds flattened patches with a linear layer, not the convolution over the
pixel grid the swap probe edits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from workers.probes.adapters.clip import SiglipAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class Siglip2Adapter(SiglipAdapter):
    architecture = "siglip2"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, **kwargs: Any) -> None:
        hf: Any = model
        vcfg: Any = hf.config.vision_config
        patch = int(vcfg.patch_size)
        max_patches = getattr(image_processor, "max_num_patches", None)
        if max_patches is None or int(getattr(image_processor, "patch_size", patch)) != patch:
            raise UnsupportedModelError("SigLIP 2: the directory's image processor is not a NaFlex processor for "
                                        f"{patch} px patches (max_num_patches / patch_size)")
        side = math.isqrt(int(max_patches))
        # CLIPAdapter reads the input size from the vision config; a NaFlex config has none: lend it one
        had = "image_size" in vcfg.__dict__
        vcfg.image_size = side * patch
        try:
            super().__init__(model, tokenizer, image_processor, **kwargs)
        finally:
            if not had:
                del vcfg.image_size
        self.max_num_patches = int(max_patches)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, S, S]``: each image squashed to ``S x S``, then rescaled and normalised by the processor (which
        keeps a square image of ``max_num_patches`` patches at its size)."""
        if not images:
            raise ProbeInputError("no images to preprocess")
        s = self.image_size
        square = [im.convert("RGB").resize((s, s), Image.Resampling.BILINEAR) for im in images]
        out = self.image_processor(images=square, return_tensors="pt")
        if not bool((out["spatial_shapes"] == torch.tensor([self.grid])).all()):
            raise UnsupportedModelError(f"SigLIP 2: the processor does not keep a {s} px square at "
                                        f"{self.grid[0]} x {self.grid[1]} patches")
        patches = out["pixel_values"][:, : self.grid[0] * self.grid[1]]
        return self._unpatchify(patches).to(self.device, torch.float32)

    def _patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, g * g, p * p * 3]`` in the processor's order (``convert_image_to_patches``)."""
        b, c = pixel_values.shape[:2]
        g, p = self.grid[0], self.patch_size
        return pixel_values.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        g, p = self.grid[0], self.patch_size
        return patches.reshape(b, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, g * p, g * p)

    def _encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self._patchify(pixel_values)
        b = patches.shape[0]
        mask = torch.ones(b, patches.shape[1], dtype=torch.long, device=patches.device)
        shapes = torch.tensor([self.grid] * b, dtype=torch.long, device=patches.device)
        hf: Any = self.model
        with self.autocast():
            out = hf.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def input_window(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The whole stored image: it is squashed, not cropped."""
        return 0.0, 0.0, float(size[0]), float(size[1])

    def feature_swap_refusal(self, site: str) -> str | None:
        return ("feature swap is not supported for SigLIP 2: its NaFlex tower embeds flattened patches with a "
                "linear layer, not the convolution over the pixel grid whose cells the probe swaps")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = super().describe()
        out["naflex"] = (f"explained on a square {self.grid[0]}x{self.grid[1]} patch grid (images squashed to "
                         f"{self.image_size} px); the processor keeps the aspect ratio within "
                         f"{self.max_num_patches} patches")
        return out

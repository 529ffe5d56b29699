"""The interface generative (fusion) VLMs expose to probes: LLaVA-style models.

A fusion model turns an image into ``n_img`` visual tokens that sit, together with the text
tokens, in ONE sequence processed by a causal language model. Probes for generated text
(token attribution, cross-modal attention statistics, interventions) need:

- how to build that sequence (``encode``) and where the image tokens are in it;
- the visual features at the language model's input (``image_features``), so that they can be
  edited (feature swap) before the language model runs;
- greedy generation and a teacher-forced forward that keeps every decoder layer's attention
  probabilities with their gradients (``trace``);
- the modules whose inputs are the per-head attention outputs (``head_projections``), for
  head ablation;
- the geometry linking image token ``j`` to a patch of the *stored* image (``patch_boxes``).

Shapes: ``N`` joint sequence length, ``L`` decoder layers, ``H`` decoder heads, ``n_img`` image
tokens, ``(gh, gw)`` the vision grid, ``D`` the language model's width.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from workers.probes.adapters.base import VisionLanguageAdapter


@dataclass
class Encoded:
    """One prompt with its image placeholder expanded: ``input_ids`` is ``[1, N]``."""

    input_ids: torch.Tensor
    image_positions: torch.Tensor  # [n_img] indices into the sequence, in image-token order


@dataclass
class DecoderTrace:
    """A teacher-forced forward over the joint sequence.

    ``attentions[l]`` is ``[B, H, N, N]`` and retains its gradient (read ``.grad`` after a
    backward pass, or pass the list to ``torch.autograd.grad``); ``logits`` is ``[B, N, V]``.
    """

    logits: torch.Tensor
    attentions: list[torch.Tensor]
    input_ids: torch.Tensor
    image_positions: torch.Tensor


class FusionAdapter(VisionLanguageAdapter):
    """Generative VLMs (a vision encoder feeding a causal language model)."""

    kind = "fusion"

    #: image tokens in the joint sequence that map to vision grid cells; ``image_token_prefix``
    #: of them come first and have no cell (e.g. a CLS token kept by LLaVA's "full" strategy).
    image_token_prefix: int = 0
    tokenizer: object

    @abstractmethod
    def encode(self, prompt: str) -> Encoded:
        """Token ids for ``prompt`` with the image placeholder expanded (one image)."""

    @abstractmethod
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> visual features at the language model's input ``[B, n_img, D]``."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Joint input embeddings ``[B, N, D]``: token embeddings with the image tokens replaced
        by ``image_features`` (``[B, n_img, D]``, one image per row)."""

    @abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy continuation of each row of ``inputs_embeds`` (no end-of-sequence token)."""

    @abstractmethod
    def trace(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_positions: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> DecoderTrace:
        """Teacher-forced forward with eager attention, keeping every decoder layer's attention
        probabilities with gradients."""

    @abstractmethod
    def head_projections(self, component: str = "decoder") -> list[torch.nn.Module]:
        """Per layer, the linear module whose input is the concatenation of the heads' outputs
        (``o_proj``); ``component`` is "decoder" or "vision"."""

    @abstractmethod
    def heads(self, component: str = "decoder") -> int:
        """Number of attention heads per layer of ``component``."""

    @abstractmethod
    def patch_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        """``[gh * gw, 4]`` pixel boxes ``(x0, y0, x1, y1)`` of each vision grid cell in a stored
        image of size ``(width, height)`` (undoing the processor's resize and crop)."""

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()  # type: ignore[attr-defined]

    def prepare(self, images: Sequence[Image.Image], prompt: str) -> tuple[Encoded, torch.Tensor]:
        """``(encoded prompt, LM-input visual features [B, n_img, D])`` for a batch of images."""
        enc = self.encode(prompt)
        with torch.no_grad():
            feats = self.image_features(self.preprocess(images))
        return enc, feats

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy generated token ids for each image (end-of-sequence removed)."""
        enc, feats = self.prepare(images, prompt)
        ids = enc.input_ids.expand(len(images), -1)
        with torch.no_grad():
            return self.generate(self.embed(ids, feats), max_new_tokens)


def load_any(model_dir: str, device: str = "cpu") -> VisionLanguageAdapter:
    """Load ``model_dir`` behind the right adapter (fusion or dual encoder) through
    ``suite.load_model``, so a worker's model cache serves repeated loads; the architecture table
    (``adapters.ARCHITECTURES``) routes ``llava`` to ``LlavaAdapter.from_pretrained``."""
    from pathlib import Path

    from workers.probes import suite
    from workers.probes.errors import ProbeInputError

    if not Path(model_dir).exists():
        raise ProbeInputError(f"model directory {model_dir} not found")
    return suite.load_model(model_dir, device)

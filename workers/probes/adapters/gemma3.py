"""Gemma 3 (soft image tokens, bidirectional attention among them) behind ``FusionAdapter``.

The image processor squashes the stored image to ``S x S``; the SigLIP tower reads ``S/p x S/p``
patches and the projector average-pools them to ``mm_tokens_per_image`` soft tokens, a
``k x k`` grid (``k = sqrt(mm_tokens_per_image)``), each covering a ``S/k``-pixel square: the soft
tokens are grid cells (``patch_aligned``), with the grid and cell size of the pooled grid. The
processor writes them between ``<start_of_image>`` and ``<end_of_image>`` (``full_image_sequence``).

What differs from LLaVA: Gemma 3 lets the soft tokens of one image attend to each other in both
directions; transformers builds that mask only from ``token_type_ids``. The probes call the
language model on embeddings, so ``causal_lm`` is a thin wrapper that passes the token types of the
sequence ``embed`` last built to every call that starts at position 0 (the call over the image and
prompt); later calls hold only text, which attends causally. The traced model is thus the model
that generates.

Supported: loading, captioning, ``attribute`` / ``token_attribution`` (``chefer``, ``raw``) and
attention statistics over the soft-token grid, head ablation over the decoder and the vision tower,
feature swap at the ``projector`` site. Refused with a message: pan-and-scan crops
(``do_pan_and_scan``: several crops of one image), ``chefer_full`` (the average pooling between the
tower and the soft tokens is not part of the vision rule: not offered), feature swap at the patch
embedding (the swap probe's grid is the soft-token grid, not the tower's patch grid).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from workers.probes.adapters.base import Encoded, FusionAdapter, HFModule, autocast_forward
from workers.probes.errors import ProbeInputError, UnsupportedModelError


class _TypedLM(torch.nn.Module):
    """``Gemma3ForConditionalGeneration`` called with the token types of the current sequence."""

    def __init__(self, model: HFModule, adapter: Gemma3Adapter) -> None:
        super().__init__()
        self.model = model
        self._adapter = [adapter]  # a list: not a registered submodule

    @property
    def config(self) -> Any:
        return self.model.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        keyword = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        kwargs[keyword] = cache
        types = self._adapter[0].token_types
        start = cache.get_seq_length() if cache is not None else 0
        n = inputs_embeds.shape[1]
        if start == 0 and types is not None and types.shape[1] >= n:
            kwargs["token_type_ids"] = types[:, :n].expand(inputs_embeds.shape[0], -1)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)


class Gemma3Adapter(FusionAdapter):
    architecture = "gemma3"
    hf_class = "Gemma3ForConditionalGeneration"
    model_types = ("gemma3",)
    family = "Gemma 3"
    num_prefix_tokens = 0  # SigLIP: no CLS token
    token_types: torch.Tensor | None = None
    #: None: ``chefer_full`` is not offered (the pooling between patches and soft tokens is outside the vision
    #: rule)
    vision_trace = None

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise UnsupportedModelError("Gemma 3 with pan-and-scan crops is not supported: one image becomes several "
                                        "crops of soft tokens; set do_pan_and_scan to false in the image processor")
        if not hasattr(processor, "full_image_sequence"):
            raise UnsupportedModelError("the directory's processor is not a Gemma3Processor (no image sequence)")
        self.setup(model, processor, device)
        n = int(model.config.mm_tokens_per_image)
        side = int(round(n ** 0.5))
        if side * side != n:
            raise UnsupportedModelError(f"Gemma 3 with {n} soft tokens per image (not a square grid) is not supported")
        self.grid = (side, side)
        self.patch_size = self.image_size // side  # one soft token's square, for patch_boxes
        self.n_image_tokens = n
        self._lm = _TypedLM(model, self)

    def feature_swap_refusal(self, site: str) -> str | None:
        """The swap probe edits cells of ``grid``: at the projector those are the soft tokens; the tower's
        patch grid is finer (pooled into them), so a patch-embedding swap would edit the wrong cells."""
        if site == "projector":
            return None
        return (f"feature swap at the '{site}' site is not supported for Gemma 3: the vision tower's patches are "
                f"average-pooled into a {self.grid[0]}x{self.grid[1]} grid of soft tokens, the grid the probe swaps "
                "cells of; use site 'projector'")

    @property
    def causal_lm(self) -> HFModule:
        return self._lm

    def encode(self, prompt: str) -> Encoded:
        mark = self.processor.boi_token
        prompt = self.chat_prompt(prompt, mark)
        text = prompt if mark in prompt else f"{mark} {prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one {mark}, got {prompt!r}")
        ids = self.tokenizer(text.replace(mark, self.processor.full_image_sequence, 1)).input_ids
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != self.n_image_tokens:
            raise ProbeInputError(f"the prompt {prompt!r} does not encode to {self.n_image_tokens} soft tokens")
        return Encoded(input_ids=input_ids, image_positions=positions)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        # the next language-model calls run over this sequence: their soft tokens attend to each other
        self.token_types = (input_ids == self.image_token_id).long()
        return super().embed(input_ids, image_features)

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return out.pooler_output

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"vision_tower\..*layers\.(\d+)\.self_attn\.out_proj$", self.vision_num_layers,
                           self.vision_num_heads)}

"""``LlavaForConditionalGeneration`` behind the ``FusionAdapter`` interface.

Loaded from a local directory through transformers' own classes (``AutoConfig``,
``AutoProcessor``, ``LlavaForConditionalGeneration``), safetensors only, never
``trust_remote_code``, with eager attention so that attention probabilities exist as tensors
that carry gradients.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workers.probes.adapters.fusion import DecoderTrace, Encoded, FusionAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError

#: ``model_type`` values this adapter explains.
MODEL_TYPES = ("llava",)


class LlavaAdapter(FusionAdapter):
    architecture = "llava"

    def __init__(self, model: torch.nn.Module, processor, device: str | torch.device = "cpu"):
        cfg = model.config
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if not isinstance(getattr(cfg, "vision_feature_layer", -2), int):
            raise UnsupportedModelError("LLaVA with several vision feature layers is not supported yet")
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise UnsupportedModelError("the model directory has no processor (image processor + tokenizer)")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        vc = cfg.vision_config
        self.image_size = int(vc.image_size)
        self.patch_size = int(vc.patch_size)
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        vision_prefix = 0 if getattr(vc, "model_type", "") in ("siglip_vision_model",) else 1
        self.num_prefix_tokens = vision_prefix
        # "default" drops the CLS token before the projector, "full" keeps it.
        self.image_token_prefix = vision_prefix if strategy == "full" else 0
        tc = cfg.text_config
        self.num_layers = int(tc.num_hidden_layers)
        self.num_heads = int(tc.num_attention_heads)
        self.vision_num_layers = int(vc.num_hidden_layers)
        self.vision_num_heads = int(vc.num_attention_heads)
        self.image_token_id = int(cfg.image_token_id)
        self.n_image_tokens = self.image_token_prefix + self.grid[0] * self.grid[1]
        self.eos_token_id = self.tokenizer.eos_token_id

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> LlavaAdapter:
        """Load a local LLaVA directory. ``dtype`` is accepted for the loader's signature, but the
        fusion probes run in float32 (their gradients are summed over many heads and tokens)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        directory = Path(path)
        if not directory.is_dir():
            raise ProbeInputError(f"model directory {str(directory)!r} does not exist")
        if not any(directory.glob("*.safetensors")):
            raise ProbeInputError(f"{directory}: no *.safetensors weights (pickled weights are refused: "
                                  "unpickling can run arbitrary code)")
        try:
            config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise ProbeInputError(f"{directory}: unreadable config.json ({exc})") from None
        if config.model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"{directory}: model_type {config.model_type!r} is not a supported generative VLM "
                f"(supported: {', '.join(MODEL_TYPES)})")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                directory, use_safetensors=True, trust_remote_code=False, attn_implementation="eager",
                dtype=torch.float32, output_loading_info=True)
            processor = AutoProcessor.from_pretrained(directory, trust_remote_code=False)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise ProbeInputError(f"{directory}: cannot load the LLaVA checkpoint ({exc})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        # transformers fills missing weights with random ones; explaining that would be worse than refusing.
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing or info.get("mismatched_keys"):
            raise ProbeInputError(f"{directory}: the weights don't match the config ({len(missing)} tensors missing, "
                                  f"e.g. {', '.join(map(str, missing[:3]))}); refusing a partly random model")
        return cls(model.to(device), processor, device)

    # --- inputs --------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        pv = self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, dtype=self.model.dtype)

    def encode(self, prompt: str) -> Encoded:
        text = prompt if "<image>" in prompt else "<image> " + prompt
        ids = self.tokenizer(text.replace("<image>", "<image>" * self.n_image_tokens, 1)).input_ids
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != self.n_image_tokens:
            raise ProbeInputError(f"the prompt must contain exactly one image placeholder, got {prompt!r}")
        return Encoded(input_ids=input_ids, image_positions=positions)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id)
        if int(mask.sum()) != image_features.shape[0] * image_features.shape[1]:
            raise ValueError("image features do not match the image tokens")
        return emb.masked_scatter(mask[..., None], image_features.to(emb.dtype))

    # --- running ---------------------------------------------------------------------------

    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      suppress_tokens=[self.image_token_id])
        rows = []
        for row in out.tolist():
            rows.append(row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row)
        return rows

    def trace(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_positions: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> DecoderTrace:
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_attentions=True,
                         use_cache=False, return_dict=True)
        attentions = list(out.attentions)
        if len(attentions) != self.num_layers or any(a is None for a in attentions):
            raise UnsupportedModelError("the language model did not return attention probabilities (eager attention)")
        for a in attentions:
            if a.requires_grad:
                a.retain_grad()
        return DecoderTrace(logits=out.logits, attentions=attentions, input_ids=input_ids,
                            image_positions=image_positions)

    def vision_trace(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Image features computed with the vision tower's attentions kept (with gradients).

        Returns ``(features [B, n_img, D], attentions [B, Hv, Tv, Tv] per vision layer that
        feeds the selected feature layer, vision_rows [n_img])``: ``vision_rows[j]`` is the
        vision-sequence position that image token ``j`` comes from.
        """
        cfg = self.model.config
        out = self.model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True,
                                            return_dict=True)
        layer = cfg.vision_feature_layer
        hidden = out.hidden_states[layer]
        used = layer % len(out.hidden_states)  # hidden_states[k] is the output of k vision layers
        attentions = list(out.attentions[:used])
        tv = hidden.shape[1]
        if getattr(cfg, "vision_feature_select_strategy", "default") == "default":
            hidden = hidden[:, self.num_prefix_tokens:]
            rows = torch.arange(self.num_prefix_tokens, tv, device=hidden.device)
        else:
            rows = torch.arange(tv, device=hidden.device)
        for a in attentions:
            if a.requires_grad:
                a.retain_grad()
        return self.model.model.multi_modal_projector(hidden), attentions, rows

    def _modules(self, pattern: str) -> list[torch.nn.Module]:
        found: dict[int, torch.nn.Module] = {}
        rx = re.compile(pattern)
        for name, module in self.model.named_modules():
            m = rx.search(name)
            if m:
                found[int(m.group(1))] = module
        return [found[i] for i in sorted(found)]

    def head_projections(self, component: str = "decoder") -> list[torch.nn.Module]:
        if component == "decoder":
            mods = self._modules(r"language_model\.(?:model\.)?layers\.(\d+)\.self_attn\.o_proj$")
            expected = self.num_layers
        elif component == "vision":
            mods = self._modules(r"vision_tower\..*layers\.(\d+)\.self_attn\.out_proj$")
            expected = self.vision_num_layers
        else:
            raise ValueError(f"unknown component {component!r}")
        if len(mods) != expected:
            raise UnsupportedModelError(f"cannot find the {component} attention output projections")
        return mods

    def heads(self, component: str = "decoder") -> int:
        return self.num_heads if component == "decoder" else self.vision_num_heads

    def patch_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        w, h = image_size
        ip = self.processor.image_processor
        size = getattr(ip, "size", None) or {}
        if "shortest_edge" in size:
            scale = size["shortest_edge"] / min(w, h)
            sx = sy = scale
        else:  # resized to a fixed height x width
            sx, sy = size.get("width", self.image_size) / w, size.get("height", self.image_size) / h
        rw, rh = w * sx, h * sy
        crop = getattr(ip, "crop_size", None) or {}
        if getattr(ip, "do_center_crop", False) and crop:
            left, top = (rw - crop["width"]) / 2, (rh - crop["height"]) / 2
        else:
            left = top = 0.0
        gh, gw = self.grid
        boxes = np.zeros((gh * gw, 4), dtype=np.float64)
        for r in range(gh):
            for c in range(gw):
                x0 = (left + c * self.patch_size) / sx
                y0 = (top + r * self.patch_size) / sy
                boxes[r * gw + c] = (x0, y0, x0 + self.patch_size / sx, y0 + self.patch_size / sy)
        return boxes

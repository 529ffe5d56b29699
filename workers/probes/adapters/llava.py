"""``LlavaForConditionalGeneration`` behind the ``FusionAdapter`` interface.

Loaded from a local directory through transformers' own classes (``AutoConfig``,
``AutoProcessor``, ``LlavaForConditionalGeneration``), safetensors only, never
``trust_remote_code``, with eager attention so that attention probabilities exist as tensors
that carry gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.probes.adapters.base import Encoded, FusionAdapter, HFModule, autocast_forward
from workers.probes.errors import ProbeInputError, UnsupportedModelError

#: ``model_type`` values this adapter explains.
MODEL_TYPES = ("llava",)


class LlavaAdapter(FusionAdapter):
    architecture = "llava"
    hf_class = "LlavaForConditionalGeneration"
    model_types = MODEL_TYPES
    family = "LLaVA"

    def __init__(self, model: HFModule, processor: Any, device: str | torch.device = "cpu") -> None:
        cfg = model.config
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if not isinstance(getattr(cfg, "vision_feature_layer", -2), int):
            raise UnsupportedModelError("LLaVA with several vision feature layers is not supported yet")
        self.setup(model, processor, device)
        vision_prefix = 0 if getattr(cfg.vision_config, "model_type", "") in ("siglip_vision_model",) else 1
        self.num_prefix_tokens = vision_prefix
        # "default" drops the CLS token before the projector, "full" keeps it.
        self.image_token_prefix = vision_prefix if strategy == "full" else 0
        self.n_image_tokens = self.image_token_prefix + self.grid[0] * self.grid[1]

    # --- inputs --------------------------------------------------------------------------

    def encode(self, prompt: str) -> Encoded:
        prompt = self.chat_prompt(prompt, "<image>")
        text = prompt if "<image>" in prompt else "<image> " + prompt
        ids = self.tokenizer(text.replace("<image>", "<image>" * self.n_image_tokens, 1)).input_ids
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != self.n_image_tokens:
            raise ProbeInputError(f"the prompt must contain exactly one image placeholder, got {prompt!r}")
        return Encoded(input_ids=input_ids, image_positions=positions)

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    @autocast_forward
    def scoring_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_features`` with the tower cut after its feature layer (``vision_feature_layer``
        -2 reads the second-to-last layer, yet the stock tower runs them all): the layers are
        swapped out for the call and the absolute layer index asked for, so the values are those
        of ``image_features``."""
        model: Any = self.model  # transformers modules: attributes resolved at runtime
        layer = int(model.config.vision_feature_layer)
        encoders = [m for name, m in model.model.vision_tower.named_modules()
                    if name.split(".")[-1] == "encoder" and isinstance(getattr(m, "layers", None), torch.nn.ModuleList)]
        if len(encoders) != 1:
            return self.image_features(pixel_values)
        encoder: Any = encoders[0]
        layers: torch.nn.ModuleList = encoder.layers
        used = layer % (len(layers) + 1)  # hidden state k is the output of k layers
        if used == len(layers):
            return self.image_features(pixel_values)
        encoder.layers = torch.nn.ModuleList(list(layers)[:used])
        try:
            out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=used, return_dict=True)
        finally:
            encoder.layers = layers
        feats = out.pooler_output
        result: torch.Tensor = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return result

    # --- running ---------------------------------------------------------------------------

    @autocast_forward
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
        return self.model.model.multi_modal_projector(hidden), attentions, rows

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {
            "decoder": (r"language_model\.(?:model\.)?layers\.(\d+)\.self_attn\.o_proj$", self.num_layers,
                        self.num_heads),
            "vision": (r"vision_tower\..*layers\.(\d+)\.self_attn\.out_proj$", self.vision_num_layers,
                       self.vision_num_heads),
        }

"""Qwen2.5-VL and Qwen3-VL (dynamic resolution, 2 x 2 spatial merge, M-RoPE) behind ``RegionMappedAdapter``.

The image processor resizes the stored image (aspect kept as closely as multiples allow, no padding, no
crop) to ``H x W`` pixels, both multiples of ``patch x merge``, with a pixel count between its
``shortest_edge`` and ``longest_edge`` (min / max pixels); ``image_grid_thw`` = ``(1, H/p, W/p)``. The
processor lays the patches out in ``merge x merge`` blocks, row-major over the blocks, and the vision
tower's merger folds each block into one token: image token ``k`` is block ``divmod(k, W / (p m))``,
a ``p m``-pixel square of the resized image, i.e. a ``W/(p m)``-th of the stored width by a ``H/(p m)``-th
of its height. Qwen2.5-VL's windowed attention permutes the patches inside the tower and restores the
order after the merger, so the token order is the processor's.

Positions: the language model reads 3-D rotary positions (temporal, row, column) for image tokens and
1-D ones for text (M-RoPE), which transformers derives from ``input_ids`` and ``image_grid_thw``
(``get_rope_index``); called on embeddings alone it would number the image tokens as text. The probes
call the language model on embeddings, so ``causal_lm`` is a thin wrapper that gives every call the
positions of the sequence ``embed`` last built (rows past its end continue as text, as transformers
does when it generates). Qwen3-VL also adds "deepstack" features (the merged patches of early vision
layers) to the image tokens' hidden states in the first decoder layers; they ride along with the image
features (concatenated on the feature axis) and the wrapper hands them to the language model.

Relevance is reported over a fixed grid of regions of the stored image (``grid``): as fine as the
merged tokens of a square image at the processor's largest size, at most 16 x 16.

Supported: loading (image-only processor: the family's ``AutoProcessor`` needs torchvision for its video
processor), captioning, ``attribute`` / ``token_attribution`` (``chefer``, ``raw``) and attention
statistics over regions, head ablation over the decoder and the vision tower. Refused with a message:
``chefer_full`` (the merger folds four patches into a token, and Qwen2.5-VL's windows reorder them: the
probes' vision rule assumes one token per grid cell), feature swap (the image's token grid follows its
shape, so an object has no fixed set of cells to swap). Videos are outside the probes, which read images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from workers.probes.adapters.base import autocast_forward
from workers.probes.adapters.regions import Layout, RegionMappedAdapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError

#: the finest region grid reported (regions per side)
MAX_REGIONS = 16


@dataclass
class _LMOutput:
    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None


class _PositionedLM(torch.nn.Module):
    """The Qwen-VL language model and head, called with the M-RoPE positions (and Qwen3-VL's deepstack
    features) of the sequence the adapter last embedded."""

    def __init__(self, model: torch.nn.Module, adapter: QwenVLAdapter):
        super().__init__()
        self.model: Any = model
        self._adapter = [adapter]  # a list: not a registered submodule

    @property
    def config(self) -> Any:
        return self.model.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor, cache: Any = None, past_key_values: Any = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool = False,
                output_attentions: bool = False, return_dict: bool = True) -> _LMOutput:
        cache = cache if cache is not None else past_key_values
        adapter = self._adapter[0]
        start = cache.get_seq_length() if cache is not None else 0
        b, n = inputs_embeds.shape[:2]
        extra: dict[str, Any] = {}
        if start == 0 and adapter.deepstack is not None:
            mask, features = adapter.deepstack
            keep = mask[:, :n]
            keep = torch.cat([keep, keep.new_zeros(1, n - keep.shape[1])], 1)  # rows past the image: text
            rows = int(keep.sum())
            if features and features[0].shape[0] not in (1, b):
                raise ProbeInputError(f"{adapter.family}: {b} sequences but deepstack features of "
                                      f"{features[0].shape[0]} images")
            extra["visual_pos_masks"] = keep.expand(b, -1)
            extra["deepstack_visual_embeds"] = [f[:, :rows].expand(b, -1, -1).reshape(b * rows, -1)
                                                .to(inputs_embeds.dtype) for f in features]
        keyword = adapter.text_cache_keyword
        hf: Any = self.model
        out = hf.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=adapter.positions(start, n, b), attention_mask=attention_mask,
            use_cache=use_cache, output_attentions=output_attentions, return_dict=True, **{keyword: cache}, **extra)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return _LMOutput(logits=self.model.lm_head(hidden), attentions=out.attentions)


class QwenVLAdapter(RegionMappedAdapter):
    """Qwen2.5-VL; ``Qwen3VLAdapter`` adds the deepstack features."""

    architecture = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    model_types = ("qwen2_5_vl",)
    family = "Qwen2.5-VL"
    layout_description = "a grid of merged patches that follows the image's shape"
    num_prefix_tokens = 0
    #: (``[1, N]`` image-token mask, per deepstack layer ``[1, n_img, D]``) of the sequence last embedded
    deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    _positions: torch.Tensor | None = None  # [3, 1, N] M-RoPE positions of the sequence last embedded
    _delta: int = 0  # text positions past the sequence: index + delta

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise UnsupportedModelError("the model directory has no processor (image processor + tokenizer)")
        cfg: Any = model.config
        vc, tc = cfg.vision_config, cfg.text_config
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        ip = processor.image_processor
        if not hasattr(ip, "merge_size") or not hasattr(ip, "patch_size"):
            raise UnsupportedModelError(f"{self.family}: the directory's image processor is not Qwen's "
                                        "(no patch_size / merge_size)")
        self.patch_size = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        if int(ip.patch_size) != self.patch_size or int(ip.merge_size) != self.merge:
            raise UnsupportedModelError(f"{self.family}: the image processor cuts {ip.patch_size} px patches merged "
                                        f"{ip.merge_size} x {ip.merge_size}, the vision tower reads {self.patch_size} "
                                        f"px patches merged {self.merge} x {self.merge}; they don't belong together")
        self.num_layers = int(tc.num_hidden_layers)
        self.num_heads = int(tc.num_attention_heads)
        self.vision_num_layers = int(vc.depth)
        self.vision_num_heads = int(vc.num_heads)
        self.image_token_id = int(cfg.image_token_id)
        tok: Any = self.tokenizer
        self.eos_token_id = tok.eos_token_id
        self.image_token_string = tok.convert_ids_to_tokens(self.image_token_id)
        self.vision_start = tok.convert_ids_to_tokens(int(cfg.vision_start_token_id))
        self.vision_end = tok.convert_ids_to_tokens(int(cfg.vision_end_token_id))
        unit = self.patch_size * self.merge
        size = getattr(ip, "size", None) or {}
        max_pixels = size.get("longest_edge") or getattr(ip, "max_pixels", None) or unit * unit * MAX_REGIONS ** 2
        side = max(1, min(MAX_REGIONS, int(math.isqrt(int(max_pixels)) // unit)))
        self.grid = (side, side)
        self.image_size = side * unit
        self._lm = _PositionedLM(model, self)

    @property
    def causal_lm(self) -> torch.nn.Module:
        return self._lm

    @property
    def hf(self) -> Any:
        """The transformers model (untyped: its submodules are read by name)."""
        return self.model

    @property
    def text_cache_keyword(self) -> str:
        import inspect

        params = inspect.signature(self.hf.model.language_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # --- layout ------------------------------------------------------------------------------

    def layout_of(self, processed: dict, index: int, size: tuple[int, int]) -> Layout:
        t, gh, gw = (int(v) for v in processed["image_grid_thw"][index])
        return Layout(size=size, extras=(("image_grid_thw", (t, gh, gw)),))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, patches, C * t * p * p]``: the processor's flat patches, one row per image (images of one
        layout; the processor concatenates every image's patches along one axis)."""
        processed = self._image_processor_call(images)
        self._layouts = [self.layout_of(processed, i, im.size) for i, im in enumerate(images)]
        flat = processed["pixel_values"]
        pixel_values = flat.reshape(len(images), -1, flat.shape[-1]).to(self.device, dtype=self.model.dtype)
        self.current_layout(pixel_values)  # the reshape above needs one layout
        pixel_values.loupe_layouts = tuple(self._layouts)
        return pixel_values

    def token_boxes(self, layout: Layout) -> torch.Tensor:
        w, h = layout.size
        _, gh, gw = dict(layout.extras)["image_grid_thw"]
        rows, cols = gh // self.merge, gw // self.merge
        r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                              indexing="ij")
        # a merged token covers a (p m)-pixel square of the resized image, which spans the stored image
        sx, sy = w / cols, h / rows
        return torch.stack([c * sx, r * sy, (c + 1) * sx, (r + 1) * sy], -1).reshape(-1, 4)

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """The prompt with ``<|vision_start|><|image_pad|>...<|vision_end|>`` where its image placeholder (or
        ``<|image_pad|>``) is, else first, as the family's chat template writes an image."""
        pad, start, end = self.image_token_string, self.vision_start, self.vision_end
        text = prompt.replace("<image>", pad) if pad not in prompt else prompt
        if pad not in text:
            text = f"{pad} {text}"
        if text.count(pad) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one image placeholder, got {prompt!r}")
        if f"{start}{pad}" not in text:
            text = text.replace(pad, f"{start}{pad}{end}", 1)
        tok: Any = self.tokenizer
        return list(tok(text.replace(pad, pad * n_image_tokens, 1)).input_ids)

    # --- running -------------------------------------------------------------------------------

    def _grid_thw(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = dict(self.current_layout(pixel_values).extras)["image_grid_thw"]
        return torch.tensor([grid] * pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)

    def _vision(self, pixel_values: torch.Tensor) -> Any:
        if pixel_values.dim() != 3:
            raise ProbeInputError(f"{self.family}: pixel values must come from the adapter's preprocess "
                                  "([images, patches, values])")
        return self.hf.model.get_image_features(pixel_values=pixel_values.flatten(0, 1),
                                                   image_grid_thw=self._grid_thw(pixel_values), return_dict=True)

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D]`` merged-patch features at the language model's input (images of one layout)."""
        return torch.stack(list(self._vision(pixel_values).pooler_output))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        # the next language-model calls run over this sequence: give them its M-RoPE positions
        layout = self.current_layout()
        grid = torch.tensor([dict(layout.extras)["image_grid_thw"]], dtype=torch.long, device=input_ids.device)
        types = (input_ids[:1] == self.image_token_id).int()
        positions, delta = self.hf.model.get_rope_index(input_ids[:1], mm_token_type_ids=types,
                                                           image_grid_thw=grid)
        self._positions, self._delta = positions, int(delta.flatten()[0])
        return super().embed(input_ids, image_features)

    def positions(self, start: int, n: int, batch: int) -> torch.Tensor:
        """``[3, batch, n]`` M-RoPE positions of rows ``start .. start + n - 1`` of the sequence last embedded;
        rows past its end are text: their index plus the image's position offset."""
        if self._positions is None:
            raise ProbeInputError(f"{self.family}: embed the image and prompt before running the language model")
        stored = self._positions.shape[-1]
        idx = torch.arange(start, start + n, device=self._positions.device)
        past = (idx + self._delta).view(1, 1, -1).expand(3, 1, -1)
        inside = self._positions[:, :, idx.clamp(max=stored - 1)]
        return torch.where(idx < stored, inside, past).expand(-1, batch, -1)

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", self.num_layers, self.num_heads),
                "vision": (r"visual\.blocks\.(\d+)\.attn\.proj$", self.vision_num_layers, self.vision_num_heads)}


class Qwen3VLAdapter(QwenVLAdapter):
    architecture = "qwen3_vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    model_types = ("qwen3_vl",)
    family = "Qwen3-VL"

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, n_img, D * (1 + k)]``: the merged-patch features, then the ``k`` deepstack layers' features of
        the same tokens (``embed`` splits them off for the first decoder layers)."""
        out = self._vision(pixel_values)
        parts = [torch.stack(list(out.pooler_output))]
        parts += [torch.stack(list(per_layer)) for per_layer in out.deepstack_features]
        return torch.cat(parts, -1)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        d = self.hf.get_input_embeddings().weight.shape[1]
        main, *stack = image_features.split(d, dim=-1)
        mask = input_ids[:1] == self.image_token_id
        self.deepstack = (mask, [f.detach() for f in stack])
        return super().embed(input_ids, main)

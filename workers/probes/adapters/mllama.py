"""Llama 3.2 Vision (``mllama``: cross-attention fusion) behind ``FusionAdapter``.

What differs from every other family: the image is NOT in the decoder's sequence. The sequence holds
one ``<|image|>`` placeholder (an ordinary token); the vision encoder's output (``tiles x (1 + g*g)``
vision tokens per image: per tile a CLS token, then its patches row-major) is read only by the
decoder layers listed in ``cross_attention_layers``, through cross-attention, by the tokens from the
placeholder on (``cross_attention_mask``; padding tiles are masked out).

So the adapter keeps the vision tokens beside the sequence: ``image_features`` returns them
(``[B, V, D]``, the cross-attention states), ``embed`` returns the token embeddings and remembers the
states and the cross-attention mask of that sequence, and ``causal_lm`` is a thin wrapper that hands
them to the model's first call over a sequence (later calls read the cross-attention keys from the
cache, as the model's own ``generate`` does). ``cross_attention_layers`` tells token attribution to
use Chefer's bi-modal rule for co-attention (Chefer et al., 2021): the self-attention layers propagate
relevance among text positions, and each cross-attention layer adds
``r_text @ mean_heads((grad * A_cross)+)`` to the relevance of the vision tokens. A generated token's
row is then relevance over the text positions followed by relevance over the ``V`` vision tokens
(``CrossEncoded.cross_regions`` maps those to regions of the stored image); its image share is the
vision part's share of the whole row.

The image processor fits the stored image (aspect kept) into the best canvas of ``rows x cols``
tiles of ``S`` px, pads it at the bottom and right and cuts it into tiles, row-major. A vision token's
box is its patch's box on that canvas, scaled back to the stored image; a tile's CLS token stands for
the whole tile; patches of the padding are clipped to the image's edge (``overlap_matrix``).

Supported: loading, captioning, ``attribute`` / ``token_attribution`` (``chefer`` by the bi-modal rule),
head ablation over the decoder's self-attention, its cross-attention and the vision encoder.
Refused with a message: ``raw`` and ``chefer_full`` (raw attention rows of self- and cross-attention
are separate softmaxes with no common image share; the vision encoder's tiles are separate grids),
attention statistics (they read image tokens in the decoder's sequence; here there are none), feature
swap (the vision tokens are not a single grid of cells), occlusion (perturbation on one patch grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.probes.adapters.base import Encoded, FusionAdapter, autocast_forward
from workers.probes.adapters.regions import overlap_matrix, region_boxes
from workers.probes.errors import ProbeInputError, UnsupportedModelError


@dataclass
class CrossEncoded(Encoded):
    """``Encoded`` for a cross-attention family: no image positions in the sequence; ``cross_regions``
    ``[V, G]`` is the share of each vision token (what cross-attention reads) in each region."""

    cross_regions: torch.Tensor | None = None


@dataclass(frozen=True)
class TileLayout:
    """What the image processor made of one stored image."""

    size: tuple[int, int]  # stored (width, height)
    canvas: tuple[int, int]  # tiles (rows, cols)
    resized: tuple[int, int]  # the image on the canvas (height, width), before padding
    aspect_ratio_id: int


class _CrossLM(torch.nn.Module):
    """``MllamaForConditionalGeneration`` called with the vision tokens and cross-attention mask of the
    sequence the adapter last embedded."""

    def __init__(self, model: torch.nn.Module, adapter: MllamaAdapter):
        super().__init__()
        self.model = model
        self._adapter = [adapter]  # a list: not a registered submodule

    @property
    def config(self) -> Any:
        return self.model.config

    def get_input_embeddings(self) -> Any:
        model: Any = self.model
        return model.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> Any:
        adapter = self._adapter[0]
        cache = cache if cache is not None else past_key_values
        model: Any = self.model
        start = int(cache.get_seq_length()) if cache is not None else 0
        b, n = inputs_embeds.shape[:2]
        if adapter.cross_states is None or adapter.cross_mask is None:
            raise ProbeInputError("Llama 3.2 Vision: embed the sequence with its image features first")
        mask = adapter.cross_mask[:, start:start + n]
        if mask.shape[1] < n:  # generated tokens read the image as the last token of the sequence does
            mask = torch.cat([mask, adapter.cross_mask[:, -1:].expand(-1, n - mask.shape[1], -1, -1)], 1)
        kwargs["cross_attention_mask"] = mask.expand(b, -1, -1, -1)
        if start == 0:  # later calls read the vision keys from the cache
            states = adapter.cross_states
            kwargs["cross_attention_states"] = states.expand(b, -1, -1) if states.shape[0] == 1 else states
        import inspect

        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        return model(inputs_embeds=inputs_embeds, **{keyword: cache}, **kwargs)


class MllamaAdapter(FusionAdapter):
    architecture = "mllama"
    hf_class = "MllamaForConditionalGeneration"
    model_types = ("mllama",)
    family = "Llama 3.2 Vision"
    patch_aligned = False
    vision_trace = None
    cross_states: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None
    _layouts: list[TileLayout] | None = None
    _aspect: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        self.setup(model, processor, device)
        cfg: Any = model.config
        tc = cfg.text_config
        self.cross_attention_layers = tuple(int(i) for i in tc.cross_attention_layers)
        self.self_attention_layers = tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers)
        self.max_tiles = int(cfg.vision_config.max_num_tiles)
        self.image_token_string = getattr(processor, "image_token", None) or "<|image|>"
        ip = processor.image_processor
        tile = int((getattr(ip, "size", None) or {}).get("height", self.image_size))
        if tile != self.image_size:
            raise UnsupportedModelError(f"{self.family}: the image processor's tiles are {tile} px but the vision "
                                        f"encoder reads {self.image_size} px")
        self._lm = _CrossLM(model, self)

    @property
    def hf_model(self) -> Any:
        """The transformers model, untyped (transformers' modules are not annotated)."""
        return self.model

    @property
    def causal_lm(self) -> torch.nn.Module:
        return self._lm

    # --- layout ------------------------------------------------------------------------------

    def _image_processor_call(self, images: Sequence[Image.Image]) -> Any:
        ip: Any = self.processor
        return ip.image_processor([[im.convert("RGB")] for im in images], return_tensors="pt")

    def _layout(self, size: tuple[int, int], aspect_ratio_id: int) -> TileLayout:
        from transformers.models.mllama import image_processing_pil_mllama as mp

        ip: Any = self.processor
        w, h = size
        max_tiles = int(ip.image_processor.max_image_tiles)
        ch, cw = mp.get_optimal_tiled_canvas(image_height=h, image_width=w, max_image_tiles=max_tiles,
                                             tile_size=self.image_size)
        rh, rw = mp.get_image_size_fit_to_canvas(image_height=h, image_width=w, canvas_height=ch, canvas_width=cw,
                                                 tile_size=self.image_size)
        return TileLayout(size=size, canvas=(ch // self.image_size, cw // self.image_size), resized=(rh, rw),
                          aspect_ratio_id=aspect_ratio_id)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 1, tiles, 3, S, S]``, carrying the aspect-ratio ids and masks the vision encoder needs."""
        processed = self._image_processor_call(images)
        ids = processed["aspect_ratio_ids"]
        self._layouts = [self._layout(im.size, int(ids[i, 0])) for i, im in enumerate(images)]
        pixel_values = processed["pixel_values"].to(self.device, dtype=self.model.dtype)
        pixel_values.loupe_layouts = tuple(self._layouts)
        self._aspect = (ids.to(self.device), processed["aspect_ratio_mask"].to(self.device))
        pixel_values.loupe_aspect = self._aspect
        return pixel_values

    def current_layout(self, pixel_values: torch.Tensor | None = None) -> TileLayout:
        layouts = getattr(pixel_values, "loupe_layouts", None) or self._layouts
        if not layouts:
            raise ProbeInputError(f"{self.family}: preprocess the image before encoding the prompt")
        if any(lay != layouts[0] for lay in layouts):
            raise ProbeInputError(f"{self.family}: images of different sizes make different tilings; run them one "
                                  "at a time (batch size 1)")
        return layouts[0]

    def vision_token_boxes(self, layout: TileLayout) -> torch.Tensor:
        """``[max_tiles * (1 + g*g), 4]`` box ``(x0, y0, x1, y1)`` in stored-image pixels of every vision
        token, in the encoder's order (tile by tile, row-major; CLS first, then patches row-major)."""
        w, h = layout.size
        rows, cols = layout.canvas
        rh, rw = layout.resized
        s, p = self.image_size, self.patch_size
        g = s // p
        sx, sy = w / rw, h / rh  # canvas pixels -> stored pixels (the image sits top-left, padding after)
        boxes = []
        for t in range(self.max_tiles):
            if t >= rows * cols:  # a padding tile (masked out of cross-attention): the whole image
                boxes.extend([(0.0, 0.0, float(w), float(h))] * (1 + g * g))
                continue
            ty, tx = divmod(t, cols)
            x0, y0 = tx * s, ty * s
            boxes.append((x0 * sx, y0 * sy, (x0 + s) * sx, (y0 + s) * sy))  # the tile's CLS token
            for r in range(g):
                for c in range(g):
                    px, py = x0 + c * p, y0 + r * p
                    boxes.append((px * sx, py * sy, (px + p) * sx, (py + p) * sy))
        return torch.tensor(boxes, dtype=torch.float64)

    def vision_token_regions(self, layout: TileLayout) -> torch.Tensor:
        """``[V, G]``: each vision token's share of each region of ``grid`` (rows sum to 1)."""
        return overlap_matrix(self.vision_token_boxes(layout), layout.size, self.grid)

    def patch_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        return region_boxes(image_size, self.grid)

    # --- inputs --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> CrossEncoded:
        """The prompt through the processor's chat template where the directory has one (``chat_prompt``), else
        as ``MllamaProcessor`` writes a bare prompt (``<|image|>`` before the BOS token unless placed)."""
        from transformers.models.mllama.processing_mllama import build_string_from_input

        mark = self.image_token_string
        templated = self.chat_prompt(prompt, mark)
        text = templated if mark in templated else f"{mark}{prompt}"
        if text.count(mark) != 1:
            raise ProbeInputError(f"the prompt must contain exactly one {mark}, got {prompt!r}")
        tokenizer: Any = self.tokenizer
        if templated == prompt:  # the template, where there is one, places the BOS and the image itself
            text = build_string_from_input(text, tokenizer.bos_token, mark)
        input_ids = torch.tensor([tokenizer(text).input_ids], dtype=torch.long, device=self.device)
        regions = self.vision_token_regions(self.current_layout()).to(self.device)
        return CrossEncoded(input_ids=input_ids, image_positions=torch.zeros(0, dtype=torch.long, device=self.device),
                            cross_regions=regions)

    def prepare(self, images: Sequence[Image.Image], prompt: str) -> tuple[Encoded, torch.Tensor]:
        pixel_values = self.preprocess(images)  # first: the vision tokens' boxes follow the tiling
        enc = self.encode(prompt)
        with torch.no_grad():
            return enc, self.image_features(pixel_values)

    def cross_attention_mask(self, input_ids: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """``[1, N, 1, max_tiles]``: 1 where a token reads a (real) tile: from the image token on."""
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(positions) != 1:
            raise ProbeInputError(f"{self.family}: the sequence must hold exactly one {self.image_token_string}")
        mask = torch.zeros(1, input_ids.shape[1], 1, self.max_tiles, dtype=torch.long, device=input_ids.device)
        mask[:, int(positions[0]):, :, : layout.canvas[0] * layout.canvas[1]] = 1
        return mask

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, N, D]``; the vision tokens ``image_features`` ``[B, V, D]`` and the
        sequence's cross-attention mask are kept for the next language-model calls."""
        self.cross_states = image_features
        self.cross_mask = self.cross_attention_mask(input_ids[:1], self.current_layout())
        return self.hf_model.get_input_embeddings()(input_ids)

    # --- running -------------------------------------------------------------------------------

    @autocast_forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, V, D]`` vision tokens as the decoder's cross-attention reads them."""
        self.current_layout(pixel_values)
        # perturbed copies of the pixels (deletion/insertion, occlusion) do not carry the attribute: they are
        # copies of the image last preprocessed, whose tiling current_layout checked above
        aspect = getattr(pixel_values, "loupe_aspect", None) or self._aspect
        if aspect is None:
            raise ProbeInputError(f"{self.family}: preprocess the image before encoding it")
        ids, mask = aspect
        b = pixel_values.shape[0]
        if ids.shape[0] != b:
            # a slice of many copies of one image (deletion/insertion batches): they share its tiling
            if not (bool((ids == ids[:1]).all()) and bool((mask == mask[:1]).all())):
                raise ProbeInputError(f"{self.family}: {b} images but {ids.shape[0]} tilings; encode the images "
                                      "preprocessed together")
            ids, mask = ids[:1], mask[:1]
        model = self.hf_model.model
        out = model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=ids.expand(b, -1),
                                 aspect_ratio_mask=mask.expand(b, -1, -1))
        return model.multi_modal_projector(out.last_hidden_state).reshape(b, -1, model.hidden_size)

    def image_token_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        regions = self.vision_token_regions(self.current_layout(pixel_values)).to(self.device)
        return regions[None].expand(pixel_values.shape[0], -1, -1)

    def feature_swap_refusal(self, site: str) -> str | None:
        return (f"feature swap is not supported for {self.family}: the image is read by cross-attention from "
                "tiles of vision tokens (one CLS token per tile), not a single grid of image tokens whose cells "
                "could be swapped")

    def attention_statistics_refusal(self) -> str:
        return (f"attention statistics are not supported for {self.family}: they read the decoder's attention "
                "to image tokens in its sequence, and this model has none (the image is read by cross-attention "
                f"layers {list(self.cross_attention_layers)}); use token attribution (chefer), which follows "
                "relevance through those layers")

    def patch_relevance(self, method: str, rows_rel: torch.Tensor, image_positions: torch.Tensor,
                        attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        vision_rows: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(f"{self.family}: relevance through the vision encoder (chefer_full) is not "
                                    "supported; the cross-attention rule maps relevance to vision tokens")

    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        cfg: Any = self.model.config
        return {"decoder": (r"language_model\.layers\.(\d+)\.self_attn\.o_proj$", len(self.self_attention_layers),
                            self.num_heads),
                "cross": (r"language_model\.layers\.(\d+)\.cross_attn\.o_proj$", len(self.cross_attention_layers),
                          self.num_heads),
                "vision": (r"vision_model\.transformer\.layers\.(\d+)\.self_attn\.o_proj$",
                           int(cfg.vision_config.num_hidden_layers), self.vision_num_heads)}

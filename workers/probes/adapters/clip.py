"""Adapters for CLIP-family dual encoders: ``CLIPModel`` and ``SiglipModel``.

Both are ViT image towers plus transformer text towers whose pooled outputs are compared by a
(logit-scaled) cosine similarity. They differ in three places, which is all a subclass states:

- where the image embedding is read out: CLIP's CLS token (prefix of 1 token) versus SigLIP's
  multihead attention pooling ("MAP") head, a learned probe query attending over all patch
  tokens (no prefix token);
- the score: ``exp(logit_scale) * cos`` for CLIP, ``exp(logit_scale) * cos + logit_bias`` for
  SigLIP (a sigmoid logit);
- the text readout token: CLIP pools the first EOS token, SigLIP the last position (SigLIP was
  trained with prompts padded to the maximum length, so prompts are padded that way here too).

Attention probabilities are recorded with forward hooks on each layer's ``self_attn`` (with eager
attention the HF modules always return them) rather than ``output_attentions=True``, so that the
same code keeps working across transformers' output-recording refactors and so that gradients can
be retained exactly on the tensors the forward pass used.

Gradients: the model's parameters are frozen at load time. ``trace`` makes the hidden state
*entering* layer ``grad_from_layer`` a fresh leaf that requires grad; autograd then computes only
what the explanation needs (no parameter gradients, nothing below that layer), which is a large
part of why our Grad-CAM is faster than generic libraries that back-propagate into every weight.

Everything here runs through the model's own forward. The two calls a CLIP model answers faster
with code of its own live in ``clip_fast.py`` (``FastCLIPAdapter``, what ``load_adapter`` returns
for ``clip``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.probes.adapters.base import DualEncoderAdapter, HFModule, VisionTrace
from workers.probes.errors import ProbeInputError, UnsupportedModelError


@dataclass
class _Recording:
    """What the hooks captured during one forward pass of one tower."""

    attentions: list[torch.Tensor | None]
    hidden_states: list[torch.Tensor | None]
    pool_attention: torch.Tensor | None = None
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


def recorded(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """What the hooks recorded, every layer's; a ``None`` means the forward pass skipped a layer,
    which leaves nothing to explain there."""
    missing = [i for i, t in enumerate(tensors) if t is None]
    if missing:
        raise UnsupportedModelError(f"the forward pass did not run layers {missing}")
    return [t for t in tensors if t is not None]


def find_pooling_head(vision_model: torch.nn.Module,
                      encoder_layers: Sequence[torch.nn.Module]) -> torch.nn.MultiheadAttention | None:
    """The attention of the vision tower's attention-pooling head, or ``None``.

    An attention-pooling head is an attention step of learned queries over the encoder's final
    tokens, outside the encoder's own layers; in transformers (SigLIP's ``head``, and the heads
    other towers copied from it) it is a ``torch.nn.MultiheadAttention``. Two such modules would
    leave the readout ambiguous, which is refused rather than guessed."""
    inside = {id(m) for layer in encoder_layers for m in layer.modules()}
    found = [m for m in vision_model.modules() if isinstance(m, torch.nn.MultiheadAttention) and id(m) not in inside]
    if len(found) > 1:
        raise UnsupportedModelError(f"the vision tower has {len(found)} attention-pooling heads; Loupe explains "
                                    "an image embedding read out by one")
    return found[0] if found else None


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


class CLIPAdapter(DualEncoderAdapter):
    """``transformers.CLIPModel`` (and subclasses with the same layout)."""

    architecture = "clip"
    #: text towers trained with fixed-length padding (SigLIP) must be fed that way
    pad_to_max_length = False
    model: HFModule

    def __init__(self, model: HFModule, tokenizer: Any, image_processor: Any, *,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None, source: str = "",
                 revision: str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.source = source
        self.revision = revision

        vcfg = model.config.vision_config
        tcfg = model.config.text_config
        self.image_size = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        side = self.image_size // self.patch_size
        self.grid = (side, side)
        self.num_layers = int(vcfg.num_hidden_layers)
        self.num_heads = int(vcfg.num_attention_heads)
        self.text_num_layers = int(tcfg.num_hidden_layers)
        self.max_text_length = int(getattr(tcfg, "max_position_embeddings", 77))
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ architecture specifics
    num_prefix_tokens = 1

    @property
    def vision_layers(self) -> Sequence[HFModule]:
        return self.model.vision_model.encoder.layers

    @property
    def text_layers(self) -> Sequence[HFModule]:
        return self.model.text_model.encoder.layers

    @property
    def pooling_head_attention(self) -> torch.nn.MultiheadAttention | None:
        """The attention of an attention-pooling ("MAP") head, ``None`` when a CLS token is read out.

        Found by structure, not by name (``find_pooling_head``), so that a provider's variant with
        the head elsewhere, or a CLIP-layout tower that pools with one, is still read out through it."""
        if not hasattr(self, "_pooling_head"):
            self._pooling_head = find_pooling_head(self.model.vision_model, self.vision_layers)
        return self._pooling_head

    def _text_readout_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Index ``[P]`` of the token whose final state becomes the text embedding."""
        eos = self.model.text_model.eos_token_id
        if eos == 2:  # legacy CLIP configs: HF pools at the highest token id
            return input_ids.argmax(dim=-1)
        return (input_ids == eos).int().argmax(dim=-1)

    def _scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.logit_scale.exp(), None

    # ------------------------------------------------------------------ helpers
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise ProbeInputError("no images to preprocess")
        rgb = [im.convert("RGB") for im in images]
        out = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return out.to(self.device, torch.float32)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(input_ids [P, Tt], attention_mask [P, Tt])`` on the device."""
        if isinstance(prompts, str):
            raise ProbeInputError("prompts must be a list of strings, not one string")
        if not prompts:
            raise ProbeInputError("no prompts")
        enc = self.tokenizer(list(prompts), padding="max_length" if self.pad_to_max_length else True,
                             truncation=True, max_length=self.max_text_length, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        return ids, mask

    def _real_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[P, Tt]`` 1 for prompt tokens, 0 for padding. SigLIP tokenizers give no attention mask
        (the model was trained attending to its padding), so padding is recognised by its id."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None or "attention_mask" in getattr(self.tokenizer, "model_input_names", ["attention_mask"]):
            return mask
        return (ids != pad).to(mask.dtype)

    def text_tokens(self, prompts: Sequence[str]) -> list[list[str]]:
        """The tokens the text relevance refers to (padding included, relevance 0 there)."""
        ids, _ = self.tokenize(prompts)
        return [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (
                self.image_size, self.image_size):
            raise ProbeInputError(f"pixel_values must be [B, 3, {self.image_size}, {self.image_size}], "
                                  f"got {list(pixel_values.shape)}")
        return pixel_values.to(self.device)

    def pair_prompts(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """One prompt per image; a single prompt is broadcast to every image."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        b = pixel_values.shape[0]
        if len(prompts) == 1 and b > 1:
            prompts = prompts * b
        if len(prompts) != b:
            raise ProbeInputError(f"{b} images but {len(prompts)} prompts: pass one prompt per image "
                                  "(or a single prompt for all)")
        return prompts

    # ------------------------------------------------------------------ embeddings and scores
    def _encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def _encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model.get_image_features(pixel_values=pixel_values)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``[P, E]``; each distinct prompt is encoded once (and cached: text
        embeddings don't depend on the image, and methods ask for the same prompts again and again)."""
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                ids, mask = self.tokenize(missing)
                emb = self._encode_text(ids, mask)
            for p, e in zip(missing, emb, strict=True):
                self._text_cache[p] = e
            if len(self._text_cache) > 4096:  # bound memory on endless prompt streams
                self._text_cache = {p: self._text_cache[p] for p in prompts}
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._encode_image(self._check_pixels(pixel_values))

    def pair_score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings ``[B, E]`` x ``[B, E]`` -> paired scores ``[B]``."""
        scale, bias = self._scale_and_bias()
        s = (image_embeds * text_embeds.to(image_embeds.dtype)).sum(-1) * scale.float()
        return s if bias is None else s + bias.float()

    def score(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = self.pair_prompts(pixel_values, prompts)
        return self.pair_score(self.image_embeds(pixel_values), self.text_embeds(prompts))

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings ``[N, E]`` x ``[P, E]`` -> all-pairs scores ``[N, P]``."""
        scale, bias = self._scale_and_bias()
        s = image_embeds @ text_embeds.to(image_embeds.dtype).T * scale.float()
        return s if bias is None else s + bias.float()

    def score_matrix(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.similarity(self.image_embeds(pixel_values), self.text_embeds(list(prompts)))

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def _record(self, layers: Sequence[HFModule], *, grad_from_layer: int | None,
                pool_attention: torch.nn.MultiheadAttention | None = None,
                retain_grads: bool = True) -> Iterator[_Recording]:
        """Hooks that capture, for each layer, its input hidden state and its attention
        probabilities (and the last layer's output). With ``grad_from_layer`` set, the hidden
        state entering that layer becomes a leaf requiring grad and every captured tensor from
        there on retains its gradient."""
        n = len(layers)
        rec = _Recording(attentions=[None] * n, hidden_states=[None] * (n + 1))
        tracking = grad_from_layer is not None and torch.is_grad_enabled()

        def keep(t: torch.Tensor) -> torch.Tensor:
            if tracking and retain_grads and t.requires_grad:
                t.retain_grad()
            return t

        def pre_hook(i: int) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
            def fn(module: torch.nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
                h = _first_tensor(args, kwargs)
                if tracking and i == grad_from_layer:
                    h = h.detach().requires_grad_(True)
                    if args:
                        args = (h, *args[1:])
                    else:
                        kwargs = {**kwargs, "hidden_states": h}
                rec.hidden_states[i] = keep(h)
                return args, kwargs
            return fn

        def post_hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            rec.hidden_states[n] = keep(output[0] if isinstance(output, tuple) else output)

        def attn_hook(i: int) -> Callable[..., None]:
            def fn(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise UnsupportedModelError(
                        "the attention layers return no attention probabilities; load the model with "
                        "attn_implementation='eager'")
                rec.attentions[i] = keep(weights)
            return fn

        try:
            for i, layer in enumerate(layers):
                rec.handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                rec.handles.append(layer.self_attn.register_forward_hook(attn_hook(i)))
            rec.handles.append(layers[-1].register_forward_hook(post_hook))
            if pool_attention is not None:
                rec.handles.append(pool_attention.register_forward_hook(self._pool_hook(rec, keep)))
            yield rec
        finally:
            for h in rec.handles:
                h.remove()

    def _pool_hook(self, rec: _Recording,
                   keep: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """Recompute a ``torch.nn.MultiheadAttention`` pooling step with per-head probabilities.

        ``nn.MultiheadAttention`` only hands out head-averaged weights from a fused kernel; the
        relevance rules need each head's probabilities *with their gradient*, so the hook
        recomputes the same attention explicitly and returns that output in its place (the
        adapter tests check the score is unchanged)."""

        def fn(mha: torch.nn.MultiheadAttention, args: tuple[Any, ...],
               output: Any) -> tuple[torch.Tensor, torch.Tensor]:
            query, key, value = args[0], args[1], args[2]
            b, tq, e = query.shape
            t = key.shape[1]
            h = mha.num_heads
            d = e // h
            wq, wk, wv = mha.in_proj_weight.chunk(3)
            bq, bk, bv = mha.in_proj_bias.chunk(3)
            q = F.linear(query, wq, bq).view(b, tq, h, d).transpose(1, 2)
            k = F.linear(key, wk, bk).view(b, t, h, d).transpose(1, 2)
            v = F.linear(value, wv, bv).view(b, t, h, d).transpose(1, 2)
            if tq != 1:
                raise UnsupportedModelError(f"pooling head with {tq} queries; Loupe explains single-probe MAP heads")
            # [B, H, T]: the probe query's row; kept as the tensor the output is computed from, so
            # that its .grad is populated by the backward pass
            row = torch.softmax((q @ k.transpose(-1, -2))[:, :, 0, :] * d ** -0.5, dim=-1,
                                dtype=torch.float32).to(q.dtype)
            rec.pool_attention = keep(row)
            probs = row.unsqueeze(2)
            out = (probs @ v).transpose(1, 2).reshape(b, tq, e)
            out = mha.out_proj(out)
            return out, probs.mean(1)

        return fn

    # ------------------------------------------------------------------ traces
    def trace(self, pixel_values: torch.Tensor, prompts: Sequence[str], *, grad_from_layer: int = 0,
              text: bool = False, retain_grads: bool = True) -> VisionTrace:
        """Forward pass keeping attentions and hidden states (with gradients) of every vision
        layer. ``grad_from_layer``: gradients are tracked from the input of that layer on (layers
        below it get no ``.grad``; pick the lowest layer you need). ``text=True`` also traces
        the text tower (``text_attentions`` with gradients, ``text_input_ids``); otherwise the
        text embeddings are constants (faster). ``retain_grads=False`` skips populating ``.grad``
        on the recorded tensors, for callers that take ``torch.autograd.grad(score, tensors)``
        instead (which also lets autograd skip every path that doesn't lead to them).

        Call ``trace.score.sum().backward()`` once: scores of different pairs don't interact,
        so one backward pass yields every pair's gradients.
        """
        pixel_values = self._check_pixels(pixel_values)
        prompts = self.pair_prompts(pixel_values, prompts)
        if not 0 <= grad_from_layer < self.num_layers:
            raise ProbeInputError(f"layer {grad_from_layer} out of range 0..{self.num_layers - 1}")
        with torch.enable_grad():
            text_attn: list[torch.Tensor] = []
            ids: torch.Tensor | None = None
            text_readout: torch.Tensor | None = None
            text_mask: torch.Tensor | None = None
            if text:
                ids, mask = self.tokenize(prompts)
                with self._record(self.text_layers, grad_from_layer=0, retain_grads=retain_grads) as trec:
                    txt = self._encode_text(ids, mask)
                text_attn = recorded(trec.attentions)
                text_readout, text_mask = self._text_readout_index(ids, mask), self._real_tokens(ids, mask)
            else:
                txt = self.text_embeds(prompts)
            with self._record(self.vision_layers, grad_from_layer=grad_from_layer,
                              pool_attention=self.pooling_head_attention, retain_grads=retain_grads) as rec:
                img = self._encode_image(pixel_values)
            score = self.pair_score(img, txt)
        return VisionTrace(score=score, attentions=recorded(rec.attentions),
                           hidden_states=recorded(rec.hidden_states), text_attentions=text_attn,
                           text_input_ids=ids, pool_attention=rec.pool_attention, text_readout=text_readout,
                           text_attention_mask=text_mask)

    def readout_trace(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> VisionTrace:
        # Chefer's rule takes ``torch.autograd.grad`` of the attentions: no ``.grad`` to populate
        return self.trace(pixel_values, prompts, retain_grads=False)

    @torch.no_grad()
    def attentions(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Attention probabilities without gradients: ``([B, H, T, T] per layer, pool [B, H, T] | None)``.
        (Rollout and flow need no backward pass.)"""
        pixel_values = self._check_pixels(pixel_values)
        with self._record(self.vision_layers, grad_from_layer=None,
                          pool_attention=self.pooling_head_attention) as rec:
            self._encode_image(pixel_values)
        return recorded(rec.attentions), rec.pool_attention

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        pixel_values = self._check_pixels(pixel_values)
        for layer in layers:
            if not 0 <= layer <= self.num_layers:
                raise ProbeInputError(f"layer {layer} out of range 0..{self.num_layers}")
        with self._record(self.vision_layers, grad_from_layer=None) as rec:
            self._encode_image(pixel_values)
        hidden = recorded(rec.hidden_states)
        return {layer: hidden[layer] for layer in layers}

    def clear_caches(self) -> None:
        """Forget cached text embeddings (call after changing the weights, e.g. randomisation)."""
        self._text_cache.clear()

    def input_window(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region ``(x0, y0, x1, y1)`` of a stored ``(width, height)`` image that the model
        sees after the image processor's resize and centre crop (CLIP: shortest edge then crop;
        SigLIP: a plain resize, i.e. the whole image)."""
        width, height = size
        proc = self.image_processor
        target = dict(getattr(proc, "size", None) or {})
        if getattr(proc, "do_resize", True) and "shortest_edge" in target:
            scale = target["shortest_edge"] / min(width, height)
            new_w, new_h = width * scale, height * scale
        elif getattr(proc, "do_resize", True) and {"height", "width"} <= set(target):
            new_w, new_h = float(target["width"]), float(target["height"])
        else:
            new_w, new_h = float(width), float(height)
        crop = dict(getattr(proc, "crop_size", None) or {})
        if getattr(proc, "do_center_crop", False) and {"height", "width"} <= set(crop):
            left, top = (new_w - crop["width"]) / 2, (new_h - crop["height"]) / 2
            right, bottom = left + crop["width"], top + crop["height"]
        else:
            left, top, right, bottom = 0.0, 0.0, new_w, new_h
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, right * sx, bottom * sy

    def patch_boxes(self, size: tuple[int, int]) -> np.ndarray:
        """``[gh * gw, 4]`` boxes ``(x0, y0, x1, y1)`` of the patch grid cells in the pixel
        coordinates of a stored ``(width, height)`` image (row-major, like the maps)."""
        x0, y0, x1, y1 = self.input_window(size)
        gh, gw = self.grid
        xs, ys = np.linspace(x0, x1, gw + 1), np.linspace(y0, y1, gh + 1)
        return np.array([(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(gh) for c in range(gw)])

    def describe(self) -> dict:
        """Provenance for evidence records."""
        return {"architecture": self.architecture, "source": self.source, "revision": self.revision,
                "image_size": self.image_size, "patch_size": self.patch_size, "grid": list(self.grid),
                "layers": self.num_layers, "heads": self.num_heads, "device": str(self.device),
                "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype)}


class SiglipAdapter(CLIPAdapter):
    """``transformers.SiglipModel``: no CLS token; the image embedding is a MAP pooling head's
    output. Explanations read out relevance through that head's attention (``pool_attention``)."""

    architecture = "siglip"
    num_prefix_tokens = 0
    pad_to_max_length = True

    def __init__(self, model: HFModule, *args: Any, **kwargs: Any) -> None:
        if not getattr(model.config.vision_config, "vision_use_head", True):
            raise UnsupportedModelError("SigLIP vision tower without a pooling head (vision_use_head=False) "
                                        "produces no image embedding to explain")
        super().__init__(model, *args, **kwargs)
        if self.pooling_head_attention is None:
            raise UnsupportedModelError("SigLIP vision tower without an attention-pooling head: no image embedding "
                                        "to explain")

    def _text_readout_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)

    def _scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.logit_scale.exp(), self.model.logit_bias

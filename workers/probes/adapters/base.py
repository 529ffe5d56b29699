"""The one interface every probe method uses to talk to a model.

A new architecture is added by writing one subclass (see ``clip.py``) and listing it in
``adapters/__init__.py``'s ``ARCHITECTURES``. Methods never touch ``model.vision_model``
and friends directly.

Shapes: ``B`` images, ``P`` prompts, ``L`` vision layers, ``H`` heads,
``T = prefix + gh * gw`` vision tokens (``prefix`` is 1 for a CLS token, 0 for SigLIP),
``D`` hidden size, ``S`` the model's input image size.

Generative models (``FusionAdapter``, below the dual encoders):

The interface generative (fusion) VLMs expose to probes: LLaVA- and BLIP-2-style models.

A fusion model turns an image into ``n_img`` visual tokens that sit, together with the text
tokens, in ONE sequence processed by a causal language model. Probes for generated text
(token attribution, cross-modal attention statistics, interventions) need:

- how to build that sequence (``encode``) and where the image tokens are in it;
- the visual features at the language model's input (``image_features``), so that they can be
  edited (feature swap) before the language model runs;
- greedy generation (``generate``) and a teacher-forced forward that keeps every decoder layer's
  attention probabilities with their gradients (``trace``, ``trace_targets``), or both at once
  (``generate_traced``: the generation pass is the traced forward);
- the modules whose inputs are the per-head attention outputs (``head_projections``), for
  head ablation;
- the geometry linking image token ``j`` to a patch of the *stored* image (``patch_boxes``).

Two families differ in what an image token is. In LLaVA (``patch_aligned``) image token
``image_token_prefix + j`` *is* vision grid cell ``j``, so a relevance over image tokens is
reshaped to the grid. In BLIP-2 the image tokens are the Q-Former's learned queries, each a mix of
all patches: such adapters set ``patch_aligned = False`` and map image-token relevance to patches
themselves (``patch_relevance``, ``image_token_patches``), so the probes stay generic.

Shapes: ``N`` joint sequence length, ``L`` decoder layers, ``H`` decoder heads, ``n_img`` image
tokens, ``(gh, gw)`` the vision grid, ``D`` the language model's width.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image

from workers.probes.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import DynamicCache

#: A transformers model or module read by its config-defined submodules (``layer.self_attn.q_proj``,
#: ``model.vision_tower``): torch's stubs type any such attribute as ``Tensor | Module``, so adapters
#: type what they navigate this way as ``Any``.
HFModule = Any


def numbered_modules(model: torch.nn.Module, pattern: str) -> list[torch.nn.Module]:
    """Modules whose name matches ``pattern`` (group 1: the layer number), in layer order."""
    found: dict[int, torch.nn.Module] = {}
    rx = re.compile(pattern)
    for name, module in model.named_modules():
        m = rx.search(name)
        if m:
            found[int(m.group(1))] = module
    return [found[i] for i in sorted(found)]


@dataclass
class VisionTrace:
    """One forward pass through the vision tower with everything explanations need.

    ``attentions[l]`` is ``[B, H, T, T]`` and *retains its gradient* after
    ``score.sum().backward()`` (read ``attentions[l].grad``).
    ``hidden_states[l]`` is ``[B, T, D]`` for l = 0 (embeddings) .. L (last layer), also
    retaining gradients.

    A trace from ``readout_trace`` is leaner: no hidden states, nothing retains ``.grad`` (take
    ``torch.autograd.grad(score, attentions)``), and ``attentions[-1]`` may hold only the first
    ``q`` query rows ``[B, H, q, T]``, the only rows of the last layer that reach the score.
    """

    score: torch.Tensor  # [B] similarity of image b with prompt b (what is explained)
    attentions: list[torch.Tensor]
    hidden_states: list[torch.Tensor]
    text_attentions: list[torch.Tensor] = field(default_factory=list)  # [B, H, Tt, Tt] where available
    text_input_ids: torch.Tensor | None = None  # [B, Tt]
    #: [B, H, T] attention of a pooling head's query over the last layer's tokens (SigLIP's MAP
    #: head), with gradient; ``None`` when a CLS token (index 0) is the image readout.
    pool_attention: torch.Tensor | None = None
    text_readout: torch.Tensor | None = None  # [B] index of the token the text embedding is read from
    text_attention_mask: torch.Tensor | None = None  # [B, Tt] 1 for real tokens, 0 for padding


@dataclass
class WeightedAttentions:
    """Gradient-weighted, head-fused attention (``gradient_weighted_attentions``): ``layers[l]``
    ``[B, q, T]`` float32 for the layers asked for, in layer order (``q`` = T, or only the readout
    row for a last layer nothing else of reaches the score); ``pool`` ``[B, T]`` for a pooling
    head's query (SigLIP), else ``None``."""

    layers: list[torch.Tensor]
    pool: torch.Tensor | None = None


class VisionLanguageAdapter(ABC):
    """Common to dual encoders and fusion (generative) models."""

    #: "dual_encoder" or "fusion"
    kind: str = ""
    #: short architecture family name, e.g. "clip", "siglip", "llava"
    architecture: str = ""

    model: torch.nn.Module
    device: torch.device
    image_size: int  # S
    patch_size: int
    grid: tuple[int, int]  # (gh, gw)
    num_prefix_tokens: int  # tokens before the patch tokens in the vision sequence
    num_layers: int  # L
    num_heads: int  # H
    #: mixed precision for forward passes, requested at load time (``dtype``); None: float32
    autocast_dtype: torch.dtype | None = None
    #: pickled weight files found beside the safetensors weights at load time: never opened (``loading.load``)
    ignored_weights: tuple[str, ...] = ()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for every forward pass when a ``dtype`` was requested at load time."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel values ``[B, 3, S, S]`` on ``self.device``."""

    def clear_caches(self) -> None:  # noqa: B027 - optional hook: adapters without caches keep it empty
        """Forget whatever was computed from the current weights (call after changing them, e.g.
        randomisation or ablation); an adapter that caches nothing has nothing to forget."""

    @contextlib.contextmanager
    def fused_attention(self) -> Iterator[None]:
        """Run the forward passes inside with PyTorch's fused scaled-dot-product attention.

        Models are loaded with eager attention because the explanation methods read attention
        probabilities, which fused kernels never materialise. Methods that only need scores
        (occlusion's thousands of occluded copies) don't, and the fused kernel skips the
        ``[B, H, T, T]`` softmax and its two batched matmuls. Eager attention is restored on exit, even after an
        error; an architecture without an SDPA path simply stays eager.
        """
        model = getattr(self, "model", None)
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        setter = getattr(model, "set_attn_implementation", None)
        switched = False
        if current == "eager" and callable(setter):
            try:
                setter("sdpa")
                switched = True
            except (ValueError, ImportError, NotImplementedError):
                switched = False
        try:
            yield
        finally:
            if switched and setter is not None:
                setter(current)


def occlude(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, baseline: float) -> torch.Tensor:
    """``[n, 3, S, S]``: ``images[image_index]`` with each copy's box ``(top, bottom, left, right)``
    (ends exclusive, ``[n, 4]``) set to ``baseline``; one pass over the copies."""
    ys = torch.arange(images.shape[-2], device=images.device)
    xs = torch.arange(images.shape[-1], device=images.device)
    top, bottom, left, right = boxes.unbind(1)
    rows = (ys >= top[:, None]) & (ys < bottom[:, None])  # [n, S]
    cols = (xs >= left[:, None]) & (xs < right[:, None])
    return torch.where((rows[:, :, None] & cols[:, None, :]).unsqueeze(1), baseline, images[image_index])


class DualEncoderAdapter(VisionLanguageAdapter):
    """CLIP-like models: an image encoder and a text encoder scored by similarity."""

    kind = "dual_encoder"
    #: the transformers tokenizer of the text tower
    tokenizer: Any

    @abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(input_ids [P, Tt], attention_mask [P, Tt])`` on the device."""

    @abstractmethod
    def pair_prompts(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """One prompt per image ``[B]``; a single prompt is broadcast to every image."""

    @abstractmethod
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> L2-normalised image embeddings ``[B, E]``."""

    @abstractmethod
    def pair_score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings ``[B, E]`` x ``[B, E]`` -> paired scores ``[B]`` (as ``score``)."""

    @abstractmethod
    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings ``[N, E]`` x ``[P, E]`` -> all-pairs scores ``[N, P]``."""

    @abstractmethod
    def attentions(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Attention probabilities without gradients: ``([B, H, T, T] per layer, pool [B, H, T] or
        None)``, for rules that need no backward pass (rollout, flow)."""

    @abstractmethod
    def input_window(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region ``(x0, y0, x1, y1)`` of a stored ``(width, height)`` image that the model sees
        after the image processor's resize and crop."""

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` vision tokens -> ``[B, gh, gw, ...]`` patch tokens on the grid."""
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.reshape(patches.shape[0], *self.grid, *patches.shape[2:])

    @abstractmethod
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """``P`` prompts -> L2-normalised text embeddings ``[P, E]``."""

    def image_embeds_for_scoring(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_embeds`` for forwards that only need the score (no gradients, no attention
        probabilities, no hidden states); an architecture may skip work the embedding never reads."""
        return self.image_embeds(pixel_values)

    def occluded_embeds_for_scoring(self, images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                                    baseline: float) -> torch.Tensor:
        """Scoring embeddings ``[n, E]`` of ``n`` occluded copies: copy ``i`` is
        ``images[image_index[i]]`` (``images`` ``[U, 3, S, S]``) with the pixel box ``boxes[i]`` =
        ``(top, bottom, left, right)`` (ends exclusive) set to ``baseline`` in every channel.
        An architecture may reuse what the copies share with their unoccluded image."""
        return self.image_embeds_for_scoring(occlude(images, image_index, boxes, baseline))

    @abstractmethod
    def score(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Paired score ``[B]``: image b with prompt b (``len(prompts) == B``), logit-scaled."""

    @abstractmethod
    def score_matrix(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """All pairs ``[B, P]`` (zero-shot classification uses this)."""

    @abstractmethod
    def trace(self, pixel_values: torch.Tensor, prompts: Sequence[str], *, grad_from_layer: int = 0,
              text: bool = False, retain_grads: bool = True) -> VisionTrace:
        """Forward with eager attention, keeping attention probabilities and hidden states
        (with gradients) for every vision layer: from the input of layer ``grad_from_layer`` on;
        ``text`` traces the text tower too; ``retain_grads=False`` leaves ``.grad`` unpopulated."""

    def readout_trace(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> VisionTrace:
        """``trace`` for rules that need only the score and the attention probabilities with their
        gradients (see ``VisionTrace``); an architecture may skip what cannot reach the score."""
        return self.trace(pixel_values, prompts)

    def gradient_weighted_attentions(self, pixel_values: torch.Tensor, prompts: Sequence[str], *,
                                     start_layer: int = 0) -> WeightedAttentions:
        """Chefer's ``mean_heads((dS/dA * A)+)`` for the vision layers from ``start_layer`` up and
        the pooling head, from one forward and one backward pass for the batch. Here through
        ``readout_trace`` and autograd; an architecture may fuse the weighting into its attention."""
        from workers.probes.chefer import weighted_attention

        trace = self.readout_trace(pixel_values, prompts)
        vision = list(trace.attentions[start_layer:])
        pooled = [trace.pool_attention] if trace.pool_attention is not None else []
        # Gradients of exactly these attention maps: autograd skips what doesn't lead to them (the
        # first layer's projections, layer norms, patch embedding).
        grads = torch.autograd.grad(trace.score.sum(), vision + pooled)
        # grads ends with the pooling head's gradient, which zip leaves out of the layers
        return WeightedAttentions(layers=[weighted_attention(a, g) for a, g in zip(vision, grads, strict=False)],
                                  pool=weighted_attention(pooled[0], grads[-1]) if pooled else None)

    @abstractmethod
    def vision_features(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states ``{layer: [B, T, D]}`` after the given vision layers (0 = embeddings)."""

# --------------------------------------------------------------------------------------------------
# Generative (fusion) models
# --------------------------------------------------------------------------------------------------


T = TypeVar("T")


@dataclass
class Encoded:
    """One prompt with its image placeholder expanded: ``input_ids`` is ``[1, N]``."""

    input_ids: torch.Tensor
    image_positions: torch.Tensor  # [n_img] indices into the sequence, in image-token order


@dataclass
class DecoderTrace:
    """A teacher-forced forward over the joint sequence.

    ``attentions[l]`` is ``[B, H, N, N]``, in the autograd graph (pass the list to
    ``torch.autograd.grad`` for their gradients); ``logits`` is ``[B, N, V]``.
    """

    logits: torch.Tensor
    attentions: list[torch.Tensor]
    input_ids: torch.Tensor
    image_positions: torch.Tensor


@dataclass
class TargetTrace:
    """A teacher-forced forward split at the first explained row ``P`` (``trace_targets``).

    ``prefix_attentions[l]`` ``[B, H, P, P]`` (rows ``0..P-1``), ``target_attentions[l]``
    ``[B, H, T, N]`` (rows ``P..N-1``, the ``T`` rows whose outputs are explained) and
    ``logits`` ``[B, T, V]`` of those rows. Row for row the same numbers as ``DecoderTrace``.
    """

    prefix_attentions: list[torch.Tensor]
    target_attentions: list[torch.Tensor]
    logits: torch.Tensor


def autocast_forward(method: Callable[..., T]) -> Callable[..., T]:
    """Run an adapter method's forward passes under the adapter's autocast (``dtype`` at load time)."""

    @functools.wraps(method)
    def wrapper(self: VisionLanguageAdapter, *args: Any, **kwargs: Any) -> T:
        with self.autocast():
            return method(self, *args, **kwargs)

    return wrapper


def square_side(value: int | Sequence[int], what: str) -> int:
    """The side of a square vision input or patch, written as one number or as ``(height, width)``
    (InternViT's config); a non-square one is refused, as the probes' grid is square."""
    if isinstance(value, int):
        return value
    sides = {int(v) for v in value}
    if len(sides) != 1:
        raise UnsupportedModelError(f"a vision tower with a non-square {what} {tuple(value)} is not supported")
    return sides.pop()


class FusionAdapter(VisionLanguageAdapter):
    """Generative VLMs (a vision encoder feeding a causal language model)."""

    kind = "fusion"

    #: ``vision_trace(pixel_values)``: image features computed with the vision path's attentions kept (with
    #: gradients): ``(features [B, n_img, D], attentions per vision layer, vision_rows [Tv])``. A method in
    #: adapters that carry relevance through the vision tower; None where they don't (``chefer_full`` is then
    #: not offered).
    vision_trace: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]] | None = None

    #: image tokens in the joint sequence that map to vision grid cells; ``image_token_prefix``
    #: of them come first and have no cell (e.g. a CLS token kept by LLaVA's "full" strategy).
    image_token_prefix: int = 0
    #: image token ``image_token_prefix + j`` is vision grid cell ``j`` (LLaVA); False when image tokens
    #: are learned queries over the whole image (BLIP-2's Q-Former).
    patch_aligned: bool = True
    #: leading vision-sequence tokens without a grid cell (a CLS token).
    num_prefix_tokens: int = 1
    #: the transformers class that loads the checkpoint, the ``model_type`` values it accepts, a display name
    hf_class: str = ""
    model_types: tuple[str, ...] = ()
    family: str = ""
    #: transformers tokenizer and processor (image processor + tokenizer) of the model directory
    tokenizer: Any
    processor: Any
    model: HFModule
    device: torch.device
    image_token_id: int
    eos_token_id: int

    @abstractmethod
    def encode(self, prompt: str) -> Encoded:
        """Token ids for ``prompt`` with the image placeholder expanded (one image)."""

    @abstractmethod
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> visual features at the language model's input ``[B, n_img, D]``."""

    def scoring_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_features`` computed for scoring many perturbed copies: the same values, but an
        adapter may skip vision layers whose output the features never read (LLaVA's features come
        from an inner tower layer, and the stock forward still runs the layers above it)."""
        return self.image_features(pixel_values)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Joint input embeddings ``[B, N, D]``: token embeddings with the image tokens replaced
        by ``image_features`` (``[B, n_img, D]``, one image per row)."""
        emb = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id)
        if int(mask.sum()) != image_features.shape[0] * image_features.shape[1]:
            raise ValueError("image features do not match the image tokens")
        return emb.masked_scatter(mask[..., None], image_features.to(emb.dtype))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, S, S]`` pixel values from the directory's own image processor."""
        rgb = [im.convert("RGB") for im in images]
        pv = self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]
        return pv.to(self.device, dtype=self.model.dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> FusionAdapter:
        """Load a local model directory (``load_generative``). Weights stay float32; ``dtype``
        ("bf16", or "fp16" on CUDA) runs the forward passes under autocast, as for dual encoders,
        while relevance is accumulated in float32 (it sums gradients over many heads and tokens)."""
        from workers.probes.adapters.loading import resolve_dtype

        autocast_dtype = resolve_dtype(dtype, torch.device(device))
        from workers.probes.adapters.loading import load_generative

        model, processor = load_generative(path, cls.hf_class, cls.model_types, cls.family)
        adapter = cls(model.to(device), processor, device)  # type: ignore[call-arg]
        adapter.autocast_dtype = autocast_dtype
        return adapter

    def setup(self, model: HFModule, processor: Any, device: str | torch.device) -> None:
        """The attributes every fusion adapter reads from a transformers model with ``vision_config``,
        ``text_config`` and ``image_token_id`` and its processor (image processor + tokenizer)."""
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise UnsupportedModelError("the model directory has no processor (image processor + tokenizer)")
        cfg = model.config
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        vc, tc = cfg.vision_config, cfg.text_config
        self.image_size = square_side(vc.image_size, "image size")
        self.patch_size = square_side(vc.patch_size, "patch size")
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.num_layers = int(tc.num_hidden_layers)
        self.num_heads = int(tc.num_attention_heads)
        self.vision_num_layers = int(vc.num_hidden_layers)
        self.vision_num_heads = int(vc.num_attention_heads)
        self.image_token_id = int(cfg.image_token_id)
        self.eos_token_id = self.tokenizer.eos_token_id

    def chat_prompt(self, prompt: str, image_mark: str) -> str:
        """``prompt`` as the directory's chat template writes one user turn holding the image and the prompt,
        with the assistant's turn opened (what an instruction-tuned checkpoint was trained to read); unchanged
        when there is no template, or when the prompt already places the image (``image_mark``): then it is
        taken as written. The template's leading BOS is dropped when the tokenizer adds one itself, so that
        encoding does not double it."""
        processor: Any = self.processor
        tokenizer: Any = self.tokenizer
        template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if not template or image_mark in prompt:
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            text = str(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                     tokenize=False))
        except Exception as exc:  # jinja2 raises its own TemplateError (and others) from the provider's template
            raise UnsupportedModelError(f"{self.family}: the directory's chat template cannot render a prompt with "
                                        f"an image ({exc})") from None
        if text.count(image_mark) != 1:
            raise UnsupportedModelError(f"{self.family}: the chat template writes {text.count(image_mark)} image "
                                        f"placeholders ({image_mark}) for one image")
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    @property
    def causal_lm(self) -> HFModule:
        """The module that maps joint input embeddings to next-token logits, with ``generate`` and a
        KV cache: the VLM itself where it accepts ``inputs_embeds`` alone (LLaVA)."""
        return self.model

    @autocast_forward
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy continuation of each row of ``inputs_embeds`` ``[B, N, D]`` (rows of one length, i.e.
        one prompt: no padding), without the end-of-sequence token; the image placeholder token is
        never generated.

        Plain argmax decoding, written out rather than ``transformers``' ``generate`` so that
        ``generate_traced`` runs exactly the same steps (a checkpoint's ``generation_config.json``,
        e.g. a repetition penalty, would otherwise change one path and not the other); the tests
        check it against ``generate(do_sample=False)``.
        """
        with torch.no_grad():
            return self._greedy(inputs_embeds, max_new_tokens, trace=False)[0]

    def _greedy(self, inputs_embeds: torch.Tensor, max_new_tokens: int, *,
                trace: bool) -> tuple[list[list[int]], Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Decode in two phases: the rows before the last input row (one call, traced with attention
        probabilities when ``trace``), then one step per token from the last input row on (no grad).

        Returns ``(generated ids per row, the first call's output (a transformers ``ModelOutput``), its
        keys and values per layer)``.
        """
        if inputs_embeds.shape[1] < 2:
            raise ValueError("generation needs at least two input positions (image and prompt)")
        lm = self.causal_lm
        embed_tokens = lm.get_input_embeddings()
        # Any: DynamicCache types its layers as a union of layer kinds; a DynamicCache's have keys and values
        cache: Any = self._new_cache()
        prefix = lm(inputs_embeds=inputs_embeds[:, :-1], logits_to_keep=1, use_cache=True, output_attentions=trace,
                    return_dict=True, **{self._cache_keyword: cache})
        # The steps below append to the cache outside autograd: keep the traced keys and values.
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers] if trace else []
        rows: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
        done = [False] * len(rows)
        x = inputs_embeds[:, -1:]
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = lm(inputs_embeds=x, logits_to_keep=1, use_cache=True, return_dict=True,
                            **{self._cache_keyword: cache}).logits[:, -1].float()
                logits[:, self.image_token_id] = -torch.inf
                tokens = logits.argmax(-1)
                for b, token in enumerate(tokens.tolist()):
                    if not done[b]:
                        done[b] = token == self.eos_token_id
                        if not done[b]:
                            rows[b].append(token)
                if all(done):
                    break
                x = embed_tokens(tokens[:, None]).to(inputs_embeds.dtype)
        return rows, prefix, prefix_kv

    def _new_cache(self, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(key_values, config=self.causal_lm.config.get_text_config())

    @autocast_forward
    def generate_traced(self, inputs_embeds: torch.Tensor,
                        max_new_tokens: int = 32) -> tuple[list[int], TargetTrace | None]:
        """``generate`` for one sequence ``[1, N, D]`` whose pass over the image and prompt doubles as the
        traced forward of ``trace_targets(inputs_embeds + generated, N - 1)``: returns the generated ids
        and that ``TargetTrace`` (None when nothing was generated), row for row the same numbers.

        Why: attributing generated text needs the caption first, and the generation pass already
        runs the decoder over the ~150-position prefix that dominates the cost. Run with gradients
        and attention probabilities, that pass is the prefix half of the trace; only the T explained
        rows are run again, in one call over the traced keys and values, so that one batched backward
        pass covers them.
        """
        with torch.enable_grad():
            rows, prefix, prefix_kv = self._greedy(inputs_embeds, max_new_tokens, trace=True)
            generated = rows[0]
            if not generated:
                return [], None
            ids = torch.tensor([generated[:-1]], dtype=torch.long, device=inputs_embeds.device)
            embedded = self.causal_lm.get_input_embeddings()(ids).to(inputs_embeds.dtype)
            explained = torch.cat([inputs_embeds[:, -1:], embedded], 1)
            rest = self.causal_lm(inputs_embeds=explained, use_cache=True, output_attentions=True, return_dict=True,
                                  **{self._cache_keyword: self._new_cache(prefix_kv)})
        return generated, self._target_trace(prefix, rest)

    @autocast_forward
    def trace(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_positions: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> DecoderTrace:
        """Teacher-forced forward with eager attention, keeping every decoder layer's attention
        probabilities with gradients."""
        out = self.causal_lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_attentions=True,
                             use_cache=False, return_dict=True)
        attentions = self._attention_probabilities(out.attentions, self.num_layers)
        return DecoderTrace(logits=out.logits, attentions=attentions, input_ids=input_ids,
                            image_positions=image_positions)

    @autocast_forward
    def trace_targets(self, inputs_embeds: torch.Tensor, first_row: int) -> TargetTrace:
        """``trace`` of one unpadded sequence ``[1, N, D]`` in two calls that share a KV cache: the rows
        before ``first_row`` (image and prompt), then the explained rows from ``first_row`` on.

        Why: only the explained rows' outputs are differentiated. In one call the top layer's
        attention and MLP over the whole prefix would sit in the autograd graph and be
        back-propagated (with zeros) once per explained token; split, the backward pass reaches the
        prefix only through the cached keys and values, which is ~1/3 less work on a 3-layer decoder.
        """
        lm = self.causal_lm
        common = {"use_cache": True, "output_attentions": True, "return_dict": True,
                  self._cache_keyword: self._new_cache()}
        prefix = lm(inputs_embeds=inputs_embeds[:, :first_row], logits_to_keep=1, **common)
        rest = lm(inputs_embeds=inputs_embeds[:, first_row:], **common)
        return self._target_trace(prefix, rest)

    def _target_trace(self, prefix: Any, rest: Any) -> TargetTrace:
        """A ``TargetTrace`` from the outputs (transformers ``ModelOutput``) of the prefix call and of
        the explained rows' call."""
        return TargetTrace(prefix_attentions=self._attention_probabilities(prefix.attentions, self.num_layers),
                           target_attentions=self._attention_probabilities(rest.attentions, self.num_layers),
                           logits=rest.logits)

    @functools.cached_property
    def _cache_keyword(self) -> str:
        # transformers 5.x renamed the keyword `past_key_values` to `cache` (the old name still works
        # there, with a deprecation warning); pass whichever this version's forward declares.
        return "cache" if "cache" in inspect.signature(self.causal_lm.forward).parameters else "past_key_values"

    @staticmethod
    def _attention_probabilities(attentions: Sequence[torch.Tensor | None] | None, expected: int) -> list[torch.Tensor]:
        found = [a for a in attentions or [] if a is not None]
        if len(found) != expected or len(attentions or []) != expected:
            raise UnsupportedModelError("the language model did not return attention probabilities (eager attention)")
        return found

    @abstractmethod
    def head_modules(self) -> dict[str, tuple[str, int, int]]:
        """``{component: (name pattern, layers, heads per layer)}`` of the components whose heads can
        be ablated: the pattern matches, with the layer number as group 1, the linear module whose
        input is the concatenation of the heads' outputs (``o_proj``)."""

    @property
    def components(self) -> tuple[str, ...]:
        """The components whose attention heads can be ablated ("decoder", "vision", ...)."""
        return tuple(self.head_modules())

    def head_projections(self, component: str = "decoder") -> list[torch.nn.Module]:
        """Per layer, the output projection of ``component``'s attention (see ``head_modules``)."""
        table = self.head_modules()
        if component not in table:
            raise ValueError(f"unknown component {component!r}")
        pattern, layers, _ = table[component]
        mods = numbered_modules(self.model, pattern)
        if len(mods) != layers:
            raise UnsupportedModelError(f"cannot find the {component} attention output projections")
        return mods

    def heads(self, component: str = "decoder") -> int:
        """Number of attention heads per layer of ``component``."""
        return self.head_modules()[component][2]

    def patch_boxes(self, image_size: tuple[int, int]) -> np.ndarray:
        """``[gh * gw, 4]`` pixel boxes ``(x0, y0, x1, y1)`` of each vision grid cell in a stored
        image of size ``(width, height)``, undoing the image processor's resize (shortest edge or
        fixed height x width) and centre crop."""
        w, h = image_size
        processor = self.processor.image_processor
        size = getattr(processor, "size", None) or {}
        if size.get("shortest_edge"):
            sx = sy = size["shortest_edge"] / min(w, h)
        else:  # resized to a fixed height x width
            sx, sy = (size.get("width") or self.image_size) / w, (size.get("height") or self.image_size) / h
        crop = getattr(processor, "crop_size", None) or {}
        if getattr(processor, "do_center_crop", False) and crop:
            left, top = (w * sx - crop["width"]) / 2, (h * sy - crop["height"]) / 2
        else:
            left = top = 0.0
        gh, gw = self.grid
        p = self.patch_size
        boxes = np.zeros((gh * gw, 4), dtype=np.float64)
        for r in range(gh):
            for c in range(gw):
                x0, y0 = (left + c * p) / sx, (top + r * p) / sy
                boxes[r * gw + c] = (x0, y0, x0 + p / sx, y0 + p / sy)
        return boxes

    @autocast_forward
    def language_logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N, V]`` of the language model over joint input embeddings ``[B, N, D]``."""
        return self.causal_lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits

    def patch_relevance(self, method: str, rows_rel: torch.Tensor, image_positions: torch.Tensor,
                        attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        vision_rows: torch.Tensor) -> torch.Tensor:
        """Relevance ``[T, gh * gw]`` over the grid's patches from relevance rows ``[T, N]`` over the
        joint sequence, using what ``vision_trace`` kept (``attentions[l]`` ``[1, H, Tq, Tk]`` and
        their per-target gradients ``grads[l]`` ``[T, H, Tq, Tk]``; ``vision_rows`` as it returned).

        Patch-aligned models: ``chefer_full`` carries the image-token relevance back through the vision
        tower (Chefer's self-attention rule); other methods read the image-token columns as cells.
        """
        if method == "chefer_full":
            from workers.probes.chefer import vision_relevance

            return vision_relevance(rows_rel, image_positions, attentions, grads, vision_rows, self.num_prefix_tokens)
        return rows_rel[:, image_positions[self.image_token_prefix:]].clamp(min=0)

    def image_token_patches(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """``[B, n_img, gh * gw]``: how much of each image token comes from each patch, for
        attention baselines; None where image tokens are grid cells (``patch_aligned``)."""
        return None

    def image_features_and_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image_features, image_token_patches)`` of the same images, from one pass through the
        image path where the adapter can (BLIP-2: both come out of the traced Q-Former)."""
        with torch.no_grad():
            return self.image_features(pixel_values), self.image_token_patches(pixel_values)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

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

"""The one interface every probe method uses to talk to a model.

A new architecture is added by writing one subclass (see ``clip.py``) and listing it in
``adapters/__init__.py``'s ``ARCHITECTURES``. Methods never touch ``model.vision_model``
and friends directly.

Shapes: ``B`` images, ``P`` prompts, ``L`` vision layers, ``H`` heads,
``T = prefix + gh * gw`` vision tokens (``prefix`` is 1 for a CLS token, 0 for SigLIP),
``D`` hidden size, ``S`` the model's input image size.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

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

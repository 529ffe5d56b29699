"""CLIP's fast paths: the two calls ``FastCLIPAdapter`` answers with code of its own.

``CLIPAdapter`` (``clip.py``) answers every call through the model's own forward. Two calls a
probe makes thousands of times compute far more than their result reads:

- ``image_embeds_for_scoring`` (occlusion's copies, the scoring forwards): the embedding reads the
  CLS token's final state alone, yet the model's last layer computes every token's query,
  attention row, output projection and MLP;
- ``readout_trace`` (Chefer's rule): only the CLS query's row of the last layer reaches the score,
  and the backward pass carries zeros back through every other row.

Here the last layer runs for the CLS token alone, and the layers below with one stacked
query/key/value product and QuickGELU folded into one SiLU (``scoring_layer``, ``traced_layer``).
Exact up to float rounding. A fast path is kept only where ``benchmarks/clip_fast_paths.py``
measures at least 1.2x on one of its models and no loss on the others (``benchmarks/README.md``);
a path that does not pay is deleted rather than switched off.

Each path checks itself once per adapter against the model's own forward and falls back to it for
good if they disagree (a subclass with another layer layout, say); ``describe()["fast_paths"]``
records which were used, so the evidence says which code computed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import QuickGELUActivation

from workers.probes.adapters.base import HFModule, VisionTrace
from workers.probes.adapters.clip import CLIPAdapter, recorded

#: fast path -> the attribute holding its state: None (not checked yet), True (in use), False (off)
FAST_PATHS = {"cls_readout": "_cls_readout_ok", "readout_trace": "_readout_trace_ok"}


def softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities ``[B, H, n, T]`` from queries ``[B, H, n, D/H]`` and keys
    ``[B, H, T, D/H]``; softmax in float32 as the models' eager attention does. The scale is
    applied to the queries, not to the larger ``[B, H, n, T]`` scores."""
    return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1, dtype=torch.float32).to(q.dtype)


def _qkv(layer: HFModule, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., 3D]``: the layer's queries, keys and values in one matrix product."""
    attn = layer.self_attn
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    return F.linear(layer.layer_norm1(hidden), weight, bias)


def _mlp(layer: HFModule, x: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """The layer's MLP with QuickGELU (``x sigmoid(1.702 x) = silu(1.702 x) / 1.702``) folded into
    one SiLU: the 1.702 goes into ``fc1`` and ``fc2``; ``inplace`` only where no gradient is taken."""
    mlp = layer.mlp
    if not isinstance(mlp.activation_fn, QuickGELUActivation):
        return mlp(x)
    c = 1.702  # QuickGELU's constant
    x = F.silu(F.linear(x, mlp.fc1.weight * c, mlp.fc1.bias * c), inplace=inplace)
    return F.linear(x, mlp.fc2.weight / c, mlp.fc2.bias)


def scoring_layer(layer: HFModule, hidden: torch.Tensor) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` on ``[B, T, D]`` for scores only (no attention probabilities):
    stacked projections, torch's scaled-dot-product attention, the folded MLP. The stacked and
    scaled weights are made on every call, never cached, because the sanity check randomises
    weights in place."""
    attn = layer.self_attn
    b, t, d = hidden.shape
    q, k, v = _qkv(layer, hidden).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2).reshape(b, t, d)
    hidden = hidden + attn.out_proj(out)
    return hidden + _mlp(layer, layer.layer_norm2(hidden), inplace=True)


def traced_layer(layer: HFModule, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scoring_layer`` with explicit attention probabilities that gradients reach:
    ``(output [B, T, D], probabilities [B, H, T, T])``."""
    attn = layer.self_attn
    b, t, d = hidden.shape
    q, k, v = _qkv(layer, hidden).view(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = softmax_attention(q, k, attn.scale)
    hidden = hidden + attn.out_proj((probs @ v).transpose(1, 2).reshape(b, t, d))
    return hidden + _mlp(layer, layer.layer_norm2(hidden), inplace=False), probs


class FastCLIPAdapter(CLIPAdapter):
    """``CLIPAdapter`` with the CLS-only last layer for scoring and for Chefer's trace."""

    _cls_readout_ok: bool | None = None
    _readout_trace_ok: bool | None = None

    @property
    def fast_paths(self) -> dict[str, str]:
        """Each fast path's state on this model: ``unchecked``, ``in use`` or ``off`` (it disagreed
        with the model's own forward, or a pooling head reads every token)."""
        names = {None: "unchecked", True: "in use", False: "off"}
        if self.pooling_head_attention is not None:
            return dict.fromkeys(FAST_PATHS, "off")
        return {path: names[getattr(self, flag)] for path, flag in FAST_PATHS.items()}

    def describe(self) -> dict:
        return {**super().describe(), "fast_paths": self.fast_paths}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def image_embeds_for_scoring(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_embeds`` with the last vision layer run for the CLS token only: every token
        still gets its keys and values (the CLS query attends to them), the rest is done for the
        CLS token alone."""
        pixel_values = self._check_pixels(pixel_values)
        if self.pooling_head_attention is not None:  # the head reads every token: nothing to skip
            return self.image_embeds(pixel_values)
        return self._checked("_cls_readout_ok", lambda: self._cls_readout_embeds(pixel_values),
                             lambda: self.image_embeds(pixel_values),
                             lambda: self.image_embeds(pixel_values[:2]))

    def _cls_readout_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        with self.autocast():
            hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
            for layer in self.vision_layers[:-1]:
                hidden = scoring_layer(layer, hidden)
            return self._cls_readout(hidden, probabilities=False)[0]

    def _cls_readout(self, hidden: torch.Tensor, *,
                     probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last vision layer for the CLS token only, then the projection: ``[B, T, D]`` (the
        last layer's input) -> ``(normalised embeddings [B, E], the CLS query's attention row
        [B, H, 1, T] or None)``. With ``probabilities`` the row is an explicit softmax that
        gradients reach; without, torch's scaled-dot-product kernel."""
        vision, last = self.model.vision_model, self.vision_layers[-1]
        attn = last.self_attn
        x = last.layer_norm1(hidden)
        b, t, d = x.shape

        def heads(v: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, H, n, D/H]
            return v.view(b, v.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj(x[:, :1])), heads(attn.k_proj(x)), heads(attn.v_proj(x))
        probs = None
        if probabilities:
            probs = softmax_attention(q, k, attn.scale)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, H, 1, D/H]
        cls = hidden[:, :1] + attn.out_proj(out.transpose(1, 2).reshape(b, 1, d))
        cls = cls + last.mlp(last.layer_norm2(cls))
        feats = self.model.visual_projection(vision.post_layernorm(cls[:, 0]))
        return F.normalize(feats.float(), dim=-1), probs

    # ------------------------------------------------------------------ Chefer's trace
    def readout_trace(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> VisionTrace:
        """``trace`` for rules that need only the score and the attention probabilities with their
        gradients (Chefer's): ``attentions[-1]`` is ``[B, H, 1, T]``, the CLS query's row, the only
        row of the last layer that reaches the image embedding; no hidden states; take
        ``torch.autograd.grad(score, attentions)``."""
        pixel_values = self._check_pixels(pixel_values)
        prompts = self.pair_prompts(pixel_values, prompts)
        if self.pooling_head_attention is not None:  # the head reads every last-layer token
            return self.trace(pixel_values, prompts, retain_grads=False)
        return self._checked(
            "_readout_trace_ok", lambda: self._readout_trace(pixel_values, prompts),
            lambda: self.trace(pixel_values, prompts, retain_grads=False),
            lambda: self.score(pixel_values[:2], prompts[:2]).detach(), compared=lambda tr: tr.score)

    def _readout_trace(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> VisionTrace:
        vision = self.model.vision_model
        attentions: list[torch.Tensor | None] = []
        with torch.enable_grad(), self.autocast():
            txt = self.text_embeds(prompts)
            # a leaf that requires grad, as in ``trace``: the weights are frozen
            hidden = vision.pre_layrnorm(vision.embeddings(pixel_values)).detach().requires_grad_(True)
            for layer in self.vision_layers[:-1]:
                hidden, probs = traced_layer(layer, hidden)
                attentions.append(probs)
            img, last = self._cls_readout(hidden, probabilities=True)
            attentions.append(last)
            score = self.pair_score(img, txt)
        return VisionTrace(score=score, attentions=recorded(attentions), hidden_states=[])

    # ------------------------------------------------------------------ the self-check
    def _checked(self, flag: str, fast: Callable[[], Any], plain: Callable[[], Any],
                 reference: Callable[[], torch.Tensor],
                 compared: Callable[[Any], torch.Tensor] = lambda out: out) -> Any:
        """``fast()``, checked once per adapter: the first time, the first two rows of
        ``compared(fast())`` are compared with ``reference()`` (the plain path on those two rows);
        if they disagree, or the fast path fails on this model's layout, ``flag`` turns False and
        ``plain()`` answers from then on."""
        if getattr(self, flag) is False:
            return plain()
        try:
            out = fast()
        except torch.OutOfMemoryError:
            raise  # says nothing about the fast path: the caller lowers its batch size (suite.run)
        except (AttributeError, TypeError, RuntimeError):
            setattr(self, flag, False)
            return plain()
        if getattr(self, flag) is None:
            got, expected = compared(out).detach().float(), reference().float()
            rtol, atol = self._tolerance(expected)
            setattr(self, flag, got.shape[1:] == expected.shape[1:] and bool(
                torch.allclose(got[:2], expected, rtol=rtol, atol=atol)))
        return out if getattr(self, flag) else plain()

    def _tolerance(self, expected: torch.Tensor) -> tuple[float, float]:
        """``(rtol, atol)``: float32 rounding, or, under bf16/fp16 autocast, where the two paths
        round differently at every operation (as far apart as either is from float32), 8 epsilons
        of that precision relative to the result's scale. A wrong layer layout is off by the whole
        scale, far beyond either."""
        if self.autocast_dtype is None:
            return 1e-3, 1e-4
        tol = 8 * torch.finfo(self.autocast_dtype).eps
        return tol, tol * float(expected.abs().max())

"""Gradient-weighted attention relevance (Chefer, Gur & Wolf, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).

For each self-attention layer ``l`` (from ``start_layer`` to the last) with attention
probabilities ``A_l`` ``[H, T, T]`` and their gradients ``dS/dA_l`` for the explained score ``S``::

    A_bar_l = mean_heads((dS/dA_l * A_l).clamp(min=0))
    R <- R + A_bar_l @ R,      R initialised to the identity

and the image map is the readout row of ``R`` over the patch tokens (``R[cls, patches]`` for
CLIP). An attention-pooling head (SigLIP's) is a query attending to the encoder's tokens, and gets
the bi-modal rule for such a query (``pooled_relevance``). The text-side relevance is the same rule
on the text tower, read at the token the text embedding is taken from.

Implementation note (exact, not an approximation): ``R_L = (I + A_bar_L) ... (I + A_bar_s)``, and
only one row of it is needed, so we propagate that row from the top layer down,
``r <- r + r @ A_bar_l``: ``O(T^2)`` per layer instead of the ``O(T^3)`` matrix product. The tests
check it against the literal matrix recursion.

Batching: the scores of the ``B`` image-prompt pairs don't interact, so one backward pass of
their sum yields every pair's gradients.

The image map needs nothing but the gradient-weighted attentions, so it asks the adapter for
exactly those (``gradient_weighted_attentions``). By default they come from ``readout_trace`` and
autograd; for CLIP the last layer runs for the CLS query alone (the only row of ``A_L`` the readout
row meets; ``adapters/clip_fast.py``).
The text-side relevance needs the text tower's attention too and goes through the full ``trace``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.probes.errors import ProbeInputError
from workers.probes.registry import register
from workers.probes.relevance import chunks, readout_row, to_grid

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


@dataclass
class CheferRelevance:
    image: torch.Tensor  # [B, gh, gw] float32 CPU
    text: torch.Tensor | None = None  # [B, Tt] float32 CPU, 0 on padding
    tokens: list[list[str]] | None = None  # the text tokens ``text`` refers to


@torch.no_grad()
def weighted_attention(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``mean_heads((grad * A)+)``: ``[B, H, ...]`` -> ``[B, ...]`` float32 (a constant: no graph)."""
    # Why no_grad: ``attn`` is part of the forward graph, so under grad mode the product would
    # record a graph of its own and ``clamp_`` would first clone the product to keep it for a
    # backward pass nobody runs: one extra [B, H, T, T] copy per layer, ~10% of a batched chefer
    # call at batch 32. clamp_ on the fresh product saves another buffer; the inputs are never written.
    return (grad.float() * attn.float()).clamp_(min=0).mean(1)


def propagate_row(row: torch.Tensor, attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``row [B, T]`` times ``(I + A_L) ... (I + A_1)``; ``attentions`` are the head-fused
    ``[B, T, T]`` matrices in layer order (first to last). A layer may carry only its first ``q``
    query rows ``[B, q, T]`` when the rest are zero as far as ``row`` can tell (the last layer of
    a ``readout_trace``: ``row`` is the readout row, and no other query reaches the score)."""
    for a in reversed(attentions):
        row = row + torch.bmm(row[:, None, :a.shape[-2]], a).squeeze(1)
    return row


def normalised_residual(r: torch.Tensor) -> torch.Tensor:
    """Chefer et al. eq. 8-9: ``R_bar = (R - I) / rowsum(R - I) + I`` on ``[B, n, n]``.

    Self-attention relevance accumulates an identity plus ever larger sums; removing the identity
    and normalising each row keeps one modality's context from outweighing the other's in the
    bi-modal rule. A row without context (still the identity) stays the identity.
    """
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    s = r - eye
    return s / s.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def self_relevance(cams: Sequence[torch.Tensor], n: int, batch: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Chefer's self-attention rule as a matrix: ``R = I``, then ``R <- R + A_bar_l @ R`` for each
    head-fused cam ``[B, n, n]`` in layer order. Returns ``[B, n, n]``."""
    r = torch.eye(n, device=device).expand(batch, n, n).clone()
    for cam in cams:
        r = r + torch.bmm(cam, r)
    return r


def query_context_relevance(steps: Sequence[tuple[str, torch.Tensor]], n_query: int, n_context: int,
                            context: torch.Tensor | None = None) -> torch.Tensor:
    """Chefer's bi-modal rule for queries that attend to themselves and to a context modality
    (BLIP-2's Q-Former: learned queries, vision tokens as context).

    ``steps``: ``("self", A_bar [B, q, q])`` or ``("cross", A_bar [B, q, c])`` in execution order;
    ``context``: the context's own relevance ``R^cc`` ``[B, c, c]`` (None: the identity, i.e. the
    context tokens are taken as they enter). With ``R^qq = I`` and ``R^qc = 0``:

    - self-attention (eq. 6-7): ``R^qq += A_bar R^qq``, ``R^qc += A_bar R^qc``;
    - cross-attention (eq. 10): ``R^qc += (R_bar^qq)^T A_bar R_bar^cc`` with ``R_bar`` normalised
      (eq. 8-9), both sides as in the authors' released code (``apply_mm_attention_rules``). The
      context never attends to the queries, so eq. 11's ``R^qq`` update is zero.

    Returns ``R^qc`` ``[B, q, c]``.
    """
    batch, device = (steps[0][1].shape[0], steps[0][1].device) if steps else (1, "cpu")
    r_qq = torch.eye(n_query, device=device).expand(batch, n_query, n_query).clone()
    r_qc = torch.zeros(batch, n_query, n_context, device=device)
    r_cc = normalised_residual(context) if context is not None else None
    for kind, cam in steps:
        if kind == "self":
            r_qq = r_qq + torch.bmm(cam, r_qq)
            r_qc = r_qc + torch.bmm(cam, r_qc)
        else:
            term = torch.bmm(normalised_residual(r_qq).transpose(1, 2), cam)
            r_qc = r_qc + (torch.bmm(term, r_cc) if r_cc is not None else term)
    return r_qc


def relevance(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *, start_layer: int = 0,
              text: bool = False) -> CheferRelevance:
    """Chefer relevance for ``B`` image-prompt pairs in one forward and one backward pass."""
    if not 0 <= start_layer < adapter.num_layers:
        raise ProbeInputError(f"start layer {start_layer} out of range 0..{adapter.num_layers - 1}")
    if not text:
        weighted = adapter.gradient_weighted_attentions(pixel_values, prompts, start_layer=start_layer)
        pool = None
        if weighted.pool is not None:  # the readout weights: the pooling step's own attention (see pooled_relevance)
            pool_attention = adapter.attentions(pixel_values)[1]
            assert pool_attention is not None  # the same pooling head that weighted.pool came from
            pool = pool_attention.float().mean(1)
        return CheferRelevance(image=_image_map(adapter, weighted.layers, pool))

    trace = adapter.trace(pixel_values, prompts, grad_from_layer=start_layer, text=True, retain_grads=False)
    # a trace with text=True has all three
    assert trace.text_readout is not None and trace.text_attention_mask is not None
    assert trace.text_input_ids is not None
    vision = list(trace.attentions[start_layer:])
    pooled = [trace.pool_attention] if trace.pool_attention is not None else []
    texts = list(trace.text_attentions)
    grads = torch.autograd.grad(trace.score.sum(), vision + pooled + texts)
    # grads continues with the pooling and text layers' gradients, which zip leaves to the lines below
    layers = [weighted_attention(a, g) for a, g in zip(vision, grads, strict=False)]
    pool = pooled[0].detach().float().mean(1) if pooled else None
    image = _image_map(adapter, layers, pool)

    text_layers = [weighted_attention(a, g) for a, g in zip(texts, grads[len(vision) + len(pooled):], strict=True)]
    tt = text_layers[0].shape[-1]
    text_row = torch.nn.functional.one_hot(trace.text_readout, tt).float()
    text_rel = propagate_row(text_row, text_layers) * trace.text_attention_mask.float()
    tokens = [adapter.tokenizer.convert_ids_to_tokens(ids.tolist()) for ids in trace.text_input_ids]
    return CheferRelevance(image=image, text=text_rel.detach().float().cpu(), tokens=tokens)


def _image_map(adapter: DualEncoderAdapter, layers: Sequence[torch.Tensor], pool: torch.Tensor | None) -> torch.Tensor:
    """The readout through the head-fused layers ``[B, q, T]`` -> ``[B, gh, gw]``."""
    if pool is not None:
        return to_grid(adapter, pooled_relevance(pool, layers))
    b, t = layers[-1].shape[0], layers[-1].shape[-1]
    row = readout_row(adapter, pool, b, t).to(layers[0].device)
    return to_grid(adapter, propagate_row(row, layers))


def pooled_relevance(pool: torch.Tensor, layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Relevance ``[B, T]`` of the tokens for an embedding read out by an attention-pooling head;
    ``pool`` ``[B, T]`` is the readout row.

    The pooling head's probe is a query of its own attending to the encoder's tokens: Chefer's
    bi-modal rule for a query over a context modality (eq. 10), ``R^pc = A_pool @ R_bar^cc``, where
    ``R_bar^cc`` is the encoder's gradient-weighted self-attention relevance ``R = prod_l (I +
    A_bar_l)`` with its residual normalised (eq. 8-9, ``normalised_residual``) and ``A_pool`` ``[B,
    T]`` the pooling step's head-averaged attention: the weights with which the final token states
    make the embedding, the readout row, as the one-hot CLS row is for CLIP (the gradient
    weighting, which makes the map specific to the prompt, is in ``R^cc``).

    Why not the CLS-token rule with the pooling row as the readout row: ``A_bar`` carries the
    scale of the gradients, so ``I + A_bar`` is nearly the identity and the pooled row comes back
    almost unchanged: the map shows where the probe looked (often a few register-like tokens
    that gathered the image's content in the upper layers), not where that content came from.
    With a CLS token the identity term only touches the CLS column, which no map shows; with a
    pooling head it lands on the patches. Normalising the residual weighs each token's gathered
    context as much as its own state, whatever the gradients' scale.

    ``layers`` must be the full ``[B, T, T]`` matrices (every token's row can reach the pooled
    output).
    """
    b, t = pool.shape
    r = self_relevance(layers, t, b, device=pool.device)
    return torch.bmm(pool.float()[:, None, :], normalised_residual(r))[:, 0]


@register("chefer")
def chefer(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *, start_layer: int = 0,
           batch_size: int = 32) -> torch.Tensor:
    """Image-side Chefer relevance ``[B, gh, gw]``; ``start_layer`` (default 0: all layers) is the
    first layer whose attention enters ``R``. Pairs are processed ``batch_size`` at a time with one
    backward pass per batch."""
    prompts = adapter.pair_prompts(pixel_values, prompts)
    maps = [relevance(adapter, pixel_values[s], prompts[s], start_layer=start_layer).image
            for s in chunks(len(prompts), batch_size)]
    return torch.cat(maps)


def vision_relevance(rows_rel: torch.Tensor, image_positions: torch.Tensor, attentions: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor], vision_rows: torch.Tensor, prefix: int, *,
                     normalise: bool = False) -> torch.Tensor:
    """Carry image-token relevance ``rows_rel[:, image_positions]`` back to the input patches.

    ``attentions[l]`` ``[1, Hv, Tv, Tv]``, ``grads[l]`` ``[T, Hv, Tv, Tv]``; Chefer's rule gives
    ``R_v = prod_l (I + mean_h((grad * A)+))`` per target; returns ``[T, G]`` over patch tokens.

    ``normalise``: the bi-modal rule for a modality read by another through the projector (eq. 10):
    ``R_v`` with its residual normalised (eq. 8-9, ``normalised_residual``) before the image tokens'
    relevance is carried through it. Without, ``I + A_bar`` is nearly the identity at the gradients'
    scale and the result is the decoder's image-token columns again; with, each token's gathered
    context counts as much as its own state.
    """
    t = rows_rel.shape[0]
    tv = attentions[0].shape[-1] if attentions else int(vision_rows.max()) + 1
    r = torch.zeros(t, tv, dtype=rows_rel.dtype, device=rows_rel.device)
    r[:, vision_rows] = rows_rel[:, image_positions].clamp(min=0)
    cams = [weighted_attention(a, g) for a, g in zip(attentions, grads, strict=True)]  # [T, Tv, Tv] each
    if not normalise or not cams:
        return propagate_row(r, cams)[:, prefix:]
    r_bar = normalised_residual(self_relevance(cams, tv, t, device=r.device))
    return torch.bmm(r[:, None, :], r_bar)[:, 0, prefix:]

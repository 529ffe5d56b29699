"""Token attribution for generated text: which image patches and earlier tokens produced each word.

Method (``chefer``): gradient-weighted attention relevance through the decoder, with Chefer,
Gur and Wolf's rule for self-attention over the joint (image + text) sequence (ICCV 2021,
"Generic Attention-model Explainability"): ``R = I``; for every decoder layer
``R += mean_h((dy/dA * A)+) @ R``, where ``y`` is the logit of the generated token. The row of
``R`` at the position that *predicts* the token gives its relevance over the sequence; the
image-token columns, mapped back to the vision grid, are the image heatmap and the text columns
are the relevance of earlier tokens (the identity term of the token's own position is removed).

Baseline (``raw``): the attention probabilities of that row, averaged over layers and heads.

Efficiency (why this is hand-written rather than a per-token loop): the caption is generated
once (KV cache) with the generation pass's run over the image and prompt traced, i.e. keeping
every layer's attention probabilities in the autograd graph (``generate_and_attribute``,
``FusionAdapter.generate_traced``). The T explained rows are then run once more, in one call on
the traced keys and values, and ONE batched backward pass (``torch.autograd.grad(...,
is_grads_batched=True)``, i.e. vmap over the targets' one-hot output gradients) gives every
target's attention gradients at once. Splitting the forward at the first explained row also
keeps the top layer's work over the prefix, which no explained output depends on, out of the
backward pass. Text that was generated elsewhere goes through ``attribute_generated``: the same
numbers from a teacher-forced forward in the same two calls (``trace_targets``). Only the needed
row of ``R`` is propagated (a vector-matrix product per layer, from the last layer down), so the
cost is O(T * L * N^2) instead of O(T * L * N^3).

Shapes: ``T`` generated tokens, ``L`` decoder layers, ``H`` heads, ``N`` sequence length,
``(gh, gw)`` the vision grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from workers.probes import validation
from workers.probes.adapters.base import Encoded, FusionAdapter, TargetTrace
from workers.probes.chefer import vision_relevance, weighted_attention
from workers.probes.errors import ProbeInputError, UnsupportedModelError
from workers.probes.kinds import BatchSize, DatasetArg, KindParams, Limit, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress
from workers.probes.token_perturbation import METHODS as PERTURBATION_METHODS
from workers.probes.token_perturbation import applies_to, perturbation_attribution, word_deletion_insertion

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from workers.probes.scenes import SceneImage

#: ``chefer``: decoder only (image-token columns); ``chefer_full``: also through the vision tower;
#: ``chefer_bimodal``: the decoder's image-token relevance through the projector into the vision
#: encoder by Chefer's bi-modal rule (``vision_relevance(normalise=True)``; patch-aligned adapters only:
#: where a Q-Former sits between, as in BLIP-2, ``chefer_full`` already is that rule); ``raw``: attention of the
#: predicting position, mean over layers and heads; then the perturbation and gradient methods that
#: reach the pixels (``token_perturbation``).
ATTENTION_METHODS = ("chefer", "chefer_full", "chefer_bimodal", "raw")
METHODS = (*ATTENTION_METHODS, *PERTURBATION_METHODS)
#: How the caption figure labels each method's row.
METHOD_LABELS = {"chefer": "grad x attn (decoder)", "chefer_full": "grad x attn (+ vision)",
                 "chefer_bimodal": "grad x attn (bi-modal)", "raw": "raw attention", "occlusion": "occlusion",
                 "occlusion_2x2": "occlusion 2x2", "input_x_gradient": "input x gradient",
                 "integrated_gradients": "integrated gradients"}
#: Methods whose rows are already over the vision grid's patches (not over the joint sequence).
GRID_METHODS = frozenset({"chefer_full", "chefer_bimodal", *PERTURBATION_METHODS})
#: Suffix of the ``[T, G]`` patch maps that ``attribute_generated`` adds for adapters whose image
#: tokens are not grid cells (``"chefer@patches"``, ``"raw@patches"``).
PATCHES = "@patches"
#: Words that never name an object in a generic dataset's prompts.
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "photo", "picture", "image", "with", "in", "on", ","})


def word_spans(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """``(first token, end token, word)`` for each word of a generated caption, ``word`` lower-cased.

    Tokenizers split words the way their vocabulary does: byte-pair and word-piece vocabularies cut a
    rarer word into pieces ("turquoise" -> "tur", "quo", "ise"), which no object's name matches token
    by token. A token continues the word before it when, decoded after it, it adds letters or digits
    right after letters or digits; anything else (a space, punctuation) starts the next word, and a
    token that adds only a space belongs to the word after it. Read from the decoded text, so the
    rule holds for any tokenizer's markers (``##``, ``▁``, ``Ġ``). ``first token`` is the word's first
    token that shows text: where the model commits to the word."""
    spans: list[tuple[int, int]] = []
    start, before, blank = 0, "", False
    for k in range(len(ids)):
        text = decode(ids[:k + 1])
        kept = text.startswith(before)  # else the decoder rewrote earlier text: a word ends anyway
        added = text[len(before):] if kept else ""
        joins = kept and (blank or (added[:1].isalnum() and before[-1:].isalnum()))
        if k and not joins:
            spans.append((start, k))
            start = k
        blank = kept and not added.strip()
        before = text
    if len(ids):
        spans.append((start, len(ids)))
    out = []
    for a, b in spans:
        while a < b - 1 and not decode(ids[a:a + 1]).strip():
            a += 1
        out.append((a, b, decode(ids[a:b]).strip().lower()))
    return out


@dataclass
class TokenAttribution:
    """Attributions of every generated token of one caption.

    ``image[method]`` is ``[T, gh, gw]``; ``text[method]`` is ``[T, C]`` over the ``C`` text
    positions of the sequence (prompt tokens, then generated tokens; ``text_positions``), zero
    where a position comes at or after the token's own prediction point.
    """

    prompt: str
    generated_ids: list[int]
    generated_tokens: list[str]
    text_tokens: list[str]
    text_positions: list[int]
    prediction_positions: list[int]  # position whose output predicts generated token t
    image: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, np.ndarray] = field(default_factory=dict)
    caption: str = ""
    n_prompt_text: int = 0
    #: ``word_spans`` of the caption: ``(first token, end token, word)``
    words: list[tuple[int, int, str]] = field(default_factory=list)


def generated_targets(adapter: FusionAdapter, enc: Encoded,
                      generated: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced input ids ``[1, N]`` (prompt + all but the last generated token) and the
    prediction position of every generated token ``[T]``."""
    gen = torch.tensor([list(generated)], dtype=torch.long, device=enc.input_ids.device)
    ids = torch.cat([enc.input_ids, gen[:, :-1]], dim=1)
    start = enc.input_ids.shape[1] - 1
    return ids, torch.arange(start, start + len(generated), device=ids.device)


def relevance_rows(attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   rows: torch.Tensor) -> torch.Tensor:
    """Chefer's decoder rule, propagated for one row per target.

    ``attentions[l]`` ``[1, H, N, N]`` (or ``[T, H, N, N]``), ``grads[l]`` ``[T, H, N, N]`` (target
    t's gradient), ``rows`` ``[T]`` -> ``[T, N]``: row ``rows[t]`` of
    ``R = prod_l (I + mean_h((grad_l * A_l)+))`` for target t.
    """
    n = attentions[0].shape[-1]
    rows = rows.to(attentions[0].device)
    r = torch.nn.functional.one_hot(rows, n).to(attentions[0].dtype)
    t = torch.arange(len(rows), device=rows.device)
    for k, (a, g) in enumerate(zip(reversed(attentions), reversed(grads), strict=True)):
        if k == 0:  # r is still one-hot at rows[t]: only that row of the top layer's cam is needed
            a_rows = a[0][:, rows].transpose(0, 1) if a.shape[0] == 1 else a[t, :, rows]  # [T, H, N]
            r = r + weighted_attention(a_rows, g[t, :, rows])
            continue
        cam = weighted_attention(a, g)  # [T, N, N]
        r = r + torch.bmm(r[:, None, :], cam)[:, 0]
    return r


def split_relevance_rows(prefix: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                         prefix_grads: Sequence[torch.Tensor | None],
                         target_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``relevance_rows`` over a ``TargetTrace``: the same numbers, from attention split at row ``P``.

    ``prefix[l]`` ``[1, H, P, P]`` with ``prefix_grads[l]`` ``[T, H, P, P]`` (target t's gradient; the
    top layer's is never read and may be None), ``target[l]`` ``[1, H, T, N]`` with
    ``target_grads[l]`` ``[T, H, T, N]``; row ``P + t`` explains target ``t``. Returns ``[T, N]``.

    A prefix-LM (PaliGemma: the whole prompt attends to itself in both directions) runs its prompt
    rows in one call, so its prefix is ``[1, H, P + 1, P + 1]``: rows ``..P`` attend to column ``P`` too,
    and its row ``P`` is the first explained row again, reaching the output both through the prompt's
    cached keys and values and as target row 0. The one row of the unsplit model has the sum of both
    gradients, which is what its weighted attention reads.
    """
    t_count, n = target[0].shape[2], target[0].shape[3]
    p = n - t_count
    t = torch.arange(t_count, device=target[0].device)
    r = torch.nn.functional.one_hot(t + p, n).to(target[0].dtype)
    for k, layer in enumerate(reversed(range(len(target)))):
        a, g = target[layer][0], target_grads[layer]  # [H, T, N], [T, H, T, N]
        if k == 0:  # r is still one-hot at row P + t: only that row of the top layer's cam is needed
            r = r + weighted_attention(a[:, t].transpose(0, 1), g[t, :, t])
            continue
        pa, pg = prefix[layer][0], prefix_grads[layer]
        assert pg is not None
        cols = pa.shape[-1]
        if cols > p:  # the prefix ran the first explained row too (prefix-LM): one row, two gradients
            g = g.clone()
            g[:, :, 0, :cols] += pg[:, :, p]
        # Rows P.. come from the target attention, rows ..P from the prefix's (whose columns
        # >= P are zero under the causal mask, so the [P, P] block is the whole row).
        update = torch.bmm(r[:, None, p:], weighted_attention(a, g))[:, 0]
        cam = weighted_attention(pa[:, :p], pg[:, :, :p])  # [T, P, cols]
        update[:, :cols] += torch.bmm(r[:, None, :p], cam)[:, 0]
        r = r + update
    return r


def cross_relevance_rows(prefix: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                         prefix_grads: Sequence[torch.Tensor | None], target_grads: Sequence[torch.Tensor],
                         cross_layers: Sequence[int]) -> torch.Tensor:
    """``split_relevance_rows`` for a decoder whose ``cross_layers`` attend to ``V`` vision tokens outside
    the sequence (Chefer et al. 2021's rule for co-attention): self-attention layers propagate the text
    relevance ``r`` as usual; a cross-attention layer adds ``r @ mean_heads((grad * A)+)`` (its ``[P, V]``
    prefix and ``[T, V]`` target rows) to the vision tokens' relevance and leaves ``r`` as it is (its
    residual carries the text). Returns ``[T, N + V]``: text relevance, then vision-token relevance."""
    cross = set(cross_layers)
    square = [layer for layer in range(len(target)) if layer not in cross]
    t_count, n = target[square[0]].shape[2], target[square[0]].shape[3]
    v = target[min(cross)].shape[-1]
    p = n - t_count
    t = torch.arange(t_count, device=target[0].device)
    r = torch.nn.functional.one_hot(t + p, n).to(target[square[0]].dtype)
    vision = torch.zeros(t_count, v, dtype=r.dtype, device=r.device)
    for k, layer in enumerate(reversed(range(len(target)))):
        a, g = target[layer][0], target_grads[layer]  # [H, T, N or V], [T, H, T, N or V]
        if k == 0:  # r is still one-hot at row P + t: only that row of the top layer's cam is needed
            top = weighted_attention(a[:, t].transpose(0, 1), g[t, :, t])
            if layer in cross:
                vision = vision + top
            else:
                r = r + top
            continue
        update = torch.bmm(r[:, None, p:], weighted_attention(a, g))[:, 0]  # [T, N or V]
        prefix_grad = prefix_grads[layer]
        if prefix_grad is None:
            raise ValueError(f"layer {layer}: its prefix attention needs its gradient")
        prefix_cam = weighted_attention(prefix[layer][0], prefix_grad)  # [T, P, P or V]
        if layer in cross:
            vision = vision + update + torch.bmm(r[:, None, :p], prefix_cam)[:, 0]
            continue
        update[:, :p] += torch.bmm(r[:, None, :p], prefix_cam)[:, 0]
        r = r + update
    return torch.cat([r, vision], 1)


def raw_rows(target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Raw attention baseline ``[T, N]``: the explained rows of ``target[l]`` ``[1, H, T, N]``,
    averaged over layers and heads."""
    return torch.stack([a[0].mean(dim=0) for a in target]).mean(dim=0)


def attention_gradients(y: torch.Tensor, attentions: Sequence[torch.Tensor], *,
                        batched: bool = True) -> list[torch.Tensor]:
    """Gradients of each of the ``T`` scalars ``y`` w.r.t. every attention map ``[1, ...]``.

    ``batched``: one vmapped backward pass for all targets; else one backward per target
    (``retain_graph``). Returns ``[T, ...]`` per map (e.g. ``[T, H, N, N]``).
    """
    t = y.shape[0]
    if batched:
        try:
            grads = torch.autograd.grad(y, list(attentions), grad_outputs=torch.eye(t, dtype=y.dtype, device=y.device),
                                        is_grads_batched=True, retain_graph=False)
            return [g[:, 0] for g in grads]
        except torch.OutOfMemoryError:
            raise  # the per-target loop would meet a graph this attempt has half freed
        except RuntimeError:
            # Some kernels have no vmap rule; fall back to the per-target loop (same numbers).
            pass
    per_layer: list[list[torch.Tensor]] = [[] for _ in attentions]
    for k in range(t):
        grads = torch.autograd.grad(y[k], list(attentions), retain_graph=k < t - 1)
        for layer, g in enumerate(grads):
            per_layer[layer].append(g[0])
    return [torch.stack(g) for g in per_layer]


def attribute_generated(adapter: FusionAdapter, enc: Encoded, image_features: torch.Tensor,
                        generated: Sequence[int], *, batched: bool = True,
                        pixel_values: torch.Tensor | None = None,
                        perturbation: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Relevance rows ``{method: [T, N]}`` of every generated token over the joint sequence.

    ``image_features`` ``[1, n_img, D]`` (LM input), ``generated`` the T generated token ids.
    One teacher-forced forward (``trace_targets``) and one (batched) backward pass. For text that
    is still to be generated, ``generate_and_attribute`` saves the forward pass.

    With ``pixel_values`` (``[1, 3, S, S]``) and an adapter with ``vision_trace``, the same forward
    and backward also run through the vision tower and the result gains ``chefer_full``
    ``[T, G]`` (patch relevance): the decoder's image-token relevance carried back to the
    input patches by Chefer's rule over the vision tower's self-attention, because a vision
    transformer moves information between patches before the decoder ever sees it
    (``adapter.patch_relevance``). For adapters whose image tokens are not grid cells
    (``patch_aligned`` False, e.g. BLIP-2's Q-Former queries) it also gains ``chefer@patches`` and
    ``raw@patches`` ``[T, G]``: the adapter's mapping of those rows to the patches.
    ``perturbation`` (with ``pixel_values``): ``token_perturbation`` methods to add, ``[T, G]`` each.
    """
    if not generated:
        raise ProbeInputError("the model generated no tokens to attribute")
    ids, rows = generated_targets(adapter, enc, generated)
    with torch.enable_grad():
        embeds, vision = _traced_embeddings(adapter, ids, image_features, pixel_values)
        trace = adapter.trace_targets(embeds, int(rows[0]))
    out = _relevance(adapter, trace, generated, enc, vision, batched=batched)
    if pixel_values is not None and perturbation:
        out.update(perturbation_attribution(adapter, enc, pixel_values, generated, methods=perturbation))
    return out


def generate_and_attribute(adapter: FusionAdapter, enc: Encoded, image_features: torch.Tensor | None,
                           max_new_tokens: int = 32, *, batched: bool = True,
                           pixel_values: torch.Tensor | None = None) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Generate a caption and attribute it: ``(generated ids, attribute_generated's rows)``, the same
    numbers, from ONE generation pass (``adapter.generate_traced``: its pass over the image and
    prompt is the traced forward) and one batched backward pass.

    ``image_features`` may be None when ``pixel_values`` are given and the adapter traces its
    vision tower (the features are then computed in the same pass).
    """
    with torch.enable_grad():
        embeds, vision = _traced_embeddings(adapter, enc.input_ids, image_features, pixel_values)
        generated, trace = adapter.generate_traced(embeds, max_new_tokens)
    if trace is None:
        raise ProbeInputError("the model generated no tokens to attribute (it ended the text at once)")
    return generated, _relevance(adapter, trace, generated, enc, vision, batched=batched)


def _traced_embeddings(adapter: FusionAdapter, ids: torch.Tensor, image_features: torch.Tensor | None,
                       pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None]:
    """Joint input embeddings to trace, and ``(vision attentions, vision_rows)`` when the vision tower
    is traced too (``pixel_values`` given and the adapter has ``vision_trace``). Call with grad enabled."""
    vision_trace = getattr(adapter, "vision_trace", None)
    if pixel_values is not None and vision_trace is not None:
        feats, vision_attns, vision_rows = vision_trace(pixel_values)
        return adapter.embed(ids, feats), (vision_attns, vision_rows)
    if image_features is None:
        if pixel_values is None:
            raise ValueError("image_features or pixel_values are needed")
        with torch.no_grad():
            image_features = adapter.image_features(pixel_values)
    # A leaf that requires grad, so that the forward records the graph the backward pass needs.
    return adapter.embed(ids, image_features.detach()).detach().requires_grad_(True), None


def _relevance(adapter: FusionAdapter, trace: TargetTrace, generated: Sequence[int], enc: Encoded,
               vision: tuple | None, *, batched: bool) -> dict[str, torch.Tensor]:
    """Every method's relevance rows from a ``TargetTrace`` whose logits row t predicts ``generated[t]``."""
    device = trace.logits.device
    targets = torch.tensor(list(generated), dtype=torch.long, device=device)
    vision_attns = list(vision[0]) if vision else []
    with torch.enable_grad():
        y = trace.logits[0, torch.arange(len(generated), device=device), targets]  # [T]
        # The top layer's prefix rows feed no explained output: leave them out of the backward pass.
        n_dec = len(trace.target_attentions)
        maps = trace.prefix_attentions[:-1] + trace.target_attentions + vision_attns
        # float32 from here on (the forward may have run under bf16/fp16 autocast)
        grads = [g.float() for g in attention_gradients(y, maps, batched=batched)]
    with torch.no_grad():
        prefix = [a.detach().float() for a in trace.prefix_attentions]
        target = [a.detach().float() for a in trace.target_attentions]
        cross_layers = tuple(getattr(adapter, "cross_attention_layers", ()))
        if cross_layers:  # the image is read by cross-attention only: no image tokens, no raw image share
            return {"chefer": cross_relevance_rows(prefix, target, [*grads[:n_dec - 1], None],
                                                   grads[n_dec - 1:2 * n_dec - 1], cross_layers)}
        chefer = split_relevance_rows(prefix, target, [*grads[:n_dec - 1], None], grads[n_dec - 1:2 * n_dec - 1])
        out = {"chefer": chefer, "raw": raw_rows(target)}
        if vision:
            link = ([a.detach().float() for a in vision_attns], grads[2 * n_dec - 1:], vision[1])
            out["chefer_full"] = adapter.patch_relevance("chefer_full", out["chefer"], enc.image_positions, *link)
            if adapter.patch_aligned:  # otherwise the adapter's chefer_full is the bi-modal rule already
                out["chefer_bimodal"] = vision_relevance(out["chefer"], enc.image_positions, *link,
                                                         prefix=adapter.num_prefix_tokens, normalise=True)
            if not adapter.patch_aligned:
                # image tokens are not grid cells (BLIP-2's queries): the adapter maps every method to patches
                for method in ("chefer", "raw"):
                    out[method + PATCHES] = adapter.patch_relevance(method, out[method], enc.image_positions, *link)
        return out


def naive_attribute_generated(adapter: FusionAdapter, enc: Encoded, image_features: torch.Tensor,
                              generated: Sequence[int]) -> torch.Tensor:
    """The naive recomputation baseline: a fresh forward and backward per generated token
    (prefix up to the token). Returns the chefer rows ``[T, N_full]`` (zero-padded); used by the
    benchmark and by tests as the reference the efficient path must equal."""
    ids_full, rows = generated_targets(adapter, enc, generated)
    n = ids_full.shape[1]
    out = torch.zeros(len(generated), n, device=ids_full.device)
    for t, token in enumerate(generated):
        ids = ids_full[:, : int(rows[t]) + 1]
        with torch.enable_grad():
            embeds = adapter.embed(ids, image_features.detach()).detach().requires_grad_(True)
            trace = adapter.trace(embeds, ids, enc.image_positions)
            y = trace.logits[0, -1, token]
            grads = torch.autograd.grad(y, trace.attentions)
        with torch.no_grad():
            row = relevance_rows([a.detach().float() for a in trace.attentions], [g.float() for g in grads],
                                 torch.tensor([ids.shape[1] - 1], device=ids.device))
        out[t, : ids.shape[1]] = row[0]
    return out


def to_attribution(adapter: FusionAdapter, enc: Encoded, generated: Sequence[int],
                   rows_by_method: dict[str, torch.Tensor], prompt: str) -> TokenAttribution:
    """Split relevance rows into image maps (vision grid) and text relevance."""
    ids, rows = generated_targets(adapter, enc, generated)
    seq = ids[0].tolist() + [generated[-1]]
    image_pos = enc.image_positions
    grid_pos = image_pos[adapter.image_token_prefix:]
    is_image = torch.zeros(len(seq), dtype=torch.bool)
    is_image[image_pos.cpu()] = True
    text_pos = [i for i in range(len(seq)) if not is_image[i]]
    gh, gw = adapter.grid
    result = TokenAttribution(
        prompt=prompt, generated_ids=list(generated), generated_tokens=adapter.tokens(generated),
        words=word_spans(adapter.decode, generated),
        text_tokens=adapter.tokens([seq[i] for i in text_pos]), text_positions=text_pos,
        prediction_positions=rows.tolist(), caption=adapter.decode(generated),
        n_prompt_text=sum(1 for i in text_pos if i < enc.input_ids.shape[1]))
    tp = torch.tensor(text_pos)
    for method, r in rows_by_method.items():
        if method.endswith(PATCHES):
            continue
        if method in GRID_METHODS:  # already over the vision grid's patches
            result.image[method] = r.detach().float().cpu().clamp(min=0).reshape(len(generated), gh, gw).numpy()
            # the Chefer variants share the decoder's text relevance; perturbation of the image says
            # nothing about the text
            result.text[method] = (result.text["chefer"] if method.startswith("chefer")
                                   else np.zeros_like(result.text["chefer"]))
            continue
        patches = rows_by_method.get(method + PATCHES)
        regions = getattr(enc, "regions", None)  # [n_img, G] where the image's layout sets the tokens
        cross = getattr(enc, "cross_regions", None)  # [V, G]: the rows end with V vision tokens read by cross-attention
        if patches is None and not adapter.patch_aligned and regions is None and cross is None:
            raise ProbeInputError(f"{adapter.architecture}: image tokens are not grid cells, so mapping them to "
                                  "patches needs the traced image path (attribute_generated with pixel_values)")
        r = r.detach().float().cpu().clone()
        if cross is not None:
            patches = r[:, r.shape[1] - len(cross):].clamp(min=0) @ cross.detach().float().cpu()
            r = r[:, : r.shape[1] - len(cross)]
        if r.shape[1] < len(seq):
            r = torch.nn.functional.pad(r, (0, len(seq) - r.shape[1]))
        if method == "chefer":
            r[torch.arange(len(generated)), rows.cpu()] -= 1.0  # drop the identity term of the token itself
        r = r.clamp(min=0)
        if patches is None and regions is not None:
            patches = r[:, image_pos.cpu()] @ regions.detach().float().cpu()
        if patches is not None:
            result.image[method] = patches.detach().float().cpu().clamp(min=0).reshape(len(generated), gh, gw).numpy()
        else:
            result.image[method] = r[:, grid_pos.cpu()].reshape(len(generated), gh, gw).numpy()
        text = r[:, tp]
        later = tp[None, :] > rows.cpu()[:, None]
        result.text[method] = text.masked_fill(later, 0.0).numpy()
    return result


def attribute(adapter: FusionAdapter, image: Image.Image, prompt: str, *, max_new_tokens: int = 32,
              batched: bool = True) -> TokenAttribution:
    """Generate a caption for ``image`` and attribute each generated token (every method): the
    attention methods from one generation pass and one batched backward pass
    (``generate_and_attribute``), the perturbation and gradient methods teacher-forced on the caption."""
    pixel_values = adapter.preprocess([image])  # first: some families' image tokens follow the image's layout
    enc = adapter.encode(prompt)
    generated, rows = generate_and_attribute(adapter, enc, None, max_new_tokens, batched=batched,
                                             pixel_values=pixel_values)
    if applies_to(adapter, enc, pixel_values):  # tiled, framed, pooled layouts: attention methods only
        rows.update(perturbation_attribution(adapter, enc, pixel_values, generated))
    return to_attribution(adapter, enc, generated, rows, prompt)


# --- export ---------------------------------------------------------------------------------


def attribution_graph(att: TokenAttribution, patch_boxes: np.ndarray | None = None, *, method: str | None = None,
                      min_weight: float = 1e-3) -> dict[str, Any]:
    """Tokens and patches as nodes, relevance as weighted edges (source -> generated token).

    Each generated token's incoming weights (image + text, its own identity term excluded) are
    normalised to sum to 1; edges below ``min_weight`` are left out to keep the file small.
    """
    method = method or ("chefer_full" if "chefer_full" in att.image else "chefer")
    gh, gw = att.image[method].shape[1:]
    nodes: list[dict[str, Any]] = []
    for r in range(gh):
        for c in range(gw):
            node = {"id": f"patch:{r}:{c}", "type": "patch", "row": r, "col": c}
            if patch_boxes is not None:
                node["box"] = [round(float(v), 2) for v in patch_boxes[r * gw + c]]
            nodes.append(node)
    for k, (pos, tok) in enumerate(zip(att.text_positions, att.text_tokens, strict=True)):
        role = "prompt" if k < att.n_prompt_text else "generated"
        nodes.append({"id": f"token:{pos}", "type": "token", "role": role, "token": tok, "position": pos})
    edges: list[dict[str, Any]] = []
    gen_nodes = [f"token:{att.text_positions[att.n_prompt_text + t]}" for t in range(len(att.generated_ids))]
    for t, target in enumerate(gen_nodes):
        img = att.image[method][t].reshape(-1)
        txt = att.text[method][t]
        total = float(img.sum() + txt.sum()) or 1.0
        for j, w in enumerate(img):
            if w > 0 and w / total >= min_weight:
                edges.append({"source": f"patch:{j // gw}:{j % gw}", "target": target,
                              "weight": round(float(w / total), 5), "kind": "image"})
        for k, w in enumerate(txt):
            if w > 0 and w / total >= min_weight:
                edges.append({"source": f"token:{att.text_positions[k]}", "target": target,
                              "weight": round(float(w / total), 5), "kind": "text"})
    return {"method": method, "caption": att.caption, "prompt": att.prompt, "grid": [gh, gw], "nodes": nodes,
            "edges": edges}


def attribution_json(att: TokenAttribution, patch_boxes: np.ndarray | None = None) -> dict[str, Any]:
    """The per-token summary the ``attribute`` command prints (both methods) plus the graph."""
    tokens = []
    for t, tok in enumerate(att.generated_tokens):
        entry: dict[str, Any] = {"index": t, "token": tok, "position": att.prediction_positions[t] + 1}
        for method in att.image:
            img = att.image[method][t]
            txt = att.text[method][t]
            r, c = np.unravel_index(int(np.argmax(img)), img.shape)
            total = float(img.sum() + txt.sum()) or 1.0
            top = np.argsort(-txt)[:3]
            entry[method] = {
                "image_share": round(float(img.sum()) / total, 4),
                "argmax_patch": [int(r), int(c)],
                "argmax_box": ([round(float(v), 1) for v in patch_boxes[r * img.shape[1] + c]]
                               if patch_boxes is not None else None),
                "image_relevance": np.round(img.astype(np.float64), 5).tolist(),
                "top_text": [{"token": att.text_tokens[k], "position": att.text_positions[k],
                              "weight": round(float(txt[k]) / total, 4)} for k in top if txt[k] > 0],
            }
        tokens.append(entry)
    return {"caption": att.caption, "prompt": att.prompt, "methods": list(att.image), "tokens": tokens,
            "graph": attribution_graph(att, patch_boxes)}


def shown_words(att: TokenAttribution) -> list[int]:
    """The generated tokens a caption figure shows: the first token of each of its words (no stop
    words or punctuation), or every token of a caption that has none."""
    spans = att.words or [(t, t + 1, tok.lower().lstrip("▁Ġ").strip()) for t, tok in enumerate(att.generated_tokens)]
    words = [a for a, _, word in spans if word and word not in STOPWORDS and any(c.isalpha() for c in word)]
    return words or list(range(len(att.generated_tokens)))


def caption_figures(image: Image.Image, att: TokenAttribution, *, boxes: Sequence[Sequence[float]] = (),
                    methods: Sequence[str] | None = None, words_per_page: int = 4,
                    methods_per_page: int = 2) -> list[Figure]:
    """The caption's words with their image heatmaps, in pages a report prints large enough to read:
    one column per word (after the image itself), one row per method, at most ``words_per_page``
    words and ``methods_per_page`` methods a page. Each word is headed by its position in the
    caption, and each map is labelled with the share of the word's relevance that lies on the image
    (the rest is on the text before it)."""
    import textwrap

    from workers.probes import figures

    methods = [m for m in (methods or METHODS) if m in att.image]
    words = shown_words(att)
    word_at = {a: word for a, _, word in att.words}
    word_parts = figures.split_even(len(words), words_per_page)
    method_parts = figures.split_even(len(methods), methods_per_page)
    pages = []
    for word_part in word_parts:
        for method_part in method_parts:
            shown = [words[k] for k in word_part]
            rows = [methods[k] for k in method_part]
            columns = len(shown) + 1
            cell = min(1.7, (figures.PAGE_WIDTH - 1.6) / columns)
            fig = figures.new_figure(cell * columns + 1.6, len(rows) * (cell + 0.25) + 1.2)
            axes = fig.subplots(len(rows), columns, squeeze=False)
            for r, method in enumerate(rows):
                # the image itself first, in colour: the overlays show it in grey
                figures.draw_image(axes[r][0], image, boxes=boxes, title="image" if r == 0 else None)
                axes[r][0].text(-0.08, 0.5, "\n".join(textwrap.wrap(METHOD_LABELS.get(method, method), 14)),
                                transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
                for c, t in enumerate(shown, start=1):
                    ax = axes[r][c]
                    figures.draw_overlay(ax, image, att.image[method][t], boxes=boxes)
                    if r == 0:
                        ax.set_title(f"“{word_at.get(t, att.generated_tokens[t].lstrip('▁Ġ'))}”\ntoken {t + 1} of "
                                     f"{len(att.generated_tokens)}", fontsize=9)
                    img, txt = float(att.image[method][t].sum()), float(att.text[method][t].sum())
                    if img + txt > 0:
                        ax.text(0.5, -0.04, f"on image {img / (img + txt):.0%}", transform=ax.transAxes,
                                ha="center", va="top", fontsize=8)
            figures.relevance_colourbar(fig, axes[:, 1:].ravel().tolist(), fraction=0.04, pad=0.01)
            if boxes:
                figures.box_legend(fig, "annotated objects (ground truth)")
            fig.suptitle("\n".join(textwrap.wrap(f"“{att.caption}”  (prompt: {att.prompt})", 90)[:3]), fontsize=10)
            part = []
            if len(word_parts) > 1:
                part.append(f"words {word_part.start + 1}-{word_part.stop} of {len(words)} shown")
            if len(method_parts) > 1:
                part.append(f"methods {method_part.start + 1}-{method_part.stop} of {len(methods)}")
            figures.describe(
                fig, "The model's caption (title) with the image relevance of each of its words"
                     + (f" ({', '.join(part)})" if part else ""),
                rows="one attribution method each: " + ", ".join(METHOD_LABELS.get(m, m) for m in rows),
                columns="the image in colour" + (" with the annotated objects boxed in green" if boxes else "")
                        + ", then one generated word each, headed by its position in the caption and labelled "
                          "below with the share of its relevance on the image (the rest is on the text)",
                colour="relevance, min-max scaled per map; warmer and more opaque = more relevant "
                       "(colour bar on the right)")
            pages.append(fig)
    return pages


def caption_figure(image: Image.Image, att: TokenAttribution, *, boxes: Sequence[Sequence[float]] = (),
                   methods: Sequence[str] | None = None) -> Figure:
    """The first page of :func:`caption_figures`."""
    return caption_figures(image, att, boxes=boxes, methods=methods)[0]


# --- evaluation against ground truth ------------------------------------------------------


def _hit(box: Sequence[float], patch_box: Sequence[float], tolerance: float = 0.0) -> bool:
    cx, cy = (patch_box[0] + patch_box[2]) / 2, (patch_box[1] + patch_box[3]) / 2
    return box[0] - tolerance <= cx < box[2] + tolerance and box[1] - tolerance <= cy < box[3] + tolerance


def evaluate_pointing(adapter: FusionAdapter, scenes: Sequence[SceneImage], *, prompt: str, max_new_tokens: int = 32,
                      progress: Progress = no_progress, keep: int = 0,
                      batch_size: int = 16,
                      perturbation: Sequence[str] = PERTURBATION_METHODS, validate_images: int = 4,
                      stability_images: int = 2, seed: int = 0) -> tuple[dict[str, Any], list]:
    """For every generated word that names exactly one object of its image (a colour or shape
    word in the zoo world): does the argmax patch of its image relevance lie in that object's box
    (patch centre inside the box)? Returns metrics and the first ``keep`` (scene, attribution).
    ``batch_size``: images per generation pass (each is attributed on its own).

    On the words checked in the first ``validate_images`` images, every method is validated on this
    model (``validation``): per-word deletion/insertion against a random order, the randomisation
    sanity check, method agreement; ``metrics["validation"]`` (every method "not shown to be", with the
    reason, where deletion/insertion refuse the model's layout). On the
    first ``stability_images`` of them every method's maps are recomputed under the robustness probe's
    corruptions (teacher-forced on the clean image's caption, so the same words are compared) and their
    rank correlation with the clean maps is reported beside the maps (``validation``'s ``stability``,
    carried into its limitations)."""
    hits: dict[str, list[bool]] = {m: [] for m in METHODS}
    tolerant: dict[str, list[bool]] = {m: [] for m in METHODS}
    chance: list[float] = []
    by_kind: dict[str, dict[str, list[bool]]] = {}
    unmatched = words = 0
    kept: list[tuple[SceneImage, Image.Image, TokenAttribution]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    # (enc, pixel values, generated, checked word indices, {method: [W, G]}, image)
    validation_items: list[tuple] = []
    unvalidated: str | None = None  # why deletion/insertion could not run on this model
    # the colours and shapes this dataset's objects have: a caption naming one of them that its own
    # image lacks is counted as hallucinated
    attributes = {w for s in scenes for o in s.objects for w in (o.colour, o.shape) if w}
    started = time.perf_counter()
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        images = [s.load_image() for s in chunk]
        enc, feats = adapter.prepare(images, prompt)
        with torch.no_grad():
            generated = adapter.generate(adapter.embed(enc.input_ids.expand(len(images), -1), feats), max_new_tokens)
        for k, (scene, image, gen) in enumerate(zip(chunk, images, generated, strict=True)):
            if not gen:
                continue
            pixel_values = adapter.preprocess([image])
            rows = attribute_generated(adapter, enc, feats[k:k + 1], gen, pixel_values=pixel_values,
                                       perturbation=perturbation)
            att = to_attribution(adapter, enc, gen, rows, prompt)
            if len(kept) < keep:
                kept.append((scene, image, att))
            pboxes = adapter.patch_boxes((scene.width, scene.height))
            checked: list[int] = []
            # a word is checked at its first token, where the model commits to it (the rest of a word
            # cut into pieces follows from that first piece)
            for t, _, word in att.words:
                if word in STOPWORDS or not word.isalpha():
                    continue
                named = [o for o in scene.objects if word in o.words]
                if scene.objects[0].colour is not None:  # zoo scenes: only colour and shape words count
                    named = [o for o in named if word in (o.colour, o.shape)]
                    if not named and not any(word in (o.colour, o.shape) for o in scene.objects):
                        if word in attributes:
                            unmatched += 1  # a hallucinated colour/shape: no box to check against
                        continue
                if len(named) != 1:
                    continue
                box = named[0].box
                words += 1
                checked.append(t)
                kind = "colour" if word == named[0].colour else "shape" if word == named[0].shape else "word"
                for method in [m for m in METHODS if m in att.image]:
                    img = att.image[method][t].reshape(-1)
                    hit = _hit(box, pboxes[int(np.argmax(img))])
                    hits[method].append(hit)
                    # the grounding engine's pointing-game tolerance: 15 px at 224 px
                    tolerant[method].append(_hit(box, pboxes[int(np.argmax(img))], 15 * scene.width / 224))
                    by_kind.setdefault(kind, {m: [] for m in METHODS}).setdefault(method, []).append(hit)
                chance.append(float(np.mean([_hit(box, pb) for pb in pboxes])))
            if checked and len(validation_items) < validate_images and unvalidated is None:
                word_maps = {m: torch.as_tensor(att.image[m][checked]).flatten(1) for m in att.image}
                full_maps = {m: torch.as_tensor(att.image[m]).flatten(1) for m in att.image}
                try:
                    got = word_deletion_insertion(adapter, enc, pixel_values, gen, checked, full_maps, seed=seed,
                                                  image=image)
                except (ProbeInputError, UnsupportedModelError) as exc:
                    # a layout deletion/insertion cannot perturb: the methods stay unvalidated, and say why
                    unvalidated = str(exc)
                    continue
                for m, modes in got.items():
                    for mode, values in modes.items():
                        curves.setdefault(m, {"deletion": [], "insertion": []})[mode] += values
                validation_items.append((enc, pixel_values, gen, checked, word_maps, image))
        progress(min(1.0, (start + len(chunk)) / len(scenes)), "attributing generated words")
    metrics: dict[str, Any] = {
        "n_images": len(scenes),
        "n_words": words,
        "hallucinated_words": unmatched,
        "pointing": {m: (float(np.mean(v)) if v else None) for m, v in hits.items() if v or m in ATTENTION_METHODS},
        "random_baseline": float(np.mean(chance)) if chance else None,
        "pointing_15px_tolerance": {m: (float(np.mean(v)) if v else None) for m, v in tolerant.items()},
        "by_word_kind": {k: {m: float(np.mean(v)) for m, v in d.items() if v} | {"n": len(d["chefer"])}
                         for k, d in by_kind.items()},
        "seconds": round(time.perf_counter() - started, 2),
        "criterion": "argmax patch centre inside the named object's box",
    }
    if validation_items:
        stable = _word_stability(adapter, validation_items[:stability_images], perturbation, seed)
        metrics["validation"] = _validate_words(adapter, validation_items, curves, hits, perturbation, seed,
                                                stability=stable)
    elif unvalidated is not None:
        metrics["validation"] = validation.not_run(
            hits, f"deletion and insertion could not run on this model ({unvalidated})", seed=seed)
    return metrics, kept


def _word_stability(adapter: FusionAdapter, items: list[tuple], perturbation: Sequence[str],
                   seed: int) -> dict[str, dict[str, Any]] | None:
    """Per method, ``validation.stability_under`` of its maps for the checked words of ``items`` on the
    clean image and on each of the robustness probe's corruptions (middle severity, as the grounding
    probe uses), the caption teacher-forced on the corrupted image. None without items."""
    from workers.probes import corruptions

    if not items:
        return None
    clean: dict[str, list[torch.Tensor]] = {}
    corrupted: dict[str, dict[str, list[torch.Tensor]]] = {}
    for i, (enc, _, gen, checked, word_maps, image) in enumerate(items):
        for kind in corruptions.CORRUPTIONS:
            changed = adapter.preprocess([corruptions.corrupt(image, kind, 3, seed=seed * 100_003 + i)])
            with torch.no_grad():
                feats = adapter.image_features(changed)
            rows = attribute_generated(adapter, enc, feats, gen, pixel_values=changed, perturbation=perturbation)
            att = to_attribution(adapter, enc, gen, rows, "")
            for m in word_maps:
                if m in att.image:
                    corrupted.setdefault(m, {}).setdefault(kind, []).append(
                        torch.as_tensor(att.image[m][checked]).flatten(1))
        for m, maps in word_maps.items():
            clean.setdefault(m, []).append(maps)
    return {m: validation.stability_under(torch.cat(clean[m]), {k: torch.cat(v) for k, v in by.items()}, seed=seed)
            for m, by in corrupted.items() if all(len(v) == len(items) for v in by.values())}


def _validate_words(adapter: FusionAdapter, items: list[tuple], curves: dict[str, dict[str, list[float]]],
                    hits: dict[str, list[bool]], perturbation: Sequence[str], seed: int, *,
                    stability: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``validation.validate`` over the checked words of the validation images: their curves, every
    method's maps on the same words with the model's weights randomised (teacher-forced on the same
    captions), and agreement between the methods' maps."""
    from workers.probes import sanity

    trained: dict[str, list[torch.Tensor]] = {}
    randomised: dict[str, list[torch.Tensor]] = {}
    with sanity.randomised(adapter.model):
        sanity.randomise_(adapter.model, {n for n, _ in adapter.model.named_parameters()},
                          torch.Generator().manual_seed(seed))
        for enc, pixel_values, gen, checked, word_maps, _ in items:
            with torch.no_grad():
                feats = adapter.image_features(pixel_values)
            rows = attribute_generated(adapter, enc, feats, gen, pixel_values=pixel_values, perturbation=perturbation)
            att = to_attribution(adapter, enc, gen, rows, "")
            for m, maps in word_maps.items():
                if m in att.image:
                    trained.setdefault(m, []).append(maps)
                    randomised.setdefault(m, []).append(torch.as_tensor(att.image[m][checked]).flatten(1))
    maps = {m: torch.cat(v) for m, v in trained.items()}
    checks = {m: validation.randomisation_check(maps[m], torch.cat(randomised[m]), seed=seed) for m in maps}
    per_method = {m: {"hits": hits.get(m), **curves[m]} for m in maps if m in curves}
    return validation.validate(per_method, curves["random"], maps=maps, sanity=checks, seed=seed, stability=stability)


# --- probe kind -------------------------------------------------------------------------------

class TokenAttributionParams(KindParams):
    prompt: str | None = Field(None, min_length=1, max_length=2000,
                               description="the text prompt (default: the zoo captioner's 'describe the image')")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="tokens generated per image")
    limit: Limit = None
    examples: int = Field(3, ge=0, le=32, description="captions shown as figures")
    batch_size: BatchSize = 16
    perturbation: str | list[str] = Field(
        "all", description="perturbation and gradient methods besides the attention ones: 'all' (those that apply to "
                           "the model's layout), 'none' or a list of " + ", ".join(PERTURBATION_METHODS))
    validate_images: int = Field(4, ge=0, le=256, description="images whose object words validate every method on "
                                                              "this model (deletion/insertion, sanity, agreement)")
    stability_images: int = Field(2, ge=0, le=64,
                                  description="of those, images whose maps are recomputed under the robustness "
                                              "probe's corruptions (stability beside the maps)")
    seed: Seed = 0


def load_fusion(model_dir: str, device: str = "cpu") -> FusionAdapter:
    """``suite.load_model`` for token attribution, which explains generated text."""
    from workers.probes import suite

    adapter: FusionAdapter = suite.load_model(model_dir, device, family="fusion")
    return adapter


def default_prompt(adapter: FusionAdapter) -> str:
    from workers.probes.zoo.captioner import PROMPTS

    return PROMPTS[0]


@probe_kind(
    "token_attribution", title="Token attribution (generative models)", section="explain",
    params=TokenAttributionParams, help="generate captions and check each object word's attribution against its box",
    dataset=DatasetArg(help="a dataset folder (annotations.jsonl + scenes.jsonl); default: the zoo's held-out split"),
    glossary={
        "pointing": Metric("Word pointing game", "share of object words whose attribution maximum lies in the box of "
                                                 "the object they name"),
        "random_baseline": Metric("Pointing by chance", "the same share for a random patch"),
        "n_words": Metric("Object words", "generated words that name one object of the dataset"),
        "hallucinated_words": Metric("Hallucinated words", "colour or shape words with no matching object"),
    })
def token_attribution_kind(model_dir: str, dataset_dir: str | None, params: TokenAttributionParams, *,
                           device: str = "cpu", progress: Progress = no_progress) -> ProbeResult:
    """Attribute every generated word; score colour/shape words against ground-truth boxes.
    ``dataset_dir`` None -> the zoo's held-out split."""
    from workers.probes.scenes import load_scenes

    adapter = load_fusion(model_dir, device)
    if dataset_dir is None:
        from workers.probes.zoo import dataset_dir as zoo_dataset

        dataset_dir = str(zoo_dataset("heldout"))
    scenes = load_scenes(dataset_dir, limit=params.limit)
    prompt = params.prompt or default_prompt(adapter)
    perturbation = _applicable(adapter, scenes, prompt, params.perturbation)
    metrics, kept = evaluate_pointing(adapter, scenes, prompt=prompt, max_new_tokens=params.max_new_tokens,
                                      progress=progress, keep=params.examples, batch_size=params.batch_size,
                                      validate_images=params.validate_images, seed=params.seed,
                                      stability_images=params.stability_images,
                                      perturbation=perturbation)
    if params.perturbation in (None, "all") and not perturbation:
        metrics["perturbation_not_run"] = (f"{adapter.architecture} reads the image as tiles, frames, pooled tokens or "
                                           "by cross-attention, not as one grid of the tower's patches, which "
                                           "occlusion and the gradient methods perturb; the attention methods are "
                                           "reported")
    from workers.probes.figures import paged

    figures: dict[str, Figure] = {}
    for i, (scene, img, att) in enumerate(kept):
        figures.update(paged(f"caption_{i}", caption_figures(img, att, boxes=scene.boxes)))
    findings = []
    p = metrics["pointing"]["chefer"]
    if p is None:
        findings.append(Finding("medium", "No generated word could be checked against a box",
                                "The captions named no object of the dataset."))
    elif p < 0.5:
        findings.append(Finding("high", "Generated words are not grounded in the objects they name",
                                f"Only {p:.0%} of object words have their attribution maximum in the object's box."))
    else:
        raw = metrics["pointing"]["raw"]  # None where the family has no raw attention share (cross-attention)
        raw_text = "n/a" if raw is None else f"{raw:.0%}"
        findings.append(Finding("info", "Generated object words point to their objects",
                                f"{p:.0%} of {metrics['n_words']} words (raw attention: "
                                f"{raw_text}; random: {metrics['random_baseline']:.0%})."))
    if metrics["hallucinated_words"]:
        findings.append(Finding("medium", "The model names objects that are not in the image",
                                f"{metrics['hallucinated_words']} colour/shape words had no matching object."))
    summary = (f"Token attribution on {metrics['n_images']} images, {metrics['n_words']} object words: "
               f"pointing {_pct(p)} (gradient x attention) vs {_pct(metrics['pointing']['raw'])} (raw attention), "
               f"random {_pct(metrics['random_baseline'])}; every method: "
               + ", ".join(f"{m} {_pct(v)}" for m, v in metrics["pointing"].items()) + ".")
    if "validation" in metrics:
        summary += f" {validation.summary_line(metrics['validation']).capitalize()}."
        if metrics["validation"].get("not_run"):
            findings.append(Finding("medium", "The attribution methods could not be validated on this model",
                                    f"{metrics['validation']['not_run'][0].upper()}"
                                    f"{metrics['validation']['not_run'][1:]}; the maps are shown labelled as "
                                    "not validated."))
        elif not metrics["validation"]["validated"]:
            findings.append(Finding("medium", "No attribution method was shown faithful on this model",
                                    "On the validation words no method's patch order beat a random order in both "
                                    "deletion and insertion with a sanity check passed; the maps are shown "
                                    "labelled as not validated."))
    return ProbeResult(kind="token_attribution", metrics=metrics, summary=summary, figures=figures, findings=findings)


def _applicable(adapter: FusionAdapter, scenes: Sequence[SceneImage], prompt: str, value: Any) -> tuple[str, ...]:
    """``_perturbation_methods(value)``, except that the default ``"all"`` means all those that apply to
    the model's layout (none where its image tokens are not one grid of the tower's patches); a named
    list is kept, and refused later where it cannot run."""
    methods = _perturbation_methods(value)
    if value not in (None, "all") or not scenes:
        return methods
    pixel_values = adapter.preprocess([scenes[0].load_image()])  # first: the layout follows the image
    return methods if applies_to(adapter, adapter.encode(prompt), pixel_values) else ()


def _perturbation_methods(value: Any) -> tuple[str, ...]:
    """``"all"`` (default), ``"none"`` or a list of ``token_perturbation`` methods."""
    if value in (None, "all"):
        return PERTURBATION_METHODS
    if value in ("none", [], ()):
        return ()
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or any(n not in PERTURBATION_METHODS for n in names):
        raise ProbeInputError(f"perturbation must be 'all', 'none' or a list of {', '.join(PERTURBATION_METHODS)}")
    return tuple(names)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"

"""Per-word attribution of generated text that reaches the pixels: perturbation and gradients.

Attention read in the decoder says where a word's prediction *looked* among the image tokens,
not which pixels it depends on: a vision transformer moves content between patches before the
decoder sees it, and attention weights are not effects. These methods measure effects:

- ``occlusion`` / ``occlusion_2x2``: each patch (or each 2x2 window of patches, slid by one patch
  and averaged back onto the patches it covers) is set to the baseline (0 in the processor's
  normalised space: the mean colour it normalises by), and the drop of every generated word's
  log-probability is read, teacher-forced on the generated caption. One forward pass scores all
  words of a caption, and the occluded copies go through the whole model in batches: ``G /
  batch`` forward passes for ``G`` patches and every word, where a per-patch, per-word loop makes
  ``G x T`` (``benchmarks/token_attribution.py`` measures both, and captum's ``FeatureAblation``).
- ``input_x_gradient`` and ``integrated_gradients`` on the patch embeddings (the output of the
  vision tower's patch projection, before positions are added): ``e * d logit / d e`` summed over
  channels, and Sundararajan et al.'s path integral from the baseline image's embeddings (the
  projection is linear, so this is the pixel-space integral summed per patch). Every word's
  gradient comes from one batched backward pass (vmap over one-hot output gradients).

All return ``[T, gh * gw]`` float32 rows over the vision grid, larger = more evidence for the word.
``word_log_probs`` (scores of many perturbed copies, every word at once) is also what the per-audit
validation's deletion/insertion curves run on (``validation.py``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.probes.adapters.base import Encoded, FusionAdapter, occlude
from workers.probes.errors import ProbeInputError, UnsupportedModelError

#: Methods this module adds to token attribution, in the order they are reported.
METHODS = ("occlusion", "occlusion_2x2", "input_x_gradient", "integrated_gradients")
#: Value hidden patches take in the processor's normalised pixel space (its mean colour).
BASELINE = 0.0


def teacher_forced(enc: Encoded, generated: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [1, N], rows [T], targets [T])``: the prompt plus all but the last generated token, the
    position whose output predicts each generated token, and the generated tokens."""
    if not generated:
        raise ProbeInputError("the model generated no tokens to attribute")
    device = enc.input_ids.device
    gen = torch.tensor([list(generated)], dtype=torch.long, device=device)
    ids = torch.cat([enc.input_ids, gen[:, :-1]], dim=1)
    start = enc.input_ids.shape[1] - 1
    return ids, torch.arange(start, start + len(generated), device=device), gen[0]


#: Decoder layers whose block ``_RowsOnlyLayer`` reproduces: pre-norm attention with rotary
#: positions, then a pre-norm MLP, each added to the residual.
_ROWS_ONLY_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


class _RowsOnlyLayer(torch.nn.Module):
    """A decoder's last layer run for the last ``keep`` positions only.

    Scoring words reads the logits at ``keep`` rows, and the last layer's output elsewhere feeds
    nothing: every earlier position only supplies its keys and values. So the keys and values are
    projected for all positions, and the queries, attention, output projection and MLP for the
    ``keep`` rows; the layer returns ``[B, keep, D]`` (the final norm and the vocabulary
    projection then run on those rows, which ``logits_to_keep`` keeps)."""

    def __init__(self, layer: torch.nn.Module, keep: int, rotary: Any) -> None:
        super().__init__()
        self.layer, self.keep, self.rotary = layer, keep, rotary

    def forward(self, hidden_states: torch.Tensor, *args: Any,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        if position_embeddings is None:
            raise UnsupportedModelError("the decoder passes no rotary position embeddings to its layers")
        layer: Any = self.layer  # a transformers decoder layer: attributes resolved at runtime
        keep = self.keep
        attn = layer.self_attn
        b, n, _ = hidden_states.shape
        hd = int(attn.head_dim)
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x[:, n - keep:]).view(b, keep, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = self.rotary(q, q, cos[:, n - keep:], sin[:, n - keep:])
        k, _ = self.rotary(k, k, cos, sin)
        groups = int(attn.num_key_value_groups)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        causal = torch.arange(n, device=x.device)[None, :] <= torch.arange(n - keep, n, device=x.device)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=float(attn.scaling))
        h = hidden_states[:, n - keep:] + attn.o_proj(out.transpose(1, 2).reshape(b, keep, -1))
        result: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
        return result


def _decoder_layers(adapter: FusionAdapter) -> torch.nn.ModuleList | None:
    """The language model's decoder layers where ``_RowsOnlyLayer`` reproduces the last one, else None."""
    lists = [m for name, m in adapter.causal_lm.named_modules()
             if name.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList) and len(m)
             and type(m[-1]).__name__ in _ROWS_ONLY_LAYERS]
    if len(lists) != 1:
        return None
    layer = lists[0][-1]
    attn = getattr(layer, "self_attn", None)
    config = getattr(attn, "config", None)
    plain = (all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling",
                                             "num_key_value_groups"))
             and not hasattr(attn, "q_norm") and not getattr(config, "sliding_window", None)
             and not getattr(config, "use_sliding_window", False))
    return lists[0] if plain else None


@contextlib.contextmanager
def _last_layer_rows_only(adapter: FusionAdapter, keep: int) -> Iterator[None]:
    """Swap the decoder's last layer for ``_RowsOnlyLayer`` inside (a no-op for other decoders)."""
    layers = _decoder_layers(adapter)
    if layers is None:
        yield
        return
    last = layers[-1]
    rotary = getattr(sys.modules[type(last.self_attn).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        yield
        return
    layers[-1] = _RowsOnlyLayer(last, keep, rotary)
    try:
        yield
    finally:
        layers[-1] = last


def _word_logits(adapter: FusionAdapter, pixel_values: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, *,
                 pruned: bool = False) -> torch.Tensor:
    """Logits ``[n, T, V]`` at the prediction rows for ``n`` images, teacher-forced on ``ids``.

    ``pruned`` skips work whose output the rows never read: vision layers above the feature layer
    (``scoring_image_features``) and the decoder's last layer at every other position
    (``_RowsOnlyLayer``); the logits are the same up to float rounding."""
    n = pixel_values.shape[0]
    keep = ids.shape[1] - int(rows[0])
    if pruned and int(rows[-1]) == ids.shape[1] - 1:
        with adapter.autocast(), _last_layer_rows_only(adapter, keep):
            feats = adapter.scoring_image_features(pixel_values)
            embeds = adapter.embed(ids.expand(n, -1), feats)
            try:
                logits = adapter.causal_lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits
            except TypeError:
                logits = None
        if logits is not None:
            return logits[:, -keep:][:, rows - int(rows[0])]
    with adapter.autocast():
        feats = adapter.image_features(pixel_values)
        embeds = adapter.embed(ids.expand(n, -1), feats)
        try:
            # only the explained rows need the vocabulary projection (a large vocabulary times every
            # position and copy would dominate memory)
            logits = adapter.causal_lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits
        except TypeError:
            logits = adapter.causal_lm(inputs_embeds=embeds, use_cache=False).logits
    return logits[:, -keep:][:, rows - int(rows[0])]


@torch.no_grad()
def word_log_probs(adapter: FusionAdapter, pixel_values: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                   targets: torch.Tensor, *, batch_size: int = 64, pruned: bool = True) -> torch.Tensor:
    """``[n, T]``: log-probability of every generated word (teacher-forced) for each of ``n`` images,
    ``batch_size`` images per forward pass. Runs with the fused attention kernel where the model has
    one (scores need no attention probabilities), and by default without the work the scores never
    read (``_word_logits``' ``pruned``; ``pruned=False`` runs the model's stock forward)."""
    out = []
    with adapter.fused_attention():
        for start in range(0, pixel_values.shape[0], batch_size):
            logits = _word_logits(adapter, pixel_values[start:start + batch_size], ids, rows, pruned=pruned).float()
            logp = torch.log_softmax(logits, dim=-1)
            out.append(logp.gather(-1, targets.view(1, -1, 1).expand(logp.shape[0], -1, 1))[..., 0])
    return torch.cat(out)


def default_batch_size(device: torch.device | str) -> int:
    """Occluded copies per forward pass: small on CPU, where a few copies' activations stay in cache
    and larger batches only add memory traffic; larger on accelerators, which need the parallelism."""
    return 16 if torch.device(device).type == "cpu" else 64


def window_boxes(grid: tuple[int, int], patch: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[W, 4]`` pixel boxes ``(top, bottom, left, right)`` of every ``window x window``-patch window
    at stride one patch, row-major."""
    gh, gw = grid
    if not 1 <= window <= min(gh, gw):
        raise ProbeInputError(f"occlusion window of {window} patches does not fit a {gh}x{gw} grid")
    rs, cs = torch.meshgrid(torch.arange(gh - window + 1), torch.arange(gw - window + 1), indexing="ij")
    r, c = rs.flatten() * patch, cs.flatten() * patch
    return torch.stack([r, r + window * patch, c, c + window * patch], dim=1).to(device)


def window_cover(grid: tuple[int, int], window: int) -> torch.Tensor:
    """``[W, G]`` 1 where window ``w`` covers patch ``g`` (``window_boxes``' order)."""
    gh, gw = grid
    cover = torch.zeros(gh - window + 1, gw - window + 1, gh, gw)
    for i in range(gh - window + 1):
        for j in range(gw - window + 1):
            cover[i, j, i:i + window, j:j + window] = 1.0
    return cover.reshape(-1, gh * gw)


def occlusion_rows(adapter: FusionAdapter, enc: Encoded, pixel_values: torch.Tensor, generated: Sequence[int], *,
                   window: int = 1, batch_size: int | None = None, pruned: bool = True) -> torch.Tensor:
    """``[T, G]``: the drop of each generated word's log-probability when a patch is hidden (for
    ``window > 1``, the mean drop over the windows that hide it). ``batch_size`` defaults to
    ``default_batch_size``; ``pruned`` as in ``word_log_probs``."""
    ids, rows, targets = teacher_forced(enc, generated)
    image = pixel_values[:1]
    batch = batch_size or default_batch_size(image.device)
    clean = word_log_probs(adapter, image, ids, rows, targets, pruned=pruned)  # [1, T]
    boxes = window_boxes(adapter.grid, adapter.patch_size, window, image.device)
    copies = occlude(image, torch.zeros(len(boxes), dtype=torch.long, device=image.device), boxes, BASELINE)
    drops = (clean - word_log_probs(adapter, copies, ids, rows, targets, batch_size=batch, pruned=pruned)).cpu()
    cover = window_cover(adapter.grid, window)  # [W, G]
    return (drops.T @ cover) / cover.sum(0).clamp_min(1.0)


def patch_projection(adapter: FusionAdapter) -> torch.nn.Conv2d:
    """The vision tower's patch projection: the convolution whose kernel and stride are the patch
    size (found by structure, so any ViT-style tower qualifies)."""
    p = adapter.patch_size
    found = [m for m in adapter.model.modules() if isinstance(m, torch.nn.Conv2d)
             and tuple(m.kernel_size) == (p, p) and tuple(m.stride) == (p, p)]
    if len(found) != 1:
        raise UnsupportedModelError(f"cannot find the vision tower's patch projection ({len(found)} convolutions "
                                    f"with a {p}x{p} kernel and stride)")
    return found[0]


def _batched_grad(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[T, *x.shape]``: the gradient of each of the ``T`` scalars ``y`` w.r.t. ``x``, from one vmapped
    backward pass (a loop where a kernel has no batching rule; the same numbers)."""
    t = y.shape[0]
    try:
        return torch.autograd.grad(y, x, grad_outputs=torch.eye(t, dtype=y.dtype, device=y.device),
                                   is_grads_batched=True)[0]
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return torch.stack([torch.autograd.grad(y[k], x, retain_graph=k < t - 1)[0] for k in range(t)])


def _logits_with_embeddings(adapter: FusionAdapter, pixel_values: torch.Tensor, embeddings: torch.Tensor,
                            ids: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[n, T]`` target logits with the patch projection's output replaced by ``embeddings``."""
    conv = patch_projection(adapter)
    handle = conv.register_forward_hook(lambda module, args, output: embeddings.to(output.dtype))
    try:
        logits = _word_logits(adapter, pixel_values, ids, rows).float()
    finally:
        handle.remove()
    return logits.gather(-1, targets.view(1, -1, 1).expand(logits.shape[0], -1, 1))[..., 0]


def gradient_rows(adapter: FusionAdapter, enc: Encoded, pixel_values: torch.Tensor, generated: Sequence[int], *,
                  steps: int = 16) -> dict[str, torch.Tensor]:
    """``{"input_x_gradient": [T, G], "integrated_gradients": [T, G]}`` for one image ``[1, 3, S, S]``;
    ``steps`` points (midpoint rule) on the integral's straight path, run as one batch."""
    if steps < 1:
        raise ProbeInputError("integrated gradients needs at least one step")
    ids, rows, targets = teacher_forced(enc, generated)
    image = pixel_values[:1]
    conv = patch_projection(adapter)
    with torch.no_grad():
        e = conv(image.to(conv.weight.dtype)).float()  # [1, D, gh, gw]
        e0 = conv(torch.full_like(image, BASELINE).to(conv.weight.dtype)).float()
    out = {}
    with torch.enable_grad():
        x = e.clone().requires_grad_(True)
        y = _logits_with_embeddings(adapter, image, x, ids, rows, targets)[0]  # [T]
        g = _batched_grad(y, x)[:, 0]  # [T, D, gh, gw]
        out["input_x_gradient"] = (g * e).sum(1).flatten(1).detach().cpu()
        alphas = (torch.arange(steps, device=e.device, dtype=e.dtype) + 0.5) / steps
        path = (e0 + alphas.view(-1, 1, 1, 1) * (e - e0)).requires_grad_(True)  # [m, D, gh, gw]
        y = _logits_with_embeddings(adapter, image.expand(steps, -1, -1, -1), path, ids, rows, targets)  # [m, T]
        g = _batched_grad(y.sum(0), path).mean(1)  # [T, D, gh, gw]: every copy's gradient, averaged
        out["integrated_gradients"] = (g * (e - e0)).sum(1).flatten(1).detach().cpu()
    return out


def applies_to(adapter: FusionAdapter, enc: Encoded, pixel_values: torch.Tensor) -> bool:
    """Whether these methods can run: they perturb one image on the vision tower's own patch grid.
    Tiled or framed layouts (several crops per image, mapped to regions through ``enc.regions``)
    have several grids per image, which occluding one grid's patches would not explain; pooled
    layouts (image tokens coarser than the tower's patches) have no patch projection on their grid."""
    if pixel_values.dim() != 4 or getattr(enc, "regions", None) is not None:
        return False
    try:
        patch_projection(adapter)
    except UnsupportedModelError:
        return False
    return True


def perturbation_attribution(adapter: FusionAdapter, enc: Encoded, pixel_values: torch.Tensor,
                             generated: Sequence[int], *, methods: Sequence[str] = METHODS,
                             batch_size: int | None = None, ig_steps: int = 16) -> dict[str, torch.Tensor]:
    """Every requested method of this module: ``{method: [T, G]}``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ProbeInputError(f"unknown attribution method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if methods and not applies_to(adapter, enc, pixel_values):
        raise ProbeInputError(f"{adapter.architecture}: perturbation attribution ({', '.join(methods)}) needs one "
                              "image whose tokens are the vision tower's patches; this family tiles, frames or "
                              "pools the image, so use the attention methods or perturbation='none'")
    out: dict[str, torch.Tensor] = {}
    if "occlusion" in methods:
        out["occlusion"] = occlusion_rows(adapter, enc, pixel_values, generated, window=1, batch_size=batch_size)
    if "occlusion_2x2" in methods and min(adapter.grid) >= 2:
        out["occlusion_2x2"] = occlusion_rows(adapter, enc, pixel_values, generated, window=2, batch_size=batch_size)
    if {"input_x_gradient", "integrated_gradients"} & set(methods):
        grads = gradient_rows(adapter, enc, pixel_values, generated, steps=ig_steps)
        out.update({m: v for m, v in grads.items() if m in methods})
    return out


def _patch_pixels(keep: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """``[n, G]`` bool patch masks -> ``[n, 1, S, S]`` pixel masks."""
    gh, gw = grid
    return keep.view(-1, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def region_masked_copies(adapter: FusionAdapter, image: Image.Image, keep: torch.Tensor) -> torch.Tensor:
    """Pixel values of ``image`` once per row of ``keep`` ``[n, G]``: the regions of ``adapter.grid``
    (``patch_boxes`` of the stored image) a row leaves out are painted in the image processor's mean
    colour (what normalises to ``BASELINE``) before preprocessing. For layouts whose image tokens are
    not one grid of the tower's patches (tiles, frames plus a global view), hiding a region of the
    stored image hides it in every tile or frame that shows it."""
    ip = getattr(adapter.processor, "image_processor", None)
    mean = getattr(ip, "image_mean", None) or (0.5, 0.5, 0.5)
    fill = np.array([round(255 * float(m)) for m in mean], dtype=np.uint8)
    base = np.asarray(image.convert("RGB")).copy()
    boxes = np.rint(adapter.patch_boxes(image.size)).astype(int)
    copies = []
    for row in keep.cpu().numpy():
        arr = base.copy()
        for x0, y0, x1, y1 in boxes[~row]:
            arr[y0:y1, x0:x1] = fill
        copies.append(Image.fromarray(arr))
    return adapter.preprocess(copies)


def word_deletion_insertion(adapter: FusionAdapter, enc: Encoded, pixel_values: torch.Tensor,
                            generated: Sequence[int], words: Sequence[int], maps: dict[str, torch.Tensor], *,
                            steps: int = 8, seed: int = 0, batch_size: int = 64,
                            image: Image.Image | None = None) -> dict[str, dict[str, list[float]]]:
    """Deletion and insertion AUCs per word for each method's order, and for a random order.

    For word ``t`` in ``words`` and each method's map row ``maps[m][t]`` ``[G]``: hide the patches in
    decreasing relevance (deletion) or reveal them on the baseline image in that order (insertion),
    ``steps`` points from none to all, scoring the word's probability teacher-forced on the caption.
    The random order is seeded per word (``seed``, word index). Returns ``{m: {"deletion": [...],
    "insertion": [...]}}`` in ``words``' order, with ``"random"`` added. Where the image tokens are not
    one grid of the tower's patches (``applies_to`` is False), the regions are hidden in the stored
    ``image`` (``region_masked_copies``), which must then be given."""
    ids, rows, targets = teacher_forced(enc, generated)
    g = adapter.grid[0] * adapter.grid[1]
    counts = torch.linspace(0, g, steps + 1).round().long()
    orders: dict[str, list[torch.Tensor]] = {m: [torch.as_tensor(maps[m][t]).flatten().float().argsort(descending=True)
                                                for t in words] for m in maps}
    orders["random"] = [torch.randperm(g, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(t)))
                        for t in words]
    ranks = torch.arange(g)
    masks, owners = [], []
    for m, per_word in orders.items():
        for w, order in enumerate(per_word):
            position = torch.empty(g, dtype=torch.long)
            position[order] = ranks
            first = position[None, :] < counts[:, None]  # [steps + 1, G]: the first k patches of the order
            masks += [~first, first]  # deletion keeps the rest; insertion keeps the first k
            owners.append((m, w))
    keep = torch.cat(masks)  # [2 * pairs * (steps + 1), G]
    if applies_to(adapter, enc, pixel_values):
        first = pixel_values[:1]
        pix = _patch_pixels(keep.to(first.device), adapter.grid, adapter.patch_size).to(first.dtype)
        copies = first * pix + BASELINE * (1 - pix)
    elif image is not None:
        copies = region_masked_copies(adapter, image, keep)
    else:
        raise ProbeInputError(f"{adapter.architecture}: its image tokens are not one grid of patches; deletion and "
                              "insertion hide regions of the stored image, which was not given")
    probs = word_log_probs(adapter, copies, ids, rows, targets, batch_size=batch_size).exp().cpu()  # [n, T]
    fractions = counts.float() / g
    out: dict[str, dict[str, list[float]]] = {m: {"deletion": [], "insertion": []} for m in orders}
    per = steps + 1
    for k, (m, w) in enumerate(owners):
        t = int(words[w])
        block = probs[2 * k * per:(2 * k + 2) * per, t]
        for mode, curve in (("deletion", block[:per]), ("insertion", block[per:])):
            out[m][mode].append(float(torch.trapezoid(curve, fractions)))
    return out

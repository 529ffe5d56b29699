"""Causal interventions: is a component, or a region's features, responsible for an output?

Head ablation: zero or mean-ablate one attention head (its slice of the input of the layer's
output projection) and measure the change in the output: the mean log-probability of the
model's own generated tokens for fusion models (teacher-forced), the paired image-text
similarity for dual encoders. Heads are ranked by the mean change; each comes with Cohen's d
(mean / sd of the per-image change) and the number of cases. Mean ablation uses the head's
mean output over the same inputs (every position of a real token: padding is left out; for dual
encoders every image and every distinct prompt once), which keeps the activation scale realistic.

Feature swap: replace the visual features of one object's patches with those of an object of
the same shape but another colour taken from another image (cells resampled onto the target's
cell rectangle), and see whether the output follows the donor. By default the swap happens at the
vision tower's patch embeddings (before position embeddings are added), so every later layer sees
the donor's pixels at the target's place; fusion models can also be edited at the language
model's visual tokens (``site="projector"``). Fusion models: a case counts as "changed" when the
regenerated text names the donor's colour and no longer the target's (colours are distinct within
a scene and the donor's colour is absent from it, so the colour word alone identifies the object;
the shape word is left out of the criterion because a swap can also disturb it). Dual encoders:
"changed" when the similarity now prefers "a <donor colour> <shape>" to "a <colour> <shape>".
The control writes the same donor features onto as many *background* cells (no object there):
a model that reads colour from the object's location changes in the first case and not in the
second. The effect size is the difference of the two rates (with Cohen's h and Fisher's exact p).

Shapes: ``n`` images, ``G = gh * gw`` cells, ``D`` feature width.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.stats import fisher_exact

from workers.probes.adapters.base import HFModule, numbered_modules
from workers.probes.attention_stats import patch_boxes
from workers.probes.errors import ProbeInputError, UnsupportedModelError
from workers.probes.kinds import BatchSize, DatasetArg, KindParams, Limit, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from workers.probes.scenes import SceneImage

KINDS = ("head-ablation", "feature-swap")

#: One teacher-forced batch of clean generations: ``(embeds_fn, ids [B, W], mask [B, W], rows, targets)``
#: where ``embeds_fn()`` recomputes the joint embeddings and ``rows[b]`` are the positions whose
#: next-token log-probabilities score the generated tokens ``targets[b]``.
FusionBatch = tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


# --- head ablation -----------------------------------------------------------------------------


@contextmanager
def ablated_head(module: torch.nn.Module, head: int, n_heads: int,
                 replacement: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, head ``head``'s slice of ``module``'s input is zero (or ``replacement``)."""

    def pre_hook(_mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        width = x.shape[-1] // n_heads
        x = x.clone()
        sl = slice(head * width, (head + 1) * width)
        x[..., sl] = 0.0 if replacement is None else replacement[sl].to(x.dtype)
        return (x, *args[1:])

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded_means(modules: Sequence[torch.nn.Module], sums: list[torch.Tensor], counts: list[int],
                   masks: Sequence[Callable[[], torch.Tensor | None]] | None = None) -> Iterator[None]:
    """Accumulate the mean input of each module (over batch and positions) into ``sums``/``counts``.

    ``masks[i]()``, where given, is the ``[B, T]`` attention mask of the sequence module ``i`` is
    reading at the time; its padded positions (0) are left out. A padding position's activation is
    nothing the model meets on real input, and how many there are depends on which captions share a
    batch, so counting them would bias mean ablation and make it depend on the batch size."""

    def make(i: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def pre_hook(_mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            mask = masks[i]() if masks is not None else None
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            sums[i] += rows.sum(0).float().cpu()  # sums live on the CPU
            counts[i] += rows.shape[0]
        return pre_hook

    handles = [m.register_forward_pre_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def components(adapter: Any) -> dict[str, tuple[list[torch.nn.Module], int]]:
    """``{component: (output projection per layer, heads per layer)}`` that can be ablated."""
    if adapter.kind == "fusion":
        return {c: (adapter.head_projections(c), adapter.heads(c)) for c in adapter.components}
    out: dict[str, tuple[list[torch.nn.Module], int]] = {}
    for comp, pattern in (("vision", r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj$"),
                          ("text", r"text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj$")):
        mods = numbered_modules(adapter.model, pattern)
        if mods:
            heads = (adapter.num_heads if comp == "vision"
                     else int(getattr(getattr(adapter.model.config, "text_config", None), "num_attention_heads", 0)))
            if heads:
                out[comp] = (mods, heads)
    if not out:
        raise UnsupportedModelError("cannot find the attention output projections (out_proj) to ablate heads")
    return out


def _fusion_outcome(adapter: Any, batches: Sequence[FusionBatch],
                    masks: dict[str, torch.Tensor | None]) -> Callable[[], np.ndarray]:
    """A function returning, per image, the mean log-prob of its (clean) generated tokens. While the
    language model runs, ``masks["decoder"]`` is its batch's attention mask (``recorded_means``)."""

    def outcome() -> np.ndarray:
        values = []
        with torch.no_grad():
            for embeds_fn, ids, mask, rows, targets in batches:
                embeds = embeds_fn()
                masks["decoder"] = mask
                try:
                    logits = adapter.language_logits(embeds, mask)
                finally:
                    masks["decoder"] = None
                logp = torch.log_softmax(logits.float(), -1)
                for b in range(ids.shape[0]):
                    values.append(float(logp[b, rows[b], targets[b]].mean()))
        return np.array(values)

    return outcome


def _fusion_batches(adapter: Any, scenes: Sequence[SceneImage], prompt: str, max_new_tokens: int,
                    batch_size: int) -> list[FusionBatch]:
    """Clean generations, packed as right-padded teacher-forced batches (causal: padding at the
    end never changes earlier positions)."""
    batches: list[FusionBatch] = []
    pad = adapter.tokenizer.pad_token_id or 0
    for start in range(0, len(scenes), batch_size):
        images = [s.load_image() for s in scenes[start:start + batch_size]]
        enc, feats = adapter.prepare(images, prompt)
        with torch.no_grad():
            gens = adapter.generate(adapter.embed(enc.input_ids.expand(len(images), -1), feats), max_new_tokens)
        gens = [g or [adapter.eos_token_id] for g in gens]
        p = enc.input_ids.shape[1]
        width = p + max(len(g) for g in gens) - 1
        ids = torch.full((len(images), width), pad, dtype=torch.long, device=adapter.device)
        mask = torch.zeros_like(ids)
        rows, targets = [], []
        for b, g in enumerate(gens):
            seq = enc.input_ids[0].tolist() + g[:-1]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            rows.append(torch.arange(p - 1, p - 1 + len(g)))
            targets.append(torch.tensor(g))
        # Image features are recomputed inside each call so that vision-tower ablations act.
        pixel_values = adapter.preprocess(images)

        def embeds_fn(ids: torch.Tensor = ids, pixel_values: torch.Tensor = pixel_values) -> torch.Tensor:
            return adapter.embed(ids, adapter.image_features(pixel_values))

        batches.append((embeds_fn, ids, mask, rows, targets))
    return batches


def _dual_outcome(adapter: Any, scenes: Sequence[SceneImage], batch_size: int,
                  masks: dict[str, torch.Tensor | None]) -> tuple[Callable[[], np.ndarray], Callable[[], None]]:
    """``(outcome, inputs)``: ``outcome()`` returns each image's image-text score; ``inputs()`` runs
    both towers once over what mean ablation averages: every image, and every distinct prompt once.
    (A scoring pass encodes each batch's distinct prompts, so averaging over the scoring passes
    would weight a prompt by the number of batches it turns up in.) While the text tower runs,
    ``masks["text"]`` is the attention mask of the prompts it encodes (``recorded_means``)."""
    chunks = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        chunks.append((adapter.preprocess([s.load_image() for s in chunk]), [s.prompt for s in chunk]))

    @contextmanager
    def text_tower_runs(prompts: Sequence[str]) -> Iterator[None]:
        # The adapter caches text embeddings: served from the cache, an ablated text head would
        # change nothing, and an ablated embedding left there would reach whatever uses the
        # (worker-cached) adapter next. So the text tower runs each time, from an empty cache.
        adapter.clear_caches()
        masks["text"] = adapter.tokenize(list(dict.fromkeys(prompts)))[1]  # what text_embeds encodes
        try:
            yield
        finally:
            masks["text"] = None
            adapter.clear_caches()

    def outcome() -> np.ndarray:
        values = []
        with torch.no_grad():
            for pv, prompts in chunks:
                with text_tower_runs(prompts):
                    values.append(adapter.score(pv, prompts).float().cpu().numpy())
        return np.concatenate(values)

    def inputs() -> None:
        distinct = list(dict.fromkeys(s.prompt for s in scenes))
        with torch.no_grad():
            for pv, _ in chunks:
                adapter.image_embeds(pv)
            for start in range(0, len(distinct), batch_size):
                with text_tower_runs(distinct[start:start + batch_size]):
                    adapter.text_embeds(distinct[start:start + batch_size])

    return outcome, inputs


def head_ablation(adapter: Any, scenes: Sequence[SceneImage], *, mode: str = "zero", prompt: str | None = None,
                  max_new_tokens: int = 32, batch_size: int = 16, progress: Progress = no_progress) -> dict[str, Any]:
    """Ablate every head of every component in turn; rank heads by the mean change of the output.
    ``batch_size``: images per forward pass."""
    if mode not in ("zero", "mean"):
        raise ProbeInputError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    started = time.perf_counter()
    comps = components(adapter)
    # Per component, the attention mask of the padded sequence it is reading, while it reads one.
    masks: dict[str, torch.Tensor | None] = {}
    if adapter.kind == "fusion":
        batches = _fusion_batches(adapter, scenes, prompt or _default_prompt(), max_new_tokens, batch_size)
        outcome = _fusion_outcome(adapter, batches, masks)
        inputs: Callable[[], Any] = outcome  # the clean pass reads each image's real tokens once
        measure = "mean log-probability of the generated tokens"
    else:
        outcome, inputs = _dual_outcome(adapter, scenes, batch_size, masks)
        measure = "image-text similarity (logit-scaled)"
    all_mods: list[HFModule] = [m for mods, _ in comps.values() for m in mods]
    sums = [torch.zeros(m.in_features) for m in all_mods]
    counts = [0] * len(all_mods)
    mask_of = [lambda comp=comp: masks.get(comp) for comp, (mods, _) in comps.items() for _m in mods]
    with recorded_means(all_mods, sums, counts, mask_of):
        recorded = inputs()
    clean = recorded if inputs is outcome else outcome()
    means = {id(m): s / max(c, 1) for m, s, c in zip(all_mods, sums, counts, strict=True)}
    total = sum(len(mods) * h for mods, h in comps.values())
    rows: list[dict[str, Any]] = []
    done = 0
    for comp, (mods, n_heads) in comps.items():
        for layer, module in enumerate(mods):
            for head in range(n_heads):
                with ablated_head(module, head, n_heads, means[id(module)] if mode == "mean" else None):
                    delta = outcome() - clean
                sd = float(delta.std(ddof=1)) if len(delta) > 1 else float("nan")
                rows.append({"component": comp, "layer": layer, "head": head,
                             "mean_change": round(float(delta.mean()), 5),
                             "sd": round(sd, 5), "cohens_d": round(float(delta.mean()) / sd, 3) if sd > 0 else None,
                             "n": int(len(delta))})
                done += 1
                progress(done / total, f"ablating {comp} heads")
    ranked = sorted(rows, key=lambda r: r["mean_change"] if adapter.kind == "fusion" else -abs(r["mean_change"]))
    if adapter.kind != "fusion":
        ranked = sorted(rows, key=lambda r: -abs(r["mean_change"]))
    return {"kind": "head-ablation", "mode": mode, "model_kind": adapter.kind, "measure": measure,
            "n_cases": int(len(clean)), "clean_mean": round(float(clean.mean()), 5), "heads": ranked,
            "top": ranked[:5], "seconds": round(time.perf_counter() - started, 2)}


# --- feature swap -------------------------------------------------------------------------------


def object_cells(box: Sequence[float], pboxes: np.ndarray, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Grid cells ``(row, col)`` whose patch overlaps ``box`` (row-major order)."""
    gh, gw = grid
    x0, y0, x1, y1 = box
    return [(j // gw, j % gw) for j, pb in enumerate(pboxes)
            if pb[0] < x1 and pb[2] > x0 and pb[1] < y1 and pb[3] > y0]


def background_cells(boxes: Sequence[Sequence[float]], pboxes: np.ndarray,
                     grid: tuple[int, int]) -> list[tuple[int, int]]:
    occupied = {c for b in boxes for c in object_cells(b, pboxes, grid)}
    gh, gw = grid
    return [(r, c) for r in range(gh) for c in range(gw) if (r, c) not in occupied]


def resample_cells(target: list[tuple[int, int]], donor: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each target cell, the donor cell at the same relative position in the donor's rectangle."""
    tr0, tc0 = min(r for r, _ in target), min(c for _, c in target)
    th, tw = max(r for r, _ in target) - tr0 + 1, max(c for _, c in target) - tc0 + 1
    dr0, dc0 = min(r for r, _ in donor), min(c for _, c in donor)
    dh, dw = max(r for r, _ in donor) - dr0 + 1, max(c for _, c in donor) - dc0 + 1
    return [(dr0 + min(dh - 1, int((r - tr0) * dh / th)), dc0 + min(dw - 1, int((c - tc0) * dw / tw)))
            for r, c in target]


def swap_cases(scenes: Sequence[SceneImage]) -> list[tuple[int, Any, int, Any]]:
    """``(image i, target object, donor image j, donor object)``: the target is the image's first
    drawn object; the donor has the same shape and a colour absent from image i."""
    if not scenes or scenes[0].objects[0].colour is None:
        raise ProbeInputError("feature swap needs scenes with per-object colours and shapes "
                              "(the zoo's scenes.jsonl next to annotations.jsonl)")
    cases = []
    for i, scene in enumerate(scenes):
        target = scene.objects[0]
        colours = {o.colour for o in scene.objects}
        for step in range(1, len(scenes)):
            j = (i + step) % len(scenes)
            donor = next((o for o in scenes[j].objects if o.shape == target.shape and o.colour not in colours), None)
            if donor is not None:
                cases.append((i, target, j, donor))
                break
    return cases


def _words(text: str) -> list[str]:
    return text.replace(",", " ").lower().split()


SITES = ("patch-embedding", "projector")


def feature_swap(adapter: Any, scenes: Sequence[SceneImage], *, prompt: str | None = None, max_new_tokens: int = 32,
                 seed: int = 0, site: str = "patch-embedding", progress: Progress = no_progress) -> dict[str, Any]:
    """Object-patch swap vs background-patch control (see the module docstring).

    ``site``: "patch-embedding" (default; the vision tower's patch embeddings before position
    embeddings are added, so every later layer sees the donor's pixels at the target's place) or
    "projector" (fusion models: the language model's visual tokens, after the vision tower has
    already mixed information between patches).
    """
    if site not in SITES:
        raise ProbeInputError(f"feature-swap site must be one of {', '.join(SITES)}, got {site!r}")
    # an architecture whose image tokens or patches are not one grid at this site says why
    refusal = adapter.feature_swap_refusal(site) if hasattr(adapter, "feature_swap_refusal") else None
    if refusal:
        raise UnsupportedModelError(refusal)
    fusion = adapter.kind == "fusion"
    if site == "projector" and not fusion:
        raise ProbeInputError("the 'projector' site exists only in generative (fusion) models")
    if site == "projector" and not adapter.patch_aligned:
        raise UnsupportedModelError(
            f"feature swap at the 'projector' site needs one language-model image token per patch; "
            f"{adapter.architecture}'s image tokens are learned queries that each read the whole image, so "
            "there is no object token to swap. Use site 'patch-embedding'.")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    cases = swap_cases(scenes)
    prompt = prompt or (_default_prompt() if fusion else None)
    grid = adapter.grid
    feats_cache: dict[int, torch.Tensor] = {}

    def feats(i: int) -> torch.Tensor:
        """``[G, D]`` features of image i at the swap site (grid cells in row-major order)."""
        if i not in feats_cache:
            pv = adapter.preprocess([scenes[i].load_image()])
            with torch.no_grad():
                if site == "projector":
                    feats_cache[i] = adapter.image_features(pv)[0, adapter.image_token_prefix:]
                else:
                    feats_cache[i] = _patch_embeddings(adapter, pv)
        return feats_cache[i]

    results: dict[str, list[bool]] = {"object": [], "background": []}
    records: list[dict[str, Any]] = []
    for n, (i, target, j, donor) in enumerate(cases):
        scene = scenes[i]
        pb_i = patch_boxes(adapter, scene.width, scene.height)
        pb_j = patch_boxes(adapter, scenes[j].width, scenes[j].height)
        t_cells = object_cells(target.box, pb_i, grid)
        d_cells = object_cells(donor.box, pb_j, grid)
        bg = background_cells(scene.boxes, pb_i, grid)
        if not t_cells or not d_cells or not bg:
            continue
        mapped = resample_cells(t_cells, d_cells)
        pick = rng.choice(len(bg), size=min(len(t_cells), len(bg)), replace=False)
        bg_cells = [bg[k] for k in sorted(pick)]
        base, dfeat = feats(i), feats(j)
        pv = adapter.preprocess([scene.load_image()])
        if fusion:
            caption = _swap_run(adapter, pv, base, site, prompt, max_new_tokens)
            assert isinstance(caption, str)  # fusion models answer with the generated text
            clean = _words(caption)
            if target.colour not in clean or donor.colour in clean:
                continue  # the model does not name the target's colour (or already names the donor's)
        elif not _swap_run(adapter, pv, base, site, (target.colour, donor.colour, target.shape)):
            continue  # the dual encoder does not prefer the right colour to begin with
        outcome: dict[str, str | bool] = {}
        for kind, cells in (("object", t_cells), ("background", bg_cells)):
            edited = base.clone()
            for (r, c), (dr, dc) in zip(cells, mapped, strict=False):
                edited[r * grid[1] + c] = dfeat[dr * grid[1] + dc]
            if fusion:
                text = _swap_run(adapter, pv, edited, site, prompt, max_new_tokens)
                assert isinstance(text, str)
                w = _words(text)
                changed = donor.colour in w and target.colour not in w
                outcome[kind] = text
            else:
                changed = not _swap_run(adapter, pv, edited, site, (target.colour, donor.colour, target.shape))
                outcome[kind] = changed
            results[kind].append(bool(changed))
        if len(records) < 20:
            records.append({"image": scene.image_path.name, "target": f"{target.colour} {target.shape}",
                            "donor": f"{donor.colour} {donor.shape}", "donor_image": scenes[j].image_path.name,
                            "cells": len(t_cells), **{f"{k}_swap": v for k, v in outcome.items()}})
        progress((n + 1) / len(cases), "swapping features")
    obj, bgr = np.array(results["object"], dtype=bool), np.array(results["background"], dtype=bool)
    n_cases = int(len(obj))
    if n_cases == 0:
        raise ProbeInputError("no usable feature-swap case: the model never named a target object correctly")
    p1, p0 = float(obj.mean()), float(bgr.mean())
    table = [[int(obj.sum()), int(n_cases - obj.sum())], [int(bgr.sum()), int(n_cases - bgr.sum())]]
    return {
        "kind": "feature-swap", "model_kind": adapter.kind, "site": site,
        "n_candidates": len(cases), "n_cases": n_cases,
        "object_swap_changed": round(p1, 4), "background_swap_changed": round(p0, 4),
        "effect_size": {"rate_difference": round(p1 - p0, 4),
                        "cohens_h": round(2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p0)), 4),
                        "fisher_p": float(fisher_exact(table)[1])},
        "criterion": ("regenerated text names the donor's colour and no longer the target's" if fusion
                      else "similarity prefers 'a <donor colour> <shape>' to 'a <colour> <shape>'"),
        "examples": records, "seconds": round(time.perf_counter() - started, 2),
    }


def _patch_module(adapter: Any) -> torch.nn.Module:
    for name, module in adapter.model.named_modules():
        if re.search(r"(?:vision_model|vision_tower)\.embeddings\.patch_embedding$", name):
            return module
    raise UnsupportedModelError("cannot find the vision patch embedding (embeddings.patch_embedding) to swap features")


def _patch_embeddings(adapter: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[G, D]``: the patch-embedding convolution's output for one image (row-major cells)."""
    captured: dict[str, torch.Tensor] = {}
    handle = _patch_module(adapter).register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach()))
    try:
        if adapter.kind == "fusion":
            adapter.image_features(pixel_values)
        else:
            adapter.image_embeds(pixel_values)
    finally:
        handle.remove()
    x = captured["x"]  # [1, D, gh, gw]
    return x[0].flatten(1).T.contiguous()


def _swap_run(adapter: Any, pixel_values: torch.Tensor, features: torch.Tensor, site: str,
              prompt_or_colours: Any, max_new_tokens: int = 32) -> str | bool:
    """Run the model with the site's features replaced by ``features`` ``[G, D]``. Fusion: the
    generated text; dual encoder: whether it prefers the first colour's prompt to the second's."""
    with torch.no_grad():
        if site == "projector":
            full = adapter.image_features(pixel_values)[0].clone()
            full[adapter.image_token_prefix:] = features
            enc = adapter.encode(prompt_or_colours)
            ids = adapter.generate(adapter.embed(enc.input_ids, full[None]), max_new_tokens)[0]
            return adapter.decode(ids)
        gh, gw = adapter.grid
        replacement = features.T.reshape(1, -1, gh, gw)
        handle = _patch_module(adapter).register_forward_hook(lambda m, a, out: replacement.to(out.dtype))
        try:
            if adapter.kind == "fusion":
                enc = adapter.encode(prompt_or_colours)
                ids = adapter.generate(adapter.embed(enc.input_ids, adapter.image_features(pixel_values)),
                                       max_new_tokens)[0]
                return adapter.decode(ids)
            colour, other, shape = prompt_or_colours
            scores = adapter.score_matrix(pixel_values, [f"a {colour} {shape}", f"a {other} {shape}"])[0]
            return bool(scores[0] > scores[1])
        finally:
            handle.remove()


def _default_prompt() -> str:
    from workers.probes.zoo.captioner import PROMPTS

    return PROMPTS[0]


# --- probe kind ----------------------------------------------------------------------------------

class InterventionParams(KindParams):
    kind: Literal["head-ablation", "feature-swap"] = Field(description="which intervention")
    mode: Literal["zero", "mean"] = Field("zero", description="head ablation: replace a head's output by zeros "
                                                              "or by its mean")
    prompt: str | None = Field(None, min_length=1, max_length=2000,
                               description="generative models: the prompt (default 'describe the image')")
    limit: Limit = None
    max_new_tokens: int = Field(32, ge=1, le=1024, description="tokens generated per image")
    seed: Seed = 0
    site: Literal["patch-embedding", "projector"] = Field("patch-embedding", description="feature swap: where "
                                                                                         "features are replaced")
    batch_size: BatchSize = 16


@probe_kind(
    "intervention", title="Causal interventions", section="explain", params=InterventionParams,
    help="head ablation and feature swap interventions", command="intervene",
    dataset=DatasetArg(help="a dataset folder (annotations.jsonl + scenes.jsonl); default: the zoo's held-out split"),
    glossary={
        "mean_change": Metric("Mean change", "mean change of the measured output when a head is ablated"),
        "cohens_d": Metric("Cohen's d", "effect size of the ablation"),
        "object_swap_changed": Metric("Object swap changed the output", "share of cases where swapping the object's "
                                                                        "patches changed the output to the donor"),
        "background_swap_changed": Metric("Background swap changed the output", "the same for as many background "
                                                                                "patches (the control)"),
    })
def intervention_kind(model_dir: str, dataset_dir: str | None, params: InterventionParams, *, device: str = "cpu",
                      progress: Progress = no_progress) -> ProbeResult:
    """Head ablation or feature swap on a scenes dataset (``None``: the zoo's held-out split)."""
    from workers.probes.scenes import load_scenes
    from workers.probes.suite import load_model

    adapter = load_model(model_dir, device)
    if dataset_dir is None:
        from workers.probes.zoo import dataset_dir as zoo_dataset

        dataset_dir = str(zoo_dataset("heldout"))
    scenes = load_scenes(dataset_dir, limit=params.limit)
    if params.kind == "head-ablation":
        metrics = head_ablation(adapter, scenes, mode=params.mode, prompt=params.prompt,
                                max_new_tokens=params.max_new_tokens, batch_size=params.batch_size, progress=progress)
        return _ablation_result(metrics)
    metrics = feature_swap(adapter, scenes, prompt=params.prompt, max_new_tokens=params.max_new_tokens,
                           seed=params.seed, site=params.site, progress=progress)
    return _swap_result(metrics)


def _ablation_result(m: dict[str, Any]) -> ProbeResult:
    from workers.probes import figures

    heads = m["heads"]
    fig = figures.new_figure(7, 0.22 * len(heads) + 1.2)
    ax = fig.add_subplot()
    labels = [f"{h['component']} L{h['layer']}H{h['head']}" for h in heads]
    ax.barh(range(len(heads)), [h["mean_change"] for h in heads],
            xerr=[h["sd"] / math.sqrt(h["n"]) if h["n"] > 1 else 0 for h in heads], color="tab:red")
    ax.set_yticks(range(len(heads)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"change in {m['measure']} ({m['mode']}-ablation; mean ± s.e., n={m['n_cases']})")
    figures.describe(fig, f"Effect of {m['mode']}-ablating each attention head",
                     rows="one head each (component, layer L, head H), largest effect first",
                     axes=f"x, mean change in the {m['measure']} over {m['n_cases']} images, with its standard error")
    top = m["top"][0]
    summary = (f"{m['mode'].capitalize()}-ablating each of {len(heads)} heads on {m['n_cases']} images: "
               f"largest effect {top['component']} L{top['layer']}H{top['head']} changes the {m['measure']} by "
               f"{top['mean_change']:+.3f} (Cohen's d {top['cohens_d']}).")
    findings = [Finding("info", "Most influential heads", "; ".join(
        f"{h['component']} L{h['layer']}H{h['head']}: {h['mean_change']:+.3f} (d={h['cohens_d']}, n={h['n']})"
        for h in m["top"]))]
    return ProbeResult(kind="intervention", metrics=m, summary=summary, figures={"head_ablation": fig},
                       findings=findings)


def _swap_result(m: dict[str, Any]) -> ProbeResult:
    p1, p0 = m["object_swap_changed"], m["background_swap_changed"]
    summary = (f"Feature swap on {m['n_cases']} cases ({m['site']}): swapping the object's patches changed the output "
               f"to the donor in {p1:.0%} of cases, swapping as many background patches in {p0:.0%} "
               f"(difference {p1 - p0:+.0%}, Fisher p={m['effect_size']['fisher_p']:.2g}).")
    findings = []
    if p1 - p0 < 0.5:
        findings.append(Finding("medium", "The output does not follow the object's features",
                                "Swapping an object's visual features rarely changes what the model says about it."))
    else:
        findings.append(Finding("info", "The output is causally tied to the object's own features", summary))
    return ProbeResult(kind="intervention", metrics=m, summary=summary, findings=findings)

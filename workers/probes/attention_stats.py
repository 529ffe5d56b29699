"""Cross-modal attention statistics per layer and head: dispersion, alignment and consistency.

For every attention head we take its attention over the *image tokens*, renormalised to a
distribution ``p`` over the vision grid, and average three things over a dataset:

- dispersion: the entropy of ``p`` divided by ``log(n_patches)`` (1 = uniform, 0 = one patch);
- alignment: the share of ``p`` on patches whose centre lies inside a ground-truth box, next to
  the share uniform attention would give (``baseline``) and their ratio (``lift``);
- consistency: the Spearman rank correlation of ``p`` across prompt paraphrases (same image) and
  across seeds / model instances (same image, same prompt), where given.

Which attention: for fusion models, the decoder's attention from every position that predicts
a generated token (the text the model writes) to the image tokens; for dual encoders the vision
tower's attention from the CLS token to the patches (mean over patch queries without a CLS
token). A dual encoder's vision attention never sees the text, so prompt-paraphrase consistency
is 1 by construction and is not reported for it.

Heads are flagged ``aligned`` (alignment >= 0.5 and lift >= 2), ``diffuse`` (normalised entropy
>= 0.9) or ``erratic`` (a measured consistency < 0.3).

Shapes: ``n`` images, ``L`` layers, ``H`` heads, ``G = gh * gw`` patches.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from pydantic import Field
from scipy.stats import rankdata

from workers.probes.errors import ProbeInputError, UnsupportedModelError
from workers.probes.kinds import BatchSize, DatasetArg, Flag, KindParams, Limit, Metric, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from workers.probes.adapters.base import DualEncoderAdapter, FusionAdapter
    from workers.probes.scenes import SceneImage


ALIGNED_SHARE, ALIGNED_LIFT, DIFFUSE_ENTROPY, ERRATIC_RHO = 0.5, 2.0, 0.9, 0.3


def patch_boxes(adapter: Any, width: int, height: int) -> np.ndarray:
    """``[G, 4]`` pixel boxes of the vision grid cells in a stored ``width x height`` image.

    Fusion adapters know their processor's resize and crop; for dual encoders the image is
    assumed to be resized to the model's square input (true for the zoo's square images).
    """
    if hasattr(adapter, "patch_boxes"):
        return adapter.patch_boxes((width, height))
    gh, gw = adapter.grid
    xs, ys = np.linspace(0, width, gw + 1), np.linspace(0, height, gh + 1)
    return np.array([(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(gh) for c in range(gw)])


def inside_mask(boxes: Sequence[Sequence[float]], pboxes: np.ndarray) -> np.ndarray:
    """``[G]`` bool: patch centre inside any of ``boxes``."""
    cx, cy = (pboxes[:, 0] + pboxes[:, 2]) / 2, (pboxes[:, 1] + pboxes[:, 3]) / 2
    mask = np.zeros(len(pboxes), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return mask


# --- attention over the image ----------------------------------------------------------------


def fusion_image_attention(adapter: FusionAdapter, images: Sequence[Image.Image], prompt: str, *,
                           max_new_tokens: int = 32) -> np.ndarray:
    """``[n, L, H, G]``: decoder attention from the generated text to the image, per head."""
    from workers.probes.token_attribution import generated_targets

    refusal = getattr(adapter, "attention_statistics_refusal", None)
    if refusal is not None:
        raise UnsupportedModelError(refusal())
    pixel_values = adapter.preprocess(images)  # first: some families' image tokens follow the image's layout
    enc = adapter.encode(prompt)
    # mapping: None where image tokens are grid cells; else [n, n_img, G]: (BLIP-2) each query
    # token's Q-Former cross-attention over the patches, (any-resolution families) each token's share
    # of each region, which spreads the decoder's attention to the grid. Both from one pass through the image path.
    feats, mapping = adapter.image_features_and_patches(pixel_values)
    with torch.no_grad():
        generated = adapter.generate(adapter.embed(enc.input_ids.expand(len(images), -1), feats), max_new_tokens)
        grid_pos = enc.image_positions[adapter.image_token_prefix:]
        out = []
        for k, gen in enumerate(generated):
            gen = gen or [adapter.eos_token_id]
            ids, rows = generated_targets(adapter, enc, gen)
            trace = adapter.trace(adapter.embed(ids, feats[k:k + 1]), ids, enc.image_positions)
            a = torch.stack([x[0] for x in trace.attentions]).float()  # [L, H, N, N]
            if mapping is None:
                a = a[:, :, rows][..., grid_pos]  # [L, H, T, G]
            else:
                a = a[:, :, rows][..., enc.image_positions] @ mapping[k]  # [L, H, T, n_img] @ [n_img, G]
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
            out.append(a.mean(2).cpu().numpy())
    return np.stack(out)


def dual_image_attention(adapter: DualEncoderAdapter, images: Sequence[Image.Image],
                         prompts: Sequence[str]) -> np.ndarray:
    """``[n, L, H, G]``: vision-tower attention from CLS (or the mean patch query) to the patches."""
    pixel_values = adapter.preprocess(images)
    trace = adapter.trace(pixel_values, list(prompts))
    prefix = adapter.num_prefix_tokens
    maps = []
    for a in trace.attentions:  # [B, H, T, T]
        a = a.detach()
        rows = a[:, :, 0, prefix:] if prefix else a[:, :, :, :].mean(2)
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
        maps.append(rows)
    return torch.stack(maps, dim=1).float().cpu().numpy()


def image_attention(adapter: Any, images: Sequence[Image.Image], prompt: str, *,
                    max_new_tokens: int = 32) -> np.ndarray:
    if adapter.kind == "fusion":
        return fusion_image_attention(adapter, images, prompt, max_new_tokens=max_new_tokens)
    return dual_image_attention(adapter, images, [prompt] * len(images))


# --- statistics ------------------------------------------------------------------------------


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy over the last axis divided by ``log(G)``."""
    q = np.clip(p, 1e-12, None)
    return -(p * np.log(q)).sum(-1) / np.log(p.shape[-1])


def spearman_lastaxis(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between ``a[..., :]`` and ``b[..., :]`` (NaN where one is constant)."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)


def pairwise_consistency(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Mean Spearman over all pairs of ``[n, L, H, G]`` maps and over images -> ``[L, H]``."""
    rhos = np.stack([spearman_lastaxis(x, y) for x, y in itertools.combinations(maps, 2)])
    # A head whose maps are constant in every pair has no defined consistency: NaN, said quietly
    # (np.nanmean would warn "Mean of empty slice" into the worker log for each such head).
    counts = np.isfinite(rhos).sum(axis=(0, 1))
    sums = np.where(np.isfinite(rhos), rhos, 0.0).sum(axis=(0, 1))
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def head_table(maps: np.ndarray, inside: np.ndarray, *, paraphrase: np.ndarray | None = None,
               seeds: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per-head statistics and flags from ``maps`` ``[n, L, H, G]`` and ``inside`` ``[n, G]``."""
    entropy = normalised_entropy(maps).mean(0)
    share = (maps * inside[:, None, None, :]).sum(-1).mean(0)
    baseline = float(inside.mean())
    rows = []
    n_layers, n_heads = entropy.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            lift = float(share[layer, head] / baseline) if baseline > 0 else None
            row: dict[str, Any] = {"layer": layer, "head": head, "entropy": round(float(entropy[layer, head]), 4),
                                   "alignment": round(float(share[layer, head]), 4),
                                   "lift": None if lift is None else round(lift, 3)}
            consist = []
            for name, table in (("paraphrase_consistency", paraphrase), ("seed_consistency", seeds)):
                if table is not None:
                    row[name] = round(float(table[layer, head]), 4)
                    consist.append(float(table[layer, head]))
            flags = []
            if row["alignment"] >= ALIGNED_SHARE and lift is not None and lift >= ALIGNED_LIFT:
                flags.append("aligned")
            if row["entropy"] >= DIFFUSE_ENTROPY:
                flags.append("diffuse")
            if any(c < ERRATIC_RHO for c in consist if not np.isnan(c)):
                flags.append("erratic")
            row["flags"] = flags
            rows.append(row)
    return rows


def heads_figure(table: list[dict[str, Any]], *, title: str = "") -> Figure:
    """Heatmaps heads x layers: alignment, entropy and (where measured) consistency."""
    from workers.probes import figures

    n_layers = max(r["layer"] for r in table) + 1
    n_heads = max(r["head"] for r in table) + 1
    panels = [("alignment", "share of attention in boxes", "viridis"), ("entropy", "normalised entropy", "magma")]
    for key in ("paraphrase_consistency", "seed_consistency"):
        if key in table[0]:
            panels.append((key, key.replace("_", " ") + " (Spearman)", "coolwarm"))
    # no wider than the report's text column, where it prints at the size it is drawn
    fig = figures.new_figure(min(figures.PAGE_WIDTH, 3.2 * len(panels)), 0.45 * n_heads + 2.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label, cmap) in zip(axes, panels, strict=True):
        grid = np.full((n_heads, n_layers), np.nan)
        for r in table:
            grid[r["head"], r["layer"]] = r[key] if r[key] is not None else np.nan
        vmin, vmax = (-1, 1) if "consistency" in key else (0, 1)
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (h, layer), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(layer, h, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (v - vmin) / (vmax - vmin) < 0.5 else "black")
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_xticks(range(n_layers))
        ax.set_yticks(range(n_heads))
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)  # the panel's title names its scale
    if title:
        fig.suptitle(title, fontsize=10)
    return figures.describe(
        fig, "Per-head attention statistics" + (f": {title}" if title else ""),
        rows="attention heads", columns="layers; one panel per statistic: " + ", ".join(p[1] for p in panels),
        colour="the statistic's value, printed in each cell (one colour bar per panel)")


# --- the analysis ------------------------------------------------------------------------------


def analyse(adapter: Any, scenes: Sequence[SceneImage], *, prompts: Sequence[str] | None = None,
            compare: Sequence[Any] = (), max_new_tokens: int = 32, batch_size: int = 16,
            progress: Progress = no_progress) -> dict[str, Any]:
    """Per-head statistics over ``scenes`` (``scenes.SceneImage``); ``compare``: other adapters of
    the same architecture (seeds / instances)."""
    started = time.perf_counter()
    fusion = adapter.kind == "fusion"
    if fusion:
        prompts = list(prompts or [_default_prompt()])
    else:
        prompts = [None]  # type: ignore[list-item]
    for other in compare:
        if (other.num_layers, other.num_heads, other.grid) != (adapter.num_layers, adapter.num_heads, adapter.grid):
            raise ProbeInputError("models compared for consistency must have the same layers, heads and grid")
    per_prompt: list[list[np.ndarray]] = [[] for _ in prompts]
    per_model: list[list[np.ndarray]] = [[] for _ in compare]
    inside = []
    steps = len(range(0, len(scenes), batch_size)) * (len(prompts) + len(compare))
    done = 0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        images = [s.load_image() for s in chunk]
        for s in chunk:
            inside.append(inside_mask(s.boxes, patch_boxes(adapter, s.width, s.height)))
        for k, prompt in enumerate(prompts):
            text = prompt if fusion else None
            per_prompt[k].append(image_attention(adapter, images, text if text is not None else chunk[0].prompt,
                                                 max_new_tokens=max_new_tokens) if fusion
                                 else dual_image_attention(adapter, images, [s.prompt for s in chunk]))
            done += 1
            progress(done / steps, "attention maps")
        for k, other in enumerate(compare):
            per_model[k].append(image_attention(other, images, prompts[0], max_new_tokens=max_new_tokens) if fusion
                                else dual_image_attention(other, images, [s.prompt for s in chunk]))
            done += 1
            progress(done / steps, "attention maps (compared models)")
    maps = [np.concatenate(m) for m in per_prompt]
    inside_arr = np.stack(inside)
    paraphrase = pairwise_consistency(maps) if len(maps) > 1 else None
    seeds = pairwise_consistency([maps[0]] + [np.concatenate(m) for m in per_model]) if compare else None
    table = head_table(maps[0], inside_arr, paraphrase=paraphrase, seeds=seeds)
    counts = {flag: sum(flag in r["flags"] for r in table) for flag in ("aligned", "diffuse", "erratic")}
    return {
        "model_kind": adapter.kind,
        "attention": "decoder: generated text -> image tokens" if fusion else "vision tower: CLS -> patches",
        "n_images": len(scenes),
        "prompts": prompts if fusion else None,
        "compared_models": len(compare),
        "layers": adapter.num_layers,
        "heads": adapter.num_heads,
        "alignment_baseline": round(float(inside_arr.mean()), 4),
        "flag_counts": counts,
        "heads_table": table,
        "best_aligned": sorted(table, key=lambda r: -r["alignment"])[:3],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _default_prompt() -> str:
    from workers.probes.zoo.captioner import PROMPTS

    return PROMPTS[0]


def load_compare(model_dirs: Sequence[str], device: str) -> list[Any]:
    from workers.probes.suite import load_model

    return [load_model(d, device) for d in model_dirs]


class AttentionParams(KindParams):
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]] | None, Flag(name="--prompt")] = Field(
        None, min_length=1, description="prompt paraphrases (generative models; default: the zoo captioner's four)")
    compare_models: Annotated[list[Annotated[str, Field(min_length=1)]], Flag(name="--compare-model")] = Field(
        default_factory=list, description="other seeds / instances of the same architecture, for consistency")
    limit: Limit = None
    max_new_tokens: int = Field(32, ge=1, le=1024, description="tokens generated per image (generative models)")
    batch_size: BatchSize = 16


def _cli_text(result: ProbeResult, params: AttentionParams) -> str:
    lines = [result.summary]
    for row in result.metrics["heads_table"]:
        lines.append(f"  L{row['layer']}H{row['head']}  alignment {row['alignment']:.2f}  "
                     f"entropy {row['entropy']:.2f}  {' '.join(row['flags'])}")
    return "\n".join(lines)


@probe_kind(
    "attention", title="Cross-modal attention statistics", section="explain", params=AttentionParams,
    help="cross-modal attention statistics per layer and head", present=_cli_text,
    dataset=DatasetArg(help="a dataset folder (annotations.jsonl, optional scenes.jsonl); default: the zoo's "
                            "held-out split"),
    glossary={
        "alignment": Metric("Alignment", "share of a head's image attention inside the object boxes"),
        "entropy": Metric("Entropy", "how evenly a head spreads its attention over the image"),
        "paraphrase_consistency": Metric("Paraphrase consistency", "rank correlation of a head's attention across "
                                         "prompt paraphrases", limitation=True),
        "seed_consistency": Metric("Seed consistency", "rank correlation of a head's attention across model seeds",
                                   limitation=True),
        "alignment_baseline": Metric("Uniform share", "the alignment of attention spread uniformly"),
    })
def attention_kind(model_dir: str, dataset_dir: str | None, params: AttentionParams, *, device: str = "cpu",
                   progress: Progress = no_progress) -> ProbeResult:
    """Cross-modal attention statistics per layer and head (dual encoders and fusion models)."""
    from workers.probes.scenes import load_scenes
    from workers.probes.suite import load_model

    adapter = load_model(model_dir, device)
    prompts = list(params.prompts) if params.prompts is not None else None
    if prompts is None and adapter.kind == "fusion":
        from workers.probes.zoo.captioner import PROMPTS

        prompts = list(PROMPTS)
    if dataset_dir is None:
        from workers.probes.zoo import dataset_dir as zoo_dataset

        dataset_dir = str(zoo_dataset("heldout"))
    scenes = load_scenes(dataset_dir, limit=params.limit)
    metrics = analyse(adapter, scenes, prompts=prompts, compare=load_compare(list(params.compare_models), device),
                      max_new_tokens=params.max_new_tokens, batch_size=params.batch_size, progress=progress)
    return result_from_metrics(metrics)


def result_from_metrics(metrics: dict[str, Any]) -> ProbeResult:
    table = metrics["heads_table"]
    counts = metrics["flag_counts"]
    findings = []
    if counts["aligned"] == 0:
        findings.append(Finding("medium", "No attention head concentrates on the objects",
                                f"No head puts >= {ALIGNED_SHARE:.0%} of its image attention inside the boxes "
                                f"at >= {ALIGNED_LIFT:g}x the uniform share ({metrics['alignment_baseline']:.0%})."))
    if counts["erratic"]:
        names = ", ".join(f"L{r['layer']}H{r['head']}" for r in table if "erratic" in r["flags"])
        findings.append(Finding("medium", f"{counts['erratic']} heads attend inconsistently",
                                f"Rank correlation below {ERRATIC_RHO} across paraphrases or seeds: {names}."))
    if counts["diffuse"]:
        findings.append(Finding("low", f"{counts['diffuse']} heads spread attention almost uniformly over the image"))
    best = metrics["best_aligned"][0]
    summary = (f"{metrics['layers']}x{metrics['heads']} heads over {metrics['n_images']} images: "
               f"{counts['aligned']} aligned, {counts['diffuse']} diffuse, {counts['erratic']} erratic; "
               f"best L{best['layer']}H{best['head']} puts {best['alignment']:.0%} of its image attention in the boxes "
               f"(uniform: {metrics['alignment_baseline']:.0%}).")
    fig = heads_figure(table, title=f"cross-modal attention per head ({metrics['attention']})")
    return ProbeResult(kind="attention", metrics=metrics, summary=summary, figures={"heads": fig}, findings=findings)

"""One glossary for every metric key Loupe shows a person: a human label and a one-line meaning.

The report and the review workspace both call :func:`label` and :func:`meaning`, so a metric reads
the same wherever it appears and no table shows a raw key such as ``energy_pointing_game``.

Sources, first match wins:

1. entries a probe kind declares itself (``workers.probes.kinds.glossary()``: ``{kind: {key:
   Metric(label, meaning)}}``), so a new kind brings its own words;
2. :data:`TERMS` below;
3. a readable fallback built from the key (``max_sensitivity`` -> "Max sensitivity") with no
   meaning, which :func:`missing` lists so a test can insist every shown key is explained.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TERMS: dict[str, tuple[str, str]] = {
    # Grounding and faithfulness
    "pointing_game": ("Pointing game", "Share of images where the heatmap's peak falls on the annotated object "
                                       "(higher is better)."),
    "energy_pointing_game": ("Energy pointing game", "Share of the heatmap's total weight that lies on the object "
                                                     "(higher is better)."),
    "deletion_auc": ("Deletion score", "How fast the model's score falls as the regions the explanation ranks "
                                       "highest are removed (lower is better)."),
    "insertion_auc": ("Insertion score", "How fast the score recovers as those regions are added back to a blank "
                                         "image (higher is better)."),
    "random_pointing_game": ("Pointing game by chance", "What a random heatmap scores on the pointing game."),
    "random_energy_pointing_game": ("Energy pointing game by chance", "What a random heatmap scores."),
    "random_deletion_auc": ("Deletion score of a random order", "The deletion score when regions are removed in "
                                                                "random order; a faithful method scores lower."),
    "random_insertion_auc": ("Insertion score of a random order", "The insertion score for a random order; a "
                                                                  "faithful method scores higher."),
    "method": ("Explanation method", "The algorithm that drew the heatmap."),
    "n": ("Examples", "Number of images (or image-text pairs) measured."),
    "steps": ("Curve points", "Points measured along each deletion or insertion curve."),
    "baseline": ("Removal baseline", "What replaces a removed region (mean colour or blur)."),
    "format": ("Dataset format", "How the dataset's annotations are stored."),
    "seconds": ("Run time (s)", "Wall-clock seconds the measurement took."),
    "error": ("Error", "Why this part of the measurement could not run."),
    # Sanity check
    "passed": ("Passed", "Whether the check's own pass condition held."),
    "rank_correlation": ("Rank agreement", "Spearman correlation between two sets of heatmaps (1 = same ranking "
                                           "of regions, 0 = unrelated)."),
    "max_rank_correlation": ("Allowed rank agreement (setting)", "A threshold set for the check, not a "
                                                                 "measurement."),
    "randomized_pointing_game": ("Pointing game after randomisation", "The pointing game of the model with its "
                                                                      "weights randomised."),
    "pointing_margin": ("Required pointing margin (setting)", "A threshold set for the check, not a measurement."),
    "pointing_gain_over_randomised": ("Pointing gain from training", "How much better the trained model's "
                                                                     "heatmaps point than the randomised model's."),
    "randomized_parameters": ("Randomised parameters", "Number of weights replaced by random values."),
    "total_parameters": ("Total parameters", "Number of weights in the model."),
    "randomisation_draws": ("Randomisation draws", "Independent random re-initialisations measured."),
    "layer": ("Layer", "Network layer (counted from the input) the measure refers to."),
    "ssim": ("Structural similarity", "Similarity of two heatmaps as images (1 = identical)."),
    "seed": ("Random seed", "Seed that makes the run repeatable."),
    # Stability and disagreement
    "worst_rank_correlation": ("Worst rank agreement under noise", "The lowest agreement between an input's "
                                                                   "heatmap and a slightly perturbed copy's."),
    "max_sensitivity": ("Max-sensitivity", "Largest change of the heatmap under imperceptible input noise (lower "
                                           "is more stable)."),
    "epsilon": ("Noise radius (setting)", "Size of the imperceptible input perturbation."),
    "samples": ("Noise samples", "Perturbed copies measured per input."),
    "agreement": ("Method agreement", "Mean rank correlation between the heatmaps of two methods."),
    "mean_rank_correlation": ("Mean rank agreement", "Average Spearman correlation between heatmaps."),
    "method_disagreement": ("Method disagreement", "How much different methods disagree about the same "
                                                   "prediction."),
    "explanation_stability": ("Explanation stability", "How little explanations change under small input changes."),
    "mean_ssim": ("Mean structural similarity", "Average similarity of heatmaps before and after a change."),
    # Robustness
    "clean_accuracy": ("Accuracy on clean images", "Share of correct decisions without any corruption."),
    "mean_corruption_accuracy_by_severity": ("Accuracy under corruption", "Accuracy averaged over corruption "
                                                                          "families at each severity."),
    "accuracy_falls_monotonically": ("Accuracy falls steadily with severity", "Whether stronger corruption never "
                                                                              "raises accuracy (a sanity check)."),
    "accuracy": ("Accuracy", "Share of correct decisions."),
    "accuracy_drop": ("Accuracy lost", "Clean accuracy minus accuracy under this change."),
    "flip_rate": ("Decisions changed", "Share of decisions that change under this input change."),
    "attack_success": ("Attack success", "Share of decisions that now follow the attacker's text."),
    "family": ("Change family", "Kind of input change: corruption, prompt variation or attack."),
    "probe": ("Input change", "The specific change applied to the input."),
    "severity": ("Severity", "Strength of the change (1 = mild, 5 = strong)."),
    "probes": ("Input changes", "One row per input change and strength."),
    # TCAV and shortcuts
    "tcav_score": ("Concept influence (TCAV)", "Share of examples whose score rises along the concept's direction "
                                               "(0.5 = no influence)."),
    "tcav_score_std": ("Spread of concept influence", "Standard deviation of the score over repeated concept "
                                                      "vectors."),
    "p_value": ("p-value", "Chance of a difference this large if the concept had no influence."),
    "p_adjusted": ("Corrected p-value", "p-value corrected for testing many concepts at once (Holm)."),
    "significant": ("Significant", "Whether the corrected p-value is below the significance level."),
    "random_score": ("Influence of random concepts", "The same score for random image sets (the comparison)."),
    "cav_accuracy": ("Concept vector accuracy", "How well the concept can be told apart from random images; low "
                                                "values make the concept test unreliable."),
    "concept": ("Concept", "A human-meaningful image feature tested for its influence."),
    "target": ("Target", "The class or text whose score is explained."),
    "alpha": ("Significance level (setting)", "Threshold below which a corrected p-value counts as significant."),
    "correction": ("Multiple-testing correction", "How p-values were adjusted for testing many concepts."),
    "results": ("Concept test results", "One row per concept and layer."),
    "shortcut": ("Shortcut", "Feature suspected of standing in for the intended cause."),
    "flagged": ("Flagged as a shortcut", "Whether the combined tests show the model relies on the suspected feature."),
    "tcav": ("Concept test results", "One row per concept and layer."),
    "thresholds": ("Settings of the test", "Thresholds the probe was given; not measurements."),
    "min_effect": ("Minimum effect (setting)", "Smallest score change counted as an effect."),
    "min_relevance_ratio": ("Minimum relevance ratio (setting)", "How much more relevance the feature must draw than "
                                                                 "its area alone would."),
    "min_cav_accuracy": ("Minimum concept vector accuracy (setting)", "Below this the concept test is unreliable."),
    "accuracy_with": ("Accuracy with the feature", "Accuracy when the suspected shortcut is present."),
    "accuracy_without": ("Accuracy without the feature", "Accuracy when it is removed."),
    "gap": ("Accuracy gap", "Accuracy lost when the suspected shortcut is removed."),
    "random_runs": ("Random comparison runs", "Random concept sets used as the comparison."),
    # Generative models, attention, interventions
    "summary_value": ("Summary value", "The probe's headline measure."),
    "per_layer": ("Per layer", "One value per network layer."),
    "perturbation": ("Under input noise", "Measured between an input's heatmap and those of slightly perturbed "
                                          "copies."),
    "cascade": ("Randomisation cascade", "One step per block of layers randomised, from the output backwards."),
    "batch_size": ("Batch size", "Images processed together; affects speed and memory, not results."),
    "score_batch_size": ("Scoring batch size", "Masked copies scored together; affects speed, not results."),
    # Attention statistics
    "alignment": ("Alignment", "Share of the head's attention that falls inside the object boxes."),
    "alignment_baseline": ("Alignment by chance", "Share of the image the boxes cover: what uniform attention scores."),
    "lift": ("Lift over chance", "Alignment divided by the alignment by chance (1 = no better than uniform)."),
    "entropy": ("Normalised entropy", "How evenly a head spreads its attention (1 = uniform, 0 = one patch)."),
    "head": ("Head", "One attention head of the layer."),
    "heads": ("Attention heads", "Heads measured per layer."),
    "layers": ("Layers", "Layers measured."),
    "attention": ("Attention measured", "Which attention (tower and direction) was measured."),
    "flag_counts": ("Heads by behaviour", "Heads that attend to the objects, spread evenly, or behave erratically."),
    "aligned": ("Aligned heads", "Heads whose attention concentrates on the objects."),
    "diffuse": ("Diffuse heads", "Heads that spread attention almost uniformly."),
    "erratic": ("Erratic heads", "Heads whose focus varies strongly from image to image."),
    "model_kind": ("Model kind", "The model's architecture family as the probe saw it."),
    "n_images": ("Images", "Number of images measured."),
    "prompts": ("Prompts", "Texts the image was paired with."),
    "compared_models": ("Compared models", "Other models measured the same way, for comparison."),
    # Interventions
    "component": ("Component", "The part of the model switched off (vision or text tower)."),
    "mean_change": ("Mean change of the score", "Average change of the model's output when the part is switched off."),
    "sd": ("Spread (SD)", "Standard deviation of that change over the examples."),
    "cohens_d": ("Effect size (Cohen's d)", "Mean change divided by its spread; beyond about 0.8 is a large effect."),
    "clean_mean": ("Mean score without intervention", "The output before anything is switched off."),
    "kind": ("Intervention", "What was switched off or swapped."),
    "measure": ("Measured output", "Which output the change is measured on."),
    "mode": ("Mode", "How the part was switched off (e.g. set to zero or to its mean)."),
    "n_cases": ("Examples", "Number of examples measured."),
    # Robustness and sanity tables
    "classes": ("Classes", "Labels the model chooses between."),
    "explanation_spearman": ("Explanation agreement", "Rank correlation between the heatmap before and after the "
                                                      "change (1 = unchanged)."),
    "score_drop": ("Score lost", "Drop of the model's score for the right answer under the change."),
    "stage": ("Randomised down to", "How far from the output the weights were randomised."),
    "parameters": ("Tensors randomised", "Weight tensors replaced by random values at this stage."),
    "scalars": ("Weights randomised", "Individual weights replaced by random values at this stage."),
    # Shortcut probe
    "evidence": ("Test positive", "Whether this part of the shortcut test found the feature used."),
    "intervention": ("Intervention test", "Adding or removing the feature and measuring the score change."),
    "relevance": ("Relevance test", "How much of an explanation's weight falls on the feature."),
    "share_raised": ("Share of scores raised", "Share of examples whose score rises when the feature is added."),
    "relative_to_gap": ("Change relative to the gap", "Score change as a share of the gap between target and "
                                                      "random images."),
    "score_gap_target_vs_random": ("Score gap, target vs random", "How much higher target images score than random "
                                                                  "ones; the scale for the changes."),
    "target_inputs": ("Target images", "Images of the target class."),
    "random_images": ("Random images", "Images of other content, for comparison."),
    "n_inputs": ("Target images", "Number of target images used."),
    "n_random": ("Random images", "Number of random images used."),
    "share_in_box": ("Relevance on the feature", "Share of the explanation's weight inside the feature's box."),
    "box_area_share": ("Feature's area", "Share of the image the feature covers (what relevance would be by chance)."),
    "ratio": ("Relevance ratio", "Relevance on the feature divided by its area (1 = chance)."),
    "magnitude": ("Magnitude", "Mean size of the score change along the concept direction."),
    "random_score_std": ("Spread of random concepts", "Standard deviation of the random concepts' influence."),
    # Token attribution (generative models)
    "pointing": ("Word pointing game", "Share of generated object words whose attribution peaks on the named object."),
    "pointing_15px_tolerance": ("Word pointing game (15 px tolerance)", "The same, counting a peak within 15 pixels "
                                                                        "of the object as a hit."),
    "by_word_kind": ("Word pointing by kind of word", "The word pointing game for colour words and shape words."),
    "hallucinated_words": ("Words naming absent objects", "Generated object words with no such object in the image."),
    "n_words": ("Words checked", "Generated object words checked against a box."),
    "random_baseline": ("Pointing by chance", "What a random attribution scores."),
    "criterion": ("Pass rule of the probe", "The probe's own rule for its observation (a setting)."),
    "raw": ("raw attention", "Attention weights without gradient weighting."),
    "chefer_full": ("chefer (all layers)", "Chefer relevance propagated through every layer."),
    # Interventions (feature swap)
    "object_swap": ("Object swap changed the output", "Whether swapping the object's features changed the words."),
    "background_swap": ("Background swap changed the output", "Whether swapping background features changed them."),
    "object_swap_changed": ("Outputs changed by object swap", "Share of outputs that change when the object's "
                                                              "features are swapped."),
    "background_swap_changed": ("Outputs changed by background swap", "Share that change when background features "
                                                                      "are swapped (the comparison)."),
    "effect_size": ("Effect size", "How much more the object swap changes outputs than the background swap."),
    "cohens_h": ("Cohen's h", "Effect size for a difference of two shares; beyond about 0.8 is large."),
    "fisher_p": ("p-value (Fisher's exact test)", "Chance of a difference this large if swaps had the same effect."),
    "rate_difference": ("Difference of shares", "Object-swap share minus background-swap share."),
    "n_candidates": ("Candidate pairs", "Image pairs eligible for a swap."),
    "site": ("Where swapped", "The layer or position where features were swapped."),
    "cells": ("Patches swapped", "Image patches whose features were swapped."),
    "donor": ("Donor", "The example the swapped features came from."),
    "donor_image": ("Donor image", "The image the swapped features came from."),
    "image": ("Image", "The image changed."),
    "paraphrase_consistency": ("Consistency across prompts", "How similar a head's attention is for reworded "
                                                             "prompts (1 = identical)."),
    "memory_backoff": ("Batch sizes after memory backoff", "Batch sizes that fitted the accelerator's memory."),
    "memory_plan": ("GPU memory plan", "Batch sizes chosen before the run to fit the accelerator's free memory, "
                                       "with the estimates they were chosen by."),
}

# Terms that name *what* a measure is about (a method, a group of inputs), never the measure itself.
QUALIFIERS = frozenset({"raw", "chefer_full", "target_inputs", "random_images", "method", "concept", "probe",
                        "family", "layer", "head", "image", "donor", "donor_image", "component"})

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _words(entry: Any) -> tuple[str, str] | None:
    if isinstance(entry, Mapping):
        entry_label, entry_meaning = entry.get("label"), entry.get("meaning")
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        entry_label, entry_meaning = entry
    else:
        entry_label, entry_meaning = getattr(entry, "label", None), getattr(entry, "meaning", "")
    if not entry_label:
        return None
    text = str(entry_meaning or "")
    return str(entry_label), text[:1].upper() + text[1:] if text else ""


def _declared_by_kind() -> dict[str, dict[str, tuple[str, str]]]:
    """The kinds' declarations, recomputed when the set of declared kinds changes (a test or a
    plugin declaring a kind later)."""
    try:
        from workers.probes import kinds

        registry = getattr(kinds, "_KINDS", {})
        key = tuple(sorted((name, id(spec)) for name, spec in registry.items()))
    except Exception:
        key = ()
    return _declared_by_kind_cached(key)


@functools.lru_cache(maxsize=4)
def _declared_by_kind_cached(key: tuple) -> dict[str, dict[str, tuple[str, str]]]:
    """``{kind: {key: (label, meaning)}}`` as the probe kinds declare them (``workers.probes.kinds``:
    ``glossary={key: Metric(label, meaning)}``); empty where the probe library is unavailable."""
    try:
        from workers.probes import kinds
    except Exception:  # the report must render even where the probe library cannot be imported
        return {}
    try:
        source = getattr(kinds, "glossary", None)
        declared = source() if callable(source) else {}
    except Exception:
        return {}
    return {str(kind): {str(key): words for key, entry in (entries or {}).items() if (words := _words(entry))}
            for kind, entries in declared.items()}


def _declared() -> dict[str, tuple[str, str]]:
    """Every kind's declared entries merged; where two kinds word the same key, the first kind wins."""
    merged: dict[str, tuple[str, str]] = {}
    for entries in _declared_by_kind().values():
        for key, words in entries.items():
            merged.setdefault(key, words)
    return merged


def cache_clear() -> None:
    """Forget the kinds' declarations (tests that declare a kind)."""
    _declared_by_kind_cached.cache_clear()


def _entry(key: str, kind: str | None = None) -> tuple[str, str] | None:
    own = _declared_by_kind().get(kind or "", {}).get(key) if kind else None
    return own or _declared().get(key) or TERMS.get(key)


def humanise(key: str) -> str:
    text = re.sub(r"[_\-.]+", " ", str(key)).strip()
    return text[:1].upper() + text[1:] if text else str(key)


def label(key: str, kind: str | None = None) -> str:
    """Human label of a metric key (the last segment of a dotted path is looked up); ``kind``: the
    probe kind that recorded it, whose own declaration wins (a key can mean different things)."""
    key = str(key)
    entry = _entry(key, kind) or _entry(key.rsplit(".", 1)[-1], kind)
    return entry[0] if entry else humanise(key.rsplit(".", 1)[-1])


def meaning(key: str, kind: str | None = None) -> str:
    """One-line meaning of a metric key, or "" when the glossary has none."""
    key = str(key)
    entry = _entry(key, kind) or _entry(key.rsplit(".", 1)[-1], kind)
    return entry[1] if entry else ""


def path_label(path: str, kind: str | None = None) -> str:
    """A dotted metric path as words: the leaf's label, qualified by the segments above it.

    ``mean_corruption_accuracy_by_severity.3`` -> "Accuracy under corruption (3)";
    ``perturbation.chefer.rank_correlation`` -> "Rank agreement (perturbation, chefer)".
    """
    parts = [p for p in str(path).split(".") if p]
    if not parts:
        return str(path)
    named = [i for i, p in enumerate(parts) if not _NUMBER.match(p)]
    # The measure is the last segment the glossary knows (``pointing.chefer``: the word pointing game,
    # for chefer); segments after it qualify it.
    known = [i for i in named if _entry(parts[i], kind) is not None and parts[i] not in QUALIFIERS]
    leaf = known[-1] if known else (named[-1] if named else len(parts) - 1)
    qualifiers = []
    for i, part in enumerate(parts):
        if i == leaf:
            continue
        by = re.search(r"_by_([a-z]+)$", parts[i - 1]) if i > 0 and _NUMBER.match(part) else None
        if by:  # mean_accuracy_by_severity.3 -> "severity 3"
            qualifiers.append(f"{by.group(1)} {part}")
        elif _NUMBER.match(part) or _entry(part, kind) is None:
            qualifiers.append(humanise(part) if "_" in part else part)
        else:
            qualifiers.append(label(part, kind))
    text = label(parts[leaf], kind)
    return f"{text} ({', '.join(qualifiers)})" if qualifiers else text


def path_meaning(path: str, kind: str | None = None) -> str:
    """The meaning of a dotted metric path: that of the measure :func:`path_label` names."""
    named = [p for p in str(path).split(".") if p and not _NUMBER.match(p)]
    measures = [p for p in named if meaning(p, kind) and p not in QUALIFIERS]
    fallback = [p for p in named if meaning(p, kind)]
    return meaning((measures or fallback)[-1], kind) if (measures or fallback) else ""


def missing(keys: list[str]) -> list[str]:
    """The keys among ``keys`` that have no meaning in any source."""
    return [k for k in keys if not meaning(k)]


def entries(keys: list[str] | None = None) -> list[tuple[str, str]]:
    """``(label, meaning)`` pairs for ``keys`` (all known terms when ``None``), sorted by label, unique."""
    keys = list(TERMS) + list(_declared()) if keys is None else keys
    seen: dict[str, str] = {}
    for key in keys:
        text = meaning(key)
        if text:
            seen.setdefault(label(key), text)
    return sorted(seen.items(), key=lambda item: item[0].lower())


# --- what the review workspace shows beside a label: the baseline and the pass criterion ---------

@dataclass(frozen=True)
class MetricInfo:
    label: str
    meaning: str = ""
    baseline: str = ""
    criterion: str = ""


#: measure -> (baseline it is read against, what passing looks like). Kinds declare labels and
#: meanings, not references, so these live here; keyed by the measure, which kinds share.
REFERENCES: dict[str, tuple[str, str]] = {
    "pointing_game": ("pointing game of a random point", "higher is better; well above chance"),
    "energy_pointing_game": ("the box's share of the image", "higher is better"),
    "deletion_auc": ("deletion score of a random order", "lower is better; below the random order"),
    "insertion_auc": ("insertion score of a random order", "higher is better; above the random order"),
    "random_pointing_game": ("", "reference"),
    "random_deletion_auc": ("", "reference"),
    "random_insertion_auc": ("", "reference"),
    "spearman": ("0 (unrelated maps)", "below 0.3 to pass the sanity check"),
    "rank_correlation": ("0 (unrelated maps)", ""),
    "passed": ("", "yes"),
    "p_value": ("", "below the corrected significance level"),
    "p_adjusted": ("", "below the significance level"),
    "tcav_score": ("0.5 (random directions)", "far from 0.5 and significant"),
    "relative_to_gap": ("unrelated inputs", "near 0 means the intervened part does not matter"),
    "accuracy": ("chance: 1 / number of classes", "higher is better"),
    "drop": ("0 (no effect)", "a large drop flags reliance"),
}


def describe_metric(kind: str, key: str) -> MetricInfo:
    """Label, meaning, baseline and pass criterion of metric ``key`` (a dotted path) of a ``kind``
    probe's evidence: the words of :func:`path_label`/:func:`path_meaning`, so the workspace and
    the report say the same thing. Unknown metrics keep a readable label and claim no meaning."""
    named = [p for p in str(key).split(".") if p and not _NUMBER.match(p)]
    measure = next((p for p in reversed(named) if p in REFERENCES), "")
    baseline, criterion = REFERENCES.get(measure, ("", ""))
    found = meaning(named[-1], kind) if named else ""
    text = path_meaning(key, kind) or found
    return MetricInfo(label=path_label(key, kind), meaning=text[:1].upper() + text[1:], baseline=baseline,
                      criterion=criterion)

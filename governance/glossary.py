"""What a metric means: a human label, a one-line meaning, its baseline and its pass criterion.

One public function, :func:`describe_metric`. The label and meaning come from the glossary the
probe kind declares (``workers.probes.kinds``, the same one the report prints); the baseline and
the pass criterion, which kinds do not declare, come from the table below, keyed by a metric's last
dotted segment (``pointing_game`` in ``methods.chefer.pointing_game``) because kinds share that
vocabulary. A metric neither knows keeps a readable label and claims no meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    label: str
    meaning: str = ""
    baseline: str = ""
    criterion: str = ""


# leaf name -> (label, meaning, baseline, criterion)
_ENTRIES: dict[str, tuple[str, str, str, str]] = {
    "pointing_game": ("Pointing game", "Share of examples whose hottest heatmap pixel lies inside the named "
                      "object's box.", "random_pointing_game (a random point)", "higher is better; well above chance"),
    "energy_pointing_game": ("Energy pointing game", "Share of the heatmap's total relevance that falls inside the "
                             "object's box.", "box area share", "higher is better"),
    "deletion_auc": ("Deletion AUC", "Model score as the most relevant pixels are removed first (area under the "
                     "curve).", "random_deletion_auc (random order)", "lower is better; below the random order"),
    "insertion_auc": ("Insertion AUC", "Model score as the most relevant pixels are added first (area under the "
                      "curve).", "random_insertion_auc (random order)", "higher is better; above the random order"),
    "random_pointing_game": ("Pointing game, random point", "Chance level of the pointing game.", "", "reference"),
    "random_deletion_auc": ("Deletion AUC, random order", "Deletion curve when pixels go in random order.", "",
                            "reference"),
    "random_insertion_auc": ("Insertion AUC, random order", "Insertion curve when pixels come in random order.", "",
                             "reference"),
    "spearman": ("Rank correlation with the trained model's maps", "Spearman correlation between heatmaps of the "
                 "trained and the randomised model.", "0 (unrelated maps)", "below 0.3 to pass the sanity check"),
    "passed": ("Passed", "Whether the probe's own criterion was met.", "", "yes"),
    "p_value": ("p-value", "Probability of a score this extreme if the concept had no effect.", "",
                "below the corrected significance level"),
    "tcav_score": ("TCAV score", "Share of inputs whose class score rises along the concept direction.",
                   "0.5 (random directions)", "far from 0.5 and significant"),
    "relative_to_gap": ("Effect relative to the gap", "Score change from the intervention as a share of the "
                        "gap between matched and unmatched inputs.", "random_images (unrelated inputs)",
                        "near 0 means the intervened part does not matter"),
    "accuracy": ("Accuracy", "Share of examples classified correctly.", "chance: 1 / number of classes",
                 "higher is better"),
    "n": ("Examples", "Number of examples the probe ran on.", "", ""),
    "steps": ("Curve points", "Points on each deletion/insertion curve.", "", ""),
    "seed": ("Random seed", "Seed that makes the run reproducible.", "", ""),
    "batch_size": ("Batch size", "Examples per forward pass (memory only; results do not depend on it).", "", ""),
    "architecture": ("Architecture", "Model type read from config.json.", "", ""),
    "entropy": ("Attention entropy", "How spread out attention is (high: diffuse, low: focused).", "", ""),
    "drop": ("Score drop", "How much the model's score falls under the change.", "0 (no effect)",
             "a large drop flags reliance"),
}


def _humanise(key: str) -> str:
    words = re.sub(r"[_\-.]+", " ", key).strip()
    return words[:1].upper() + words[1:] if words else key


def _declared(kind: str, leaf: str):
    """The kind's own glossary entry for ``leaf``, or None (unknown kinds, e.g. test kinds, have none)."""
    from workers.probes import kinds as probe_kinds

    try:
        return probe_kinds.glossary(kind).get(kind, {}).get(leaf)
    except Exception:  # noqa: BLE001 - an unregistered kind simply has no declared glossary
        return None


def describe_metric(kind: str, key: str) -> MetricInfo:
    """The glossary entry for metric ``key`` (a dotted path) of a ``kind`` probe's evidence.

    Unknown metrics get a readable label from their path and no claimed meaning: the workspace says
    so rather than invent one.
    """
    parts = [p for p in str(key).split(".") if p]
    leaf = parts[-1] if parts else str(key)
    entry = _ENTRIES.get(leaf)
    declared = _declared(kind, leaf)
    context = " / ".join(_humanise(p) for p in parts[:-1])
    if entry is None and declared is None:
        return MetricInfo(label=_humanise(" ".join(parts[-2:]) if len(parts) > 1 else leaf))
    label, meaning, baseline, criterion = entry or (leaf, "", "", "")
    if declared is not None:
        label, meaning = declared.label, declared.meaning[:1].upper() + declared.meaning[1:]
    return MetricInfo(label=f"{label} ({context})" if context else label, meaning=meaning, baseline=baseline,
                      criterion=criterion)

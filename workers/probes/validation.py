"""Per-audit validation of explanation methods, on the audited model and a sample of its data.

A method that is faithful on the zoo may not be on the model under audit (a pooling head, another
training recipe, another world). So each evidence item states, per method and with the numbers,
whether it was *shown* faithful on this model:

- **deletion / insertion against a random order** of the same patches, paired per example: the
  method's deletion AUC must be lower and its insertion AUC higher than the random order's, with
  the 95% bootstrap interval of the paired difference excluding zero;
- the **randomisation sanity check** (Adebayo et al. 2018) for every method shown: maps of the model
  with all weights randomised must not rank the patches like the trained model's (Spearman rank
  correlation below ``MAX_RANK_CORRELATION``, upper end of its 95% interval);
- **method agreement**: the Spearman rank correlation between every two methods' maps, per example;
- **bootstrap 95% intervals** (percentile, ``RESAMPLES`` resamples, seeded) for pointing, deletion and
  insertion;
- **stability beside the maps**: the rank correlation of each method's maps on the clean and on
  corrupted inputs (the robustness probe's corruptions), carried into ``limitations``.

The verdict is ``"faithful on this model"`` when the perturbation test and the sanity check both
pass, else ``"not shown to be"`` with the reasons; validated methods are listed first. The
functions are plain numpy/torch on what the probes already computed: no model calls here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from workers.probes.stability import rank_correlation

FAITHFUL = "faithful on this model"
NOT_SHOWN = "not shown to be"
RESAMPLES = 1000
LEVEL = 0.95
#: Above this rank correlation with the randomised model's maps, a method explains the input, not the model.
MAX_RANK_CORRELATION = 0.5


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> dict[str, Any]:
    """``{"mean", "low", "high", "n"}``: the mean of the finite ``values`` and its percentile bootstrap
    interval (seeded, so the same evidence gives the same interval). Empty: all ``None``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"mean": _r(x.mean()), "low": _r(np.quantile(means, alpha)), "high": _r(np.quantile(means, 1 - alpha)),
            "n": int(x.size)}


def agreement(maps: Mapping[str, torch.Tensor | np.ndarray], *, seed: int = 0) -> list[dict[str, Any]]:
    """Rank correlation between every two methods' maps of the same examples (``[N, ...]`` each)."""
    names = list(maps)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out.append({"methods": [a, b], "rank_correlation": bootstrap_ci(rank_correlation(maps[a], maps[b]),
                                                                            seed=seed)})
    return out


def randomisation_check(trained: torch.Tensor | np.ndarray, randomised: torch.Tensor | np.ndarray, *,
                        max_rank_correlation: float = MAX_RANK_CORRELATION, seed: int = 0) -> dict[str, Any]:
    """Do a method's maps change when the model's weights are randomised? Passes when the upper end
    of the rank correlation's interval is below ``max_rank_correlation``."""
    ci = bootstrap_ci(rank_correlation(trained, randomised), seed=seed)
    passed = ci["high"] is not None and ci["high"] < max_rank_correlation
    return {"rank_correlation": ci, "max_rank_correlation": max_rank_correlation, "passed": bool(passed)}


def stability_under(clean: torch.Tensor | np.ndarray, perturbed: Mapping[str, torch.Tensor | np.ndarray], *,
                    seed: int = 0) -> dict[str, Any]:
    """How much a method's maps keep their order when the input is corrupted: the rank correlation
    of the clean and the corrupted input's maps per corruption, and the worst of them (``"min"``)."""
    by = {name: bootstrap_ci(rank_correlation(clean, maps), seed=seed) for name, maps in perturbed.items()}
    means = {name: ci["mean"] for name, ci in by.items() if ci["mean"] is not None}
    worst = min(means, key=lambda name: means[name]) if means else None
    return {"rank_correlation": by, "min": means.get(worst) if worst else None, "least_stable_under": worst}


def method_validation(name: str, *, hits: Sequence[bool] | None, deletion: Sequence[float],
                      insertion: Sequence[float], random_deletion: Sequence[float], random_insertion: Sequence[float],
                      sanity: Mapping[str, Any] | None, seed: int = 0,
                      stability: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One method's validation entry: intervals, paired gaps to the random order, sanity, verdict.

    ``deletion`` / ``insertion`` and the random order's are per example, in the same order (pairs
    with a non-finite value on either side are left out)."""
    d, i = np.asarray(deletion, dtype=np.float64), np.asarray(insertion, dtype=np.float64)
    rd, ri = np.asarray(random_deletion, dtype=np.float64), np.asarray(random_insertion, dtype=np.float64)
    deletion_gap = bootstrap_ci(d - rd, seed=seed)  # < 0: deleting the method's patches first hurts more
    insertion_gap = bootstrap_ci(i - ri, seed=seed)  # > 0: revealing them first restores more
    reasons = []
    perturbation_ok = (deletion_gap["high"] is not None and deletion_gap["high"] < 0
                       and insertion_gap["low"] is not None and insertion_gap["low"] > 0)
    if deletion_gap["high"] is None or deletion_gap["high"] >= 0:
        reasons.append("deletion is not shown to be lower than in random order")
    if insertion_gap["low"] is None or insertion_gap["low"] <= 0:
        reasons.append("insertion is not shown to be higher than in random order")
    sanity_ok = bool(sanity and sanity.get("passed"))
    if sanity is None:
        reasons.append("no randomisation sanity check ran")
    elif not sanity_ok:
        reasons.append("its maps barely change when the model's weights are randomised")
    return {
        "method": name,
        "verdict": FAITHFUL if perturbation_ok and sanity_ok else NOT_SHOWN,
        "reasons": reasons,
        "pointing": bootstrap_ci(np.asarray(hits, dtype=np.float64), seed=seed) if hits is not None else None,
        "deletion_auc": bootstrap_ci(d, seed=seed),
        "insertion_auc": bootstrap_ci(i, seed=seed),
        "deletion_minus_random": deletion_gap,
        "insertion_minus_random": insertion_gap,
        "sanity": dict(sanity) if sanity is not None else None,
        "stability": dict(stability) if stability is not None else None,
    }


def ranked(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated methods first, then by pointing (or insertion gap) within each group; stable."""
    def key(e: Mapping[str, Any]) -> tuple:
        p = (e.get("pointing") or {}).get("mean")
        gap = (e.get("insertion_minus_random") or {}).get("mean")
        return (e["verdict"] != FAITHFUL, -(p if p is not None else -1.0), -(gap if gap is not None else -1.0))
    return [dict(e) for e in sorted(entries, key=key)]


#: Below this rank correlation with the clean input's maps, a corruption reorders a method's map.
UNSTABLE_BELOW = 0.5


def limitations(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sentences for the report's limitations: methods not shown faithful, and maps that a common
    corruption reorders (the robustness probe's explanation stability, beside the maps)."""
    out = []
    for e in entries:
        if e["verdict"] != FAITHFUL:
            out.append(f"{e['method']} maps are shown but not validated on this model: {'; '.join(e['reasons'])}.")
        st = e.get("stability") or {}
        if st.get("min") is not None and st["min"] < UNSTABLE_BELOW:
            out.append(f"{e['method']} maps are unstable under {st['least_stable_under']} (rank correlation "
                       f"{st['min']:.2f} with the clean image's map): read single maps with care.")
    return out


def validate(per_method: Mapping[str, Mapping[str, Any]], random: Mapping[str, Sequence[float]], *,
             maps: Mapping[str, torch.Tensor | np.ndarray] | None = None,
             sanity: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
             stability: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ``validation`` block of an evidence item.

    ``per_method[name]``: ``hits`` (or None), ``deletion``, ``insertion`` per example; ``random``:
    ``deletion`` and ``insertion`` of the random order on the same examples; ``maps[name]`` ``[N, ...]``
    on the same examples (method agreement); ``sanity[name]``: ``randomisation_check``'s result."""
    entries = [method_validation(name, hits=v.get("hits"), deletion=v["deletion"], insertion=v["insertion"],
                                 random_deletion=random["deletion"], random_insertion=random["insertion"],
                                 sanity=(sanity or {}).get(name), seed=seed,
                                 stability=(stability or {}).get(name)) for name, v in per_method.items()]
    ordered = ranked(entries)
    return {
        "limitations": limitations(ordered),
        "methods": ordered,
        "validated": [e["method"] for e in ordered if e["verdict"] == FAITHFUL],
        "not_shown": [e["method"] for e in ordered if e["verdict"] != FAITHFUL],
        "agreement": agreement(maps, seed=seed) if maps else [],
        "criteria": {
            "perturbation": "deletion AUC below and insertion AUC above the random order's, paired per example, "
                            f"{int(LEVEL * 100)}% bootstrap interval of the difference excluding 0",
            "sanity": f"rank correlation with the randomised model's maps below {MAX_RANK_CORRELATION} "
                      f"(upper end of its {int(LEVEL * 100)}% interval)",
            "intervals": f"percentile bootstrap, {RESAMPLES} resamples, seed {seed}",
        },
    }


def not_run(hits: Mapping[str, Sequence[bool]], reason: str, *, seed: int = 0) -> dict[str, Any]:
    """The ``validation`` block where the tests cannot run on this model (``reason`` says why): every
    method is listed as not shown to be faithful, with its pointing interval, so that reports label
    its maps as unvalidated rather than saying nothing."""
    entries = [{"method": name, "verdict": NOT_SHOWN, "reasons": [reason],
                "pointing": bootstrap_ci(np.asarray(h, dtype=np.float64), seed=seed),
                "deletion_auc": None, "insertion_auc": None, "deletion_minus_random": None,
                "insertion_minus_random": None, "sanity": None, "stability": None}
               for name, h in hits.items() if len(h)]
    ordered = ranked(entries)
    return {"limitations": limitations(ordered), "methods": ordered, "validated": [],
            "not_shown": [e["method"] for e in ordered], "agreement": [], "not_run": reason,
            "criteria": {"intervals": f"percentile bootstrap, {RESAMPLES} resamples, seed {seed}"}}


def summary_line(block: Mapping[str, Any]) -> str:
    """One sentence for summaries and limitations: which methods were validated, which not."""
    ok, no = block.get("validated") or [], block.get("not_shown") or []
    parts = [f"validated on this model: {', '.join(ok) if ok else 'none'}"]
    if no:
        parts.append(f"not shown to be faithful: {', '.join(no)}")
    return "; ".join(parts)

"""Per-audit validation of explanation methods: intervals, agreement, sanity, verdicts."""

from __future__ import annotations

import numpy as np
import torch

from workers.probes import validation as V


def test_bootstrap_intervals_contain_the_mean_and_are_reproducible():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 0.1, size=200)
    ci = V.bootstrap_ci(x, seed=3)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["n"] == 200
    assert abs(ci["mean"] - 0.3) < 0.03 and ci["high"] - ci["low"] < 0.05
    assert V.bootstrap_ci(x, seed=3) == ci
    # non-finite values (an example whose curve carried no signal) are left out, not averaged in
    assert V.bootstrap_ci([1.0, float("nan"), 1.0])["n"] == 2
    assert V.bootstrap_ci([])["mean"] is None


def test_stability_names_the_corruption_that_reorders_the_maps_most():
    clean = torch.arange(24.0).view(2, 12)
    st = V.stability_under(clean, {"blur": clean * 2, "contrast": torch.stack([-clean[0], clean[1]])})
    assert st["rank_correlation"]["blur"]["mean"] == 1.0
    assert st["least_stable_under"] == "contrast" and st["min"] == 0.0
    entry = {"method": "m", "verdict": V.FAITHFUL, "reasons": [], "stability": st}
    assert "unstable under contrast" in V.limitations([entry])[0]


def _method(gap_deletion: float, gap_insertion: float, sanity_passed: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    rd, ri = rng.uniform(0.3, 0.5, 64), rng.uniform(0.3, 0.5, 64)
    noise = rng.normal(0, 0.02, 64)
    return dict(deletion=rd + gap_deletion + noise, insertion=ri + gap_insertion + noise, random_deletion=rd,
                random_insertion=ri, sanity={"passed": sanity_passed})


def test_a_method_is_called_faithful_only_when_perturbation_and_sanity_both_say_so():
    good = V.method_validation("good", hits=[True] * 50 + [False] * 14, **_method(-0.1, 0.1, True))
    assert good["verdict"] == V.FAITHFUL and good["reasons"] == []
    assert good["deletion_minus_random"]["high"] < 0 < good["insertion_minus_random"]["low"]
    assert 0.6 < good["pointing"]["low"] < good["pointing"]["mean"] < good["pointing"]["high"] < 0.9
    # as faithful to the model as the random order: not shown to be, whatever its pointing
    flat = V.method_validation("flat", hits=[True] * 64, **_method(0.0, 0.0, True))
    assert flat["verdict"] == V.NOT_SHOWN and len(flat["reasons"]) == 2
    # a perfect order whose maps do not change with the model's weights explains the input
    blind = V.method_validation("blind", hits=None, **_method(-0.1, 0.1, False))
    assert blind["verdict"] == V.NOT_SHOWN and "randomised" in blind["reasons"][0]


def test_the_validation_block_lists_validated_methods_first_with_agreement():
    per_method, sanity = {}, {}
    rng = np.random.default_rng(0)
    for name, gap, ok in (("blind", -0.1, False), ("good", -0.1, True), ("flat", 0.0, True)):
        m = _method(gap, -gap, ok)
        per_method[name] = {"hits": [True] * 32 + [False] * 32, "deletion": m["deletion"], "insertion": m["insertion"]}
        sanity[name] = m["sanity"]
    random = {"deletion": _method(0, 0, True)["random_deletion"], "insertion": _method(0, 0, True)["random_insertion"]}
    maps = {name: torch.as_tensor(rng.random((8, 16))) for name in per_method}
    maps["good"] = maps["flat"] * 2  # the same order
    block = V.validate(per_method, random, maps=maps, sanity=sanity)
    assert block["validated"] == ["good"] and set(block["not_shown"]) == {"blind", "flat"}
    assert block["methods"][0]["method"] == "good"
    pairs = {tuple(a["methods"]): a["rank_correlation"]["mean"] for a in block["agreement"]}
    assert len(pairs) == 3 and pairs[("good", "flat")] == 1.0
    assert "good" in V.summary_line(block) and "not shown" in V.summary_line(block)


def test_the_reports_limitations_carry_what_the_validation_states():
    from governance.reports.context import kind_title, limitations

    text = "gradcam maps are shown but not validated on this model: deletion is not shown to be lower."
    evidence = [{"id": 7, "kind": "grounding", "metrics": {"validation": {"limitations": [text]}}},
                {"id": 8, "kind": "tcav", "metrics": {"results": []}}]
    # The report names a probe by its title, as in the measured rows beside it; ``missing`` is the
    # titles of the kinds that recorded no evidence.
    out = limitations(evidence, [kind_title("sanity")])
    assert out["stated"] == [{"evidence": 7, "kind": kind_title("grounding"), "text": text}]
    assert out["gaps"] == [f"No {kind_title('sanity').lower()} evidence was recorded, so this report makes no "
                           "statement about it."]


def test_the_reports_limitations_table_shows_the_disagreement_and_instability_the_validation_measured():
    from governance.reports.context import limitations

    validation = {"agreement": [{"methods": ["chefer", "raw"], "rank_correlation": {"mean": 0.41}}],
                  "methods": [{"method": "raw", "stability": {"min": 0.13, "least_stable_under": "contrast"}},
                              {"method": "chefer", "stability": None}],
                  "limitations": ["raw maps are unstable under contrast (rank correlation 0.13 ...)."]}
    out = limitations([{"id": 7, "kind": "token_attribution", "metrics": {"validation": validation}}], [])
    rows = {row["metric"]: row["value"] for row in out["measured"]}
    assert rows == {"Rank agreement of chefer and raw": 0.41, "Stability of raw under contrast": 0.13}


def test_methods_that_could_not_be_tested_are_listed_as_not_shown_with_the_reason():
    block = V.not_run({"chefer": [True, True, False], "raw": [True, False, False], "occlusion": []},
                      "deletion and insertion could not run on this model (tiles)")
    assert block["validated"] == [] and block["not_shown"] == ["chefer", "raw"]
    assert [e["pointing"]["n"] for e in block["methods"]] == [3, 3]
    assert all(e["verdict"] == V.NOT_SHOWN for e in block["methods"])
    assert block["limitations"][0] == ("chefer maps are shown but not validated on this model: deletion and "
                                       "insertion could not run on this model (tiles).")
    assert V.summary_line(block) == "validated on this model: none; not shown to be faithful: chefer, raw"

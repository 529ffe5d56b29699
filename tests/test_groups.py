"""Performance per group: accuracy, intervals, a corrected test of the largest gap, grounding evidence.

Actors: an auditor stating a model's performance for groups of inputs (AI Act Art. 13(3)(b)(v)) who
must not be told about a gap that is chance, nor miss one that is not; the CLI user.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import groups  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.errors import ProbeInputError  # noqa: E402
from workers.probes.zoo import group_split, world  # noqa: E402

from .tiny_models import save_tiny_clip  # noqa: E402

pytestmark = pytest.mark.slow


def _write(folder, rows):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (label, group) in enumerate(rows):
        scene = world.scene_at(4242, i, n_objects=1)
        scene.image.save(folder / f"images/{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "label": label, "group": group,
                                 "boxes": [list(scene.objects[0].box)]}))
    (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "m")


def test_a_clear_gap_is_significant_after_holm_and_equal_groups_are_not():
    correct = np.array([True] * 38 + [False] * 2 + [True] * 20 + [False] * 20 + [True] * 37 + [False] * 3)
    names = ["a"] * 40 + ["b"] * 40 + ["c"] * 40
    tests = groups.pair_tests(correct, names)
    by_pair = {(t.a, t.b): t for t in tests}
    worst = max(tests, key=lambda t: t.gap)
    assert (worst.a, worst.b) == ("a", "b") and worst.gap == pytest.approx(0.45)
    assert worst.p_adjusted < 0.001 and worst.p_adjusted >= worst.p_value
    equalish = by_pair.get(("a", "c")) or by_pair[("c", "a")]
    assert equalish.p_adjusted > 0.5
    # Holm: the smallest p of three pairs is multiplied by 3.
    smallest = min(tests, key=lambda t: t.p_value)
    assert smallest.p_adjusted == pytest.approx(min(1.0, 3 * smallest.p_value))


def test_bootstrap_interval_contains_the_accuracy_and_narrows_with_more_data():
    few = np.array([True, False] * 10)
    many = np.array([True, False] * 200)
    lo, hi = groups.bootstrap_ci(few, seed=1)
    lo2, hi2 = groups.bootstrap_ci(many, seed=1)
    assert lo < 0.5 < hi and lo2 < 0.5 < hi2
    assert hi2 - lo2 < hi - lo
    assert groups.bootstrap_ci(np.ones(5, dtype=bool)) == (1.0, 1.0)


def test_captions_must_contain_the_label_as_whole_words():
    assert groups.caption_contains("a blue square and a red circle", "a red circle")
    assert not groups.caption_contains("a red square and a blue circle", "a red circle")
    assert not groups.caption_contains("credit circles", "red circle")


def test_findings_follow_the_allowed_gap():
    report = groups.GroupReport({"x": {"n": 50, "accuracy": 0.9, "ci": [0.8, 1]},
                                 "y": {"n": 50, "accuracy": 0.6, "ci": [0.4, 0.7]}},
                                [groups.PairTest("x", "y", 0.3, 1e-4, 1e-4)], 0.05, 0.1)
    assert report.as_dict()["significant"] and findings_severity(report) == "high"
    report.max_gap_allowed = 0.5
    assert findings_severity(report) == "info"
    report.pairs = [groups.PairTest("x", "y", 0.3, 0.2, 0.2)]
    report.max_gap_allowed = 0.1
    assert findings_severity(report) == "low"


def findings_severity(report):
    return groups.findings_for(report)[0].severity


def test_it_reports_every_group_from_the_command_line_with_evidence(tmp_path, tiny_clip, capsys):
    data = _write(tmp_path / "d", [("a red circle", "g1"), ("a blue square", "g2"), ("a green cross", "g1"),
                                   ("a red circle", "g2"), ("a yellow triangle", "g3"), ("a blue square", "g3")])
    assert main(["groups", "--model", str(tiny_clip), "--dataset", str(data), "--json", "--no-progress",
                 "--explain", "--figures", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["groups"]) == {"g1", "g2", "g3"}
    assert all(g["n"] == 2 and 0 <= g["ci"][0] <= g["accuracy"] <= g["ci"][1] <= 1 for g in out["groups"].values())
    assert len(out["pairs"]) == 3 and 0 <= out["p_value"] <= out["p_adjusted"] <= 1
    assert isinstance(out["significant"], bool) and out["max_gap"] >= 0
    ev = out["evidence"]["g1"]
    assert ev["n_explained"] == 2 and 0 <= ev["relevance_on_object"] <= 1 and 0 < ev["object_area"] < 1
    assert (tmp_path / "groups-groups.png").is_file()


def test_bad_datasets_are_refused_with_a_clear_error(tmp_path, tiny_clip, capsys):
    data = _write(tmp_path / "d", [("a red circle", "g1")])
    (data / "annotations.jsonl").write_text(json.dumps({"image": "images/0.png", "label": "a red circle"}) + "\n")
    with pytest.raises(ProbeInputError, match="missing key"):
        groups.load_group_dataset(data)
    (data / "annotations.jsonl").write_text(json.dumps({"image": "../x.png", "label": "a", "group": "g"}) + "\n")
    with pytest.raises(ProbeInputError, match="outside|not found"):
        groups.load_group_dataset(data)
    _write(data, [("a red circle", "g1"), ("a blue square", "g1")])
    assert main(["groups", "--model", str(tiny_clip), "--dataset", str(data), "--json", "--no-progress"]) == 2
    assert "at least 2 groups" in capsys.readouterr().err


def test_the_zoo_group_splits_are_deterministic_and_the_control_only_shuffles_groups(tmp_path):
    spec = group_split.GroupSplit(seed=77, per_group=4, degraded="group-c", shuffle_groups=False)
    control = group_split.GroupSplit(seed=77, per_group=4, degraded="group-c", shuffle_groups=True)
    a = group_split.write_group_dataset(tmp_path / "a", spec)
    b = group_split.write_group_dataset(tmp_path / "b", spec)
    c = group_split.write_group_dataset(tmp_path / "c", control)
    rows = lambda d: [json.loads(x) for x in (d / "annotations.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(a) == rows(b)
    assert (a / "images/00003.png").read_bytes() == (c / "images/00003.png").read_bytes()
    assert all((r["group"] == "group-c") == (r["condition"] == "low-contrast") for r in rows(a))
    assert [r["label"] for r in rows(a)] == [r["label"] for r in rows(c)]
    assert [r["group"] for r in rows(a)] != [r["group"] for r in rows(c)]
    assert sorted(r["group"] for r in rows(a)) == sorted(r["group"] for r in rows(c))


@pytest.mark.slow
def test_on_the_zoo_the_degraded_group_is_found_and_the_control_is_not(tmp_path):
    from workers.probes import suite
    from workers.probes.zoo import checkpoint_path

    model = str(checkpoint_path("tiny-clip"))
    found = suite.run("groups", model, str(group_split.group_dataset_dir("groups", root=tmp_path))).metrics
    assert found["significant"] and found["max_gap_groups"][1] == group_split.GROUPS[-1]
    assert found["max_gap"] > 0.2
    control = suite.run("groups", model, str(group_split.group_dataset_dir("groups-control", root=tmp_path))).metrics
    assert not control["significant"]

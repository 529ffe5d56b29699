"""Robustness probes: corruptions by severity, the typographic attack and prompt perturbations.

Actors: an auditor who reads accuracy, flip rate and explanation drift by severity; the CLI user.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import corruptions, robustness  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.zoo import shortcut as zoo_shortcut  # noqa: E402
from workers.probes.zoo import world  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """24 held-out-style zoo scenes, every object annotated (so other objects are not competitors)."""
    scenes = world.sample_scenes(5_000_011, 24)
    return world.write_dataset(tmp_path_factory.mktemp("robustness") / "data", scenes)


@pytest.fixture(scope="session")
def report(dataset):
    from workers.probes.adapters import load_adapter
    from workers.probes.zoo import checkpoint_path

    adapter = load_adapter(str(checkpoint_path("tiny-clip")))  # the reference CLIP (clean accuracy ~0.86)
    examples, classes = robustness.load_examples(dataset)
    # prompt probes are exercised by the CLI test below
    return robustness.run_robustness(adapter, examples, classes, probes="corruption,typographic")


def test_it_corrupts_more_with_each_severity():
    image = world.scene_at(5_000_017, 0).image
    clean = np.asarray(image, dtype=float)
    for kind in corruptions.CORRUPTIONS:
        distances = [np.abs(np.asarray(corruptions.corrupt(image, kind, s, seed=3), dtype=float) - clean).mean()
                     for s in corruptions.SEVERITIES]
        # never less corrupted at a higher severity (brightness saturates on light backgrounds, as in
        # ImageNet-C), and clearly more at 5 than at 1
        assert all(b >= a for a, b in itertools.pairwise(distances)), (kind, distances)
        assert distances[-1] > 1.5 * distances[0], (kind, distances)
        # deterministic: the same seed gives the same pixels
        again = corruptions.corrupt(image, kind, 3, seed=3)
        assert np.array_equal(np.asarray(again), np.asarray(corruptions.corrupt(image, kind, 3, seed=3)))
    with pytest.raises(robustness.ProbeInputError, match="severity"):
        corruptions.corrupt(image, "jpeg", 6)


def test_it_loses_accuracy_with_severity_on_average(report):
    metrics = report.as_dict()
    curve = [metrics["clean_accuracy"], *metrics["mean_corruption_accuracy_by_severity"].values()]
    print("accuracy by severity:", curve)
    assert curve[-1] < curve[0]
    # on average over the corruptions, never better at a higher severity (tolerance: one image of 24)
    assert all(b <= a + 1 / 24 for a, b in itertools.pairwise(curve))
    # explanations drift more as corruption grows
    rho = {s: np.mean([r["explanation_spearman"] for r in metrics["probes"] if r["severity"] == s]) for s in (1, 5)}
    assert rho[5] < rho[1] <= 1.0


def test_it_measures_the_typographic_attack_against_its_control(report):
    rows = {r["probe"]: r for r in report.rows}
    attack, control = rows["typographic"], rows["typographic_control"]
    print("typographic:", attack, "control:", control)
    for row in (attack, control):
        assert 0.0 <= row["flip_rate"] <= 1.0 and 0.0 <= row["attack_success"] <= 1.0
        assert row["explanation_spearman"] < 1.0  # the label is in the image: explanations move


def test_it_writes_the_wrong_class_name_where_no_object_is():
    scene = world.scene_at(5_000_019, 0)
    boxes = [o.box for o in scene.objects]
    out = robustness.write_text(scene.image, "blue square", boxes)
    changed = np.argwhere((np.asarray(out, dtype=int) != np.asarray(scene.image, dtype=int)).any(axis=2))
    assert len(changed) > 100
    inside = sum(1 for y, x in changed if any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes))
    assert inside / len(changed) < 0.2


def test_it_perturbs_prompts_deterministically():
    assert robustness.synonym("a red circle") == "a crimson disk"
    assert robustness.typo("a red circle", 0) == robustness.typo("a red circle", 0) != "a red circle"
    assert sorted(robustness.typo("a red circle", 1)) == sorted("a red circle")
    assert robustness.template("a red circle", 0) == "a photo of a red circle."
    assert robustness.scramble("red circle", 1) != "red circle" and len(robustness.scramble("red circle", 1)) == 10


def test_it_prints_json_and_refuses_unknown_probes(dataset, tmp_path, capsys):
    model = str(zoo_shortcut.model_path(zoo_shortcut.CLEAN_MODEL))
    code = main(["robustness", "--model", model, "--dataset", str(dataset), "--probes", "jpeg,typos", "--severities",
                 "1,5", "--limit", "12", "--figures", str(tmp_path), "--json", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    payload = json.loads(out.out)
    assert [(r["probe"], r["severity"]) for r in payload["probes"]] == [("jpeg", 1), ("jpeg", 5), ("typos", None)]
    for r in payload["probes"]:
        assert {"accuracy", "accuracy_drop", "flip_rate", "score_drop", "explanation_spearman"} <= set(r)
    assert (tmp_path / "robustness-robustness_curves.png").stat().st_size > 1000
    code = main(["robustness", "--model", model, "--dataset", str(dataset), "--probes", "fog", "--json",
                 "--no-progress"])
    assert code == 2 and "unknown robustness probe 'fog'" in capsys.readouterr().err

"""TCAV: the statistics a reviewer relies on, on the shortcut zoo's models (ground truth known).

Actors: an auditor who asks "does the score for 'a red circle' depend on the watermark?" and reads
a p-value; the CLI user who gets the JSON contract or a clear error.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import tcav  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.zoo import shortcut as zoo_shortcut  # noqa: E402
from workers.probes.zoo import world  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory):
    return zoo_shortcut.probe_data(root=tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="session")
def adapters():
    from workers.probes.adapters import load_adapter

    return {name: load_adapter(str(zoo_shortcut.model_path(name))) for name in zoo_shortcut.MODELS}


@pytest.fixture(scope="session")
def folders(probe_data):
    concepts = probe_data / "concepts"
    return {
        "inputs": tcav.load_images(tcav.list_images(probe_data / "inputs")),
        "watermark": tcav.load_images(tcav.list_images(concepts / "watermark")),
        "random": tcav.load_images(tcav.list_images(concepts / "random")),
    }


# --- statistics -------------------------------------------------------------------------------


def test_it_adjusts_p_values_like_r_holm():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") -> 0.03 0.06 0.06 0.02
    assert tcav.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # R: p.adjust(c(0.5, 0.6), "holm") -> 1 1 (capped at 1, monotone)
    assert tcav.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    # R: p.adjust(c(0.001, 0.2, 0.01, 0.04, 0.3), "holm") -> 0.005 0.40 0.04 0.12 0.40
    assert tcav.holm([0.001, 0.2, 0.01, 0.04, 0.3]) == pytest.approx([0.005, 0.4, 0.04, 0.12, 0.4])
    assert tcav.holm([]) == []


def test_it_fits_the_same_classifier_as_sklearn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    for dim in (5, 60):  # fewer and more dimensions than examples (the SVD reduction)
        x = torch.randn(3, 20, dim, generator=g, dtype=torch.float64)
        y = (torch.rand(3, 20, generator=g) > 0.5).double()
        x[y > 0] += 0.7
        weights = torch.rand(3, 20, generator=g, dtype=torch.float64)
        weights /= weights.sum(dim=1, keepdim=True)
        w, b = tcav.ridge_logistic(x, y, weights, l2=0.05)
        for r in range(3):
            ref = LogisticRegression(C=1 / 0.05, tol=1e-12, max_iter=10_000).fit(
                x[r].numpy(), y[r].numpy(), sample_weight=weights[r].numpy())
            np.testing.assert_allclose(w[r].numpy(), ref.coef_[0], atol=1e-5)
            assert b[r].item() == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_it_measures_held_out_accuracy_of_each_cav():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    separable = fit = tcav.fit_cavs(torch.randn(4, 30, 16, generator=g) + 3 * direction,
                                    torch.randn(4, 30, 16, generator=g), generator=g)
    noise = tcav.fit_cavs(torch.randn(4, 30, 16, generator=g), torch.randn(4, 30, 16, generator=g), generator=g)
    assert (separable.accuracy == 1.0).all()
    assert noise.accuracy.mean() < 0.7
    # the CAV points from the negatives towards the positives, as a unit vector
    assert torch.allclose(fit.vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (fit.vectors @ direction > 0).all()


def test_it_scores_the_share_of_inputs_with_a_positive_directional_derivative():
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5], [2.0, -3.0]])
    scores, magnitude = tcav.tcav_scores(gradients, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert scores.tolist() == [0.75, 0.5]
    assert magnitude[0].item() == pytest.approx(4 / 5)
    assert magnitude[1].item() == pytest.approx(1.5 / 4.5)


def test_it_picks_every_few_layers_and_refuses_missing_ones():
    assert tcav.resolve_layers("auto", 4) == [1, 2, 3, 4]
    assert tcav.resolve_layers("auto", 12) == [3, 6, 9, 12]
    assert tcav.resolve_layers("4,2", 4) == [2, 4]
    with pytest.raises(tcav.ProbeInputError, match="do not exist.*1..4"):
        tcav.resolve_layers("2,7", 4)
    with pytest.raises(tcav.ProbeInputError, match="auto"):
        tcav.resolve_layers("two", 4)


# --- acceptance on the zoo ----------------------------------------------------------------------


def test_it_keeps_the_false_positive_rate_of_random_concepts_at_or_below_alpha(adapters, folders):
    """100 random concepts (random folders of the same size as the watermark folder), each tested
    at every layer with Holm: how often is any layer significant? Activations and gradients are
    computed once and reused by every trial."""
    adapter = adapters[zoo_shortcut.CLEAN_MODEL]
    layers = tcav.resolve_layers("auto", adapter.num_layers)
    # random "concept folders" come from other random scenes than the random folder
    concept_pool = [world.scene_at(3_000_017, i).image for i in range(2 * len(folders["watermark"]))]
    random_acts = tcav.pooled_activations(adapter, folders["random"], layers)
    pool_acts = tcav.pooled_activations(adapter, concept_pool, layers)
    grads = tcav.target_gradients(adapter, folders["inputs"], zoo_shortcut.TARGET, layers)
    rate = tcav.false_positive_rate(random_acts, pool_acts, grads, layers, trials=100,
                                    concept_size=len(folders["watermark"]))
    print("random-concept false positive rate:", rate)
    assert rate["family_wise_error_rate"] <= 0.05


# The acceptance on the zoo (watermark significant for the shortcut model, at a reliable layer, and
# at no layer for the clean control) runs through the CLI in tests/test_shortcut.py.


def test_it_draws_concept_heatmaps_on_the_patch_grid(adapters, folders):
    adapter = adapters[zoo_shortcut.SHORTCUT_MODEL]
    layer = adapter.num_layers
    acts = tcav.pooled_activations(adapter, folders["watermark"] + folders["random"], [layer])[layer]
    n = len(folders["watermark"])
    cavs = tcav.fit_cavs(acts[None, :n], acts[None, n:], generator=torch.Generator().manual_seed(0))
    heat = tcav.concept_heatmaps(adapter, folders["watermark"][:3], cavs.vectors[0], layer)
    assert heat.shape == (3, *adapter.grid)
    # centred per image: positive = more concept-like than the image's average patch
    assert torch.allclose(heat.flatten(1).mean(dim=1), torch.zeros(3), atol=1e-4)
    assert (heat.flatten(1).std(dim=1) > 0).all()


# --- command line ---------------------------------------------------------------------------------


def _cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_it_prints_the_json_contract_and_writes_figures(probe_data, tmp_path, capsys):
    model = str(zoo_shortcut.model_path(zoo_shortcut.SHORTCUT_MODEL))
    code, out, err = _cli(["tcav", "--model", model, "--inputs", str(probe_data / "inputs"), "--target",
                           zoo_shortcut.TARGET, "--concepts", str(probe_data / "concepts"), "--layers", "2,4",
                           "--random-runs", "5", "--null-concepts", "10", "--figures", str(tmp_path), "--json",
                           "--no-progress"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["target"] == zoo_shortcut.TARGET
    assert [(r["concept"], r["layer"]) for r in payload["results"]] == [("watermark", 2), ("watermark", 4)]
    for r in payload["results"]:
        assert {"concept", "layer", "tcav_score", "magnitude", "p_value", "p_adjusted", "significant",
                "cav_accuracy", "reliable"} <= set(r)
        assert 0 <= r["tcav_score"] <= 1 and r["p_value"] <= r["p_adjusted"] <= 1
    assert (tmp_path / "tcav-tcav_bars.png").stat().st_size > 1000
    assert (tmp_path / "tcav-localisation_watermark.png").stat().st_size > 1000


@pytest.fixture
def concepts_copy(probe_data, tmp_path):
    target = tmp_path / "concepts"
    shutil.copytree(probe_data / "concepts", target)
    return target


def _tcav_args(probe_data, concepts, *extra):
    return ["tcav", "--model", str(zoo_shortcut.model_path(zoo_shortcut.CLEAN_MODEL)), "--inputs",
            str(probe_data / "inputs"), "--target", "a red circle", "--concepts", str(concepts), "--random-runs", "5",
            "--null-concepts", "10", "--no-progress", "--json", *extra]


def test_it_refuses_a_too_small_concept_folder_and_says_how_many_are_needed(probe_data, concepts_copy, capsys):
    (concepts_copy / "empty").mkdir()
    code, out, err = _cli(_tcav_args(probe_data, concepts_copy), capsys)
    assert code == 2 and out == ""
    assert "concept 'empty'" in err and "holds 0 image(s); at least 10 are needed" in err
    for path in sorted((concepts_copy / "watermark").iterdir())[5:]:
        path.unlink()
    code, _, err = _cli(_tcav_args(probe_data, concepts_copy, "--concept", "watermark"), capsys)
    assert code == 2 and "holds 5 image(s); at least 10" in err


def test_it_refuses_unreadable_images_and_missing_layers(probe_data, concepts_copy, capsys):
    code, _, err = _cli(_tcav_args(probe_data, concepts_copy, "--layers", "3,9"), capsys)
    assert code == 2 and "layer(s) 9 do not exist" in err
    (concepts_copy / "watermark" / "0000.png").write_bytes(b"not a png at all")
    code, _, err = _cli(_tcav_args(probe_data, concepts_copy), capsys)
    assert code == 2 and "unreadable image" in err and "0000.png" in err
    shutil.rmtree(concepts_copy / "random")
    code, _, err = _cli(_tcav_args(probe_data, concepts_copy), capsys)
    assert code == 2 and "random counterexamples folder not found" in err

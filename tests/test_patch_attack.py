"""Universal adversarial patch: optimisation, held-out success, and relevance captured by the patch.

Actors: an auditor testing resilience against manipulation (AI Act Art. 15(5)) who needs to know
whether a small printed patch steers the model, and whether the explanation shows it; the CLI user.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import patch_attack as pa  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.region_relevance import cell_coverage, share_on_region  # noqa: E402
from workers.probes.zoo import world  # noqa: E402

from .tiny_models import save_tiny_clip  # noqa: E402
from .zoo_fixtures import heldout_fixture  # noqa: E402

pytestmark = pytest.mark.slow

heldout = heldout_fixture(12)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "m")


@pytest.fixture(scope="module")
def adapter(tiny_clip):
    from workers.probes.adapters import load_adapter

    return load_adapter(str(tiny_clip))


def test_the_patch_never_exceeds_the_requested_area_and_lands_where_placed():
    for area in (0.01, 0.06, 0.2):
        side = pa.patch_side(area, 96)
        assert side ** 2 / 96 ** 2 <= area and (side + 1) ** 2 / 96 ** 2 > area
    unit = torch.zeros(2, 3, 10, 10)
    patch = torch.ones(3, 3, 3, requires_grad=True)
    out = pa.paste(unit, patch, torch.tensor([[0, 0], [7, 5]]))
    assert out[0, :, :3, :3].eq(1).all() and out[0].sum() == 27
    assert out[1, :, 7:10, 5:8].eq(1).all() and out[1].sum() == 27
    (grad,) = torch.autograd.grad(out.sum(), patch)
    assert grad.eq(2).all()  # each patch pixel appears once in each image


def test_relevance_share_counts_partly_covered_cells():
    cover = cell_coverage((4, 4), 8, (0, 0, 3, 2))  # cells are 2x2 px
    assert cover[0, 0] == 1 and cover[0, 1] == pytest.approx(0.5) and cover[1, 0] == 0
    assert share_on_region(np.ones((4, 4)), cover) == pytest.approx(cover.mean())
    focused = np.zeros((4, 4))
    focused[0, 0] = 5
    assert share_on_region(focused, cover) == 1.0
    assert share_on_region(np.zeros((4, 4)), cover) == pytest.approx(cover.mean())


def test_batched_gradient_equals_the_per_image_sum(adapter):
    images = [world.scene_at(5, i).image for i in range(4)]
    unit = pa.unit_inputs(adapter, images)
    patch = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0))
    positions = pa.random_positions(torch.Generator().manual_seed(1), 4, unit.shape[-1], 7)
    own = ["a blue square", "a green cross", "a blue square", "a yellow triangle"]
    batched, loss_b = pa.patch_gradient(adapter, unit, patch, positions, "a red circle", own)
    looped, loss_l = pa.patch_gradient(adapter, unit, patch, positions, "a red circle", own, per_image=True)
    assert torch.allclose(batched, looped, atol=1e-6) and loss_b == pytest.approx(loss_l, abs=1e-5)
    assert batched.abs().sum() > 0


def test_optimisation_raises_the_target_probability(adapter):
    images = [world.scene_at(6, i).image for i in range(8)]
    unit = pa.unit_inputs(adapter, images)
    own = [s.objects[0].prompt for s in (world.scene_at(6, i) for i in range(8))]
    attack = pa.optimise_patch(adapter, unit, "a red circle", own, area=0.1, steps=25, batch_size=8, step_size=0.05)
    assert attack.patch.min() >= 0 and attack.patch.max() <= 1  # projected onto valid pixels
    assert np.mean(attack.losses[-5:]) > np.mean(attack.losses[:5])


def test_it_attacks_from_the_command_line_with_figures(tmp_path, tiny_clip, heldout, capsys):
    assert main(["patch-attack", "--model", str(tiny_clip), "--dataset", str(heldout), "--target", "a red circle",
                 "--area", "0.06", "--steps", "3", "--json", "--no-progress", "--figures", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"success_rate", "clean_target_rate", "patch_area", "relevance_on_patch", "steps", "seconds"} <= set(out)
    assert 0 < out["patch_area"] <= 0.06 and out["steps"] == 3 and out["seconds"] > 0
    assert 0 <= out["success_rate"] <= 1 and 0 <= out["clean_target_rate"] <= 1 and 0 <= out["relevance_on_patch"] <= 1
    assert out["n_train"] + out["n_test"] <= 12
    assert (tmp_path / "patch_attack-patch.png").is_file() and (tmp_path / "patch_attack-examples.png").is_file()


def test_bad_parameters_are_refused(tiny_clip, heldout, capsys):
    from workers.probes import suite
    from workers.probes.errors import ProbeInputError

    with pytest.raises(ProbeInputError, match="target"):
        suite.run("patch_attack", str(tiny_clip), str(heldout), {"area": 0.06})
    with pytest.raises(ProbeInputError, match="area"):
        suite.run("patch_attack", str(tiny_clip), str(heldout), {"target": "a red circle", "area": 0.9})
    assert main(["patch-attack", "--model", str(tiny_clip), "--dataset", str(heldout), "--target", "x",
                 "--area", "-1", "--no-progress"]) == 2
    assert "area" in capsys.readouterr().err


def test_it_attacks_a_generative_model_toward_a_word(heldout):
    from workers.probes import suite
    from workers.probes.zoo import checkpoint_path

    m = suite.run("patch_attack", str(checkpoint_path("tiny-llava")), str(heldout),
                  {"target": "yellow", "steps": 2, "batch_size": 4, "limit": 6}).metrics
    assert m["n_test"] >= 1 and 0 <= m["success_rate"] <= 1 and m["relevance_method"] == "token_attribution"
    assert m["relevance_on_patch"] is None or 0 <= m["relevance_on_patch"] <= 1


@pytest.mark.slow
def test_on_the_zoo_clip_a_patch_steers_a_known_class_and_captures_relevance():
    """At the default settings, toward a class the zoo CLIP knows: the patch wins on far more held-out
    images than the target wins unpatched, and draws at least twice its area of the relevance. The
    issue's 0.8 success at area 0.06 is out of reach on this model (the measurements, with the
    optimiser and objective variants tried, are in benchmarks/results/patch_attack_zoo_clip.json)."""
    from workers.probes import suite
    from workers.probes.zoo import checkpoint_path

    params = {"target": "a yellow cross", "area": 0.06}
    m = suite.run("patch_attack", str(checkpoint_path("tiny-clip")), None, params).metrics
    assert m["patch_area"] <= 0.06
    assert m["success_rate"] - m["clean_target_rate"] >= 0.4
    assert m["relevance_on_patch"] >= 2 * m["patch_area"]


def test_the_benchmark_compares_batched_and_per_image_optimisation_that_agree(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks", "patch_attack", "--batch", "2", "--steps", "1",
                           "--repeats", "1", "--json", str(tmp_path / "b.json")], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["max_abs_diff"] < 1e-5 and out["batched"]["median_s"] > 0 and out["per_image"]["median_s"] > 0
    assert out["speedup_batched_vs_per_image"] > 0

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


@pytest.mark.parametrize("patch_size", [8, 4])
def test_grid_placement_puts_the_patch_corner_on_the_adapters_token_grid(tmp_path, patch_size):
    from workers.probes.adapters import load_adapter

    adapter = load_adapter(str(save_tiny_clip(tmp_path / "m", image_size=32, patch_size=patch_size)))
    assert pa.grid_cell(adapter, 32) == (patch_size, patch_size)
    side = pa.patch_side(0.06, 32)  # 7 px: not a whole number of cells
    positions = pa.grid_positions(torch.Generator().manual_seed(0), 400, 32, side, (patch_size, patch_size))
    assert positions.remainder(patch_size).eq(0).all()
    assert positions.min() >= 0 and positions.max() + side <= 32  # the patch stays inside the input
    corners = set(range(0, 32 - side + 1, patch_size))
    assert set(positions[:, 0].tolist()) == corners and set(positions[:, 1].tolist()) == corners

    scenes = [world.scene_at(7, i) for i in range(8)]
    images, prompts = [sc.image for sc in scenes], [sc.objects[0].prompt for sc in scenes]
    on_grid = pa.run_patch_attack(adapter, images, prompts, "a red circle", steps=2, batch_size=4, explain=False)
    assert on_grid.attack.placement == "grid"
    assert on_grid.outcome.positions.remainder(patch_size).eq(0).all()
    metrics = on_grid.as_dict()
    assert metrics["placement"] == "grid" and 0 <= metrics["success_rate_any_position"] <= 1
    anywhere = pa.run_patch_attack(adapter, images, prompts, "a red circle", steps=2, batch_size=4, explain=False,
                                   placement="any", seed=3)
    assert anywhere.outcome.positions.remainder(patch_size).ne(0).any()
    assert anywhere.as_dict()["success_rate_any_position"] == anywhere.as_dict()["success_rate"]


def test_held_out_images_are_disjoint_from_the_training_images(adapter):
    """Each image a distinct flat colour: the patch never meets a held-out image in training, and
    images of the target are in neither half."""
    from PIL import Image

    colours = [(10 * i, 255 - 10 * i, (37 * i) % 256) for i in range(11)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    prompts = ["a red circle" if i in (2, 7) else "a blue square" for i in range(11)]
    train, test, train_prompts, test_prompts = pa.split_dataset(adapter, images, prompts, "a red circle")
    assert train.shape[0] + test.shape[0] == 9 and train.shape[0] == len(train_prompts) > 0
    assert test.shape[0] == len(test_prompts) > 0
    assert "a red circle" not in train_prompts + test_prompts
    each = pa.unit_inputs(adapter, images)
    which = [[i for i in range(11) if torch.equal(row, each[i])] for row in torch.cat([train, test])]
    assert all(len(w) == 1 for w in which)
    train_ids, test_ids = {w[0] for w in which[:train.shape[0]]}, {w[0] for w in which[train.shape[0]:]}
    assert not train_ids & test_ids and train_ids | test_ids == set(range(11)) - {2, 7}


def test_restarts_keep_the_patch_that_wins_most_validation_images_of_the_training_half(adapter):
    scenes = [world.scene_at(8, i) for i in range(8)]
    unit = pa.unit_inputs(adapter, [sc.image for sc in scenes])
    own = [sc.objects[0].prompt for sc in scenes]
    kw = dict(area=0.1, steps=3, batch_size=4, step_size=0.05)
    best = pa.optimise_with_restarts(adapter, unit, "a red circle", own, restarts=3, seed=5, **kw)
    assert len(best.validation_rates) == 3 and all(0 <= r <= 1 for r in best.validation_rates)
    # each restart fits the images before the validation quarter only, from its own seed
    n_fit = 8 - round(8 * pa.VALIDATION_FRACTION)
    restarts = [pa.optimise_patch(adapter, unit[:n_fit], "a red circle", own[:n_fit], seed=5 + k, **kw)
                for k in range(3)]
    assert not torch.equal(restarts[0].patch, restarts[1].patch)
    assert torch.equal(best.patch, restarts[int(np.argmax(best.validation_rates))].patch)
    single = pa.optimise_with_restarts(adapter, unit, "a red circle", own, restarts=1, seed=5, **kw)
    assert single.validation_rates == []
    assert torch.equal(single.patch, pa.optimise_patch(adapter, unit, "a red circle", own, seed=5, **kw).patch)


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
    assert out["placement"] == "grid" and 0 <= out["success_rate_any_position"] <= 1
    assert out["restarts"] == 2 and len(out["validation_success_rates"]) == 2
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
    with pytest.raises(ProbeInputError, match="placement"):
        suite.run("patch_attack", str(tiny_clip), str(heldout), {"target": "a red circle", "placement": "corner"})
    with pytest.raises(ProbeInputError, match="restarts"):
        suite.run("patch_attack", str(tiny_clip), str(heldout), {"target": "a red circle", "restarts": 0})


def test_it_attacks_a_generative_model_toward_a_word(heldout):
    from workers.probes import suite
    from workers.probes.zoo import checkpoint_path

    m = suite.run("patch_attack", str(checkpoint_path("tiny-llava")), str(heldout),
                  {"target": "yellow", "steps": 2, "batch_size": 4, "limit": 6}).metrics
    assert m["n_test"] >= 1 and 0 <= m["success_rate"] <= 1 and m["relevance_method"] == "token_attribution"
    assert m["relevance_on_patch"] is None or 0 <= m["relevance_on_patch"] <= 1


@pytest.mark.slow
def test_on_the_zoo_clip_a_grid_placed_patch_steers_held_out_images_and_captures_relevance():
    """Issue #27's bar at the default settings: a universal patch of at most 6% of the input, trained
    on the first half of the zoo's held-out split at random token-grid positions, wins at least 80%
    of the other half's images and draws at least twice its area of the relevance. Off the grid the
    same patch wins far fewer (measured beside it; benchmarks/results/patch_attack_zoo_clip.json)."""
    from workers.probes import suite
    from workers.probes.zoo import checkpoint_path

    params = {"target": "a yellow cross", "area": 0.06}
    m = suite.run("patch_attack", str(checkpoint_path("tiny-clip")), None, params).metrics
    assert m["placement"] == "grid" and m["patch_area"] <= 0.06
    assert m["success_rate"] >= 0.8 and m["clean_target_rate"] < 0.2
    assert m["relevance_on_patch"] >= 2 * m["patch_area"]
    assert m["success_rate_any_position"] < m["success_rate"]


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

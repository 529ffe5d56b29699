"""Faithfulness metrics on hand-made maps with known answers, and a fake model whose evidence is known.

Actors: ``spike`` maps (one hot pixel), a ``box_map`` that lights exactly the object, and
``ObjectScorer``, a stand-in dual encoder whose score is the mean brightness of a fixed object region,
so the faithful patch order is known in advance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.probes import faithfulness, sanity, stability

pytestmark = pytest.mark.slow


def spike(height: int, width: int, x: int, y: int) -> torch.Tensor:
    grid = torch.zeros(height, width)
    grid[y, x] = 1.0
    return grid


# --------------------------------------------------------------------------- pointing game


def test_it_counts_a_peak_inside_a_box_as_a_hit():
    assert faithfulness.pointing_hit(spike(224, 224, 50, 60), [[40, 40, 80, 80]], 224, 224)


def test_it_counts_a_peak_far_from_every_box_as_a_miss():
    boxes = [[40, 40, 80, 80], [150, 150, 200, 200]]
    assert not faithfulness.pointing_hit(spike(224, 224, 120, 10), boxes, 224, 224)


def test_it_allows_15_pixels_of_tolerance_at_224():
    box = [[100, 100, 140, 140]]
    # pixel centre x = 154.5 is 14.5 px right of the box; 156.5 is 16.5 px away
    assert faithfulness.pointing_hit(spike(224, 224, 154, 120), box, 224, 224)
    assert not faithfulness.pointing_hit(spike(224, 224, 156, 120), box, 224, 224)


def test_it_scales_the_tolerance_with_the_image_size():
    assert faithfulness.scaled_tolerance(224, 224) == pytest.approx(15.0)
    assert faithfulness.scaled_tolerance(448, 448) == pytest.approx(30.0)
    box = [[100, 100, 140, 140]]
    # 24.5 px from the box: a miss at 15 px, a hit once the tolerance scales to 30 px on a 448 image
    assert faithfulness.pointing_hit(spike(448, 448, 164, 120), box, 448, 448)
    assert not faithfulness.pointing_hit(spike(448, 448, 171, 120), box, 448, 448)


def test_it_upsamples_a_coarse_map_onto_the_stored_image():
    # a 4x4 grid with its hot cell in the bottom-right quarter of a 320x240 image
    grid = torch.zeros(4, 4)
    grid[3, 3] = 1.0
    result = faithfulness.localisation(grid, [[240, 180, 320, 240]], 320, 240)
    assert result.hit
    assert 240 <= result.peak_xy[0] <= 320 and 180 <= result.peak_xy[1] <= 240
    assert not faithfulness.pointing_hit(grid, [[0, 0, 80, 60]], 320, 240)


def test_it_gives_a_constant_map_no_hits():
    # ties go to the top-left pixel: an uninformative map must not score by pointing "everywhere"
    assert not faithfulness.pointing_hit(torch.ones(7, 7), [[100, 100, 200, 200]], 224, 224)


def test_it_scores_a_huge_image_at_capped_resolution_with_the_same_answer():
    grid = torch.zeros(7, 7)
    grid[1, 5] = 1.0
    small = faithfulness.localisation(grid, [[700, 100, 1000, 300]], 1050, 1050)
    large = faithfulness.localisation(grid, [[2800, 400, 4000, 1200]], 4200, 4200)
    assert small.hit and large.hit
    assert large.chance_hit == pytest.approx(small.chance_hit, abs=0.01)


def test_it_computes_chance_as_the_share_of_pixels_within_tolerance():
    result = faithfulness.localisation(torch.zeros(7, 7), [[0, 0, 112, 224]], 224, 224, tolerance_px=0)
    assert result.chance_hit == pytest.approx(0.5)
    widened = faithfulness.localisation(torch.zeros(7, 7), [[0, 0, 112, 224]], 224, 224)
    assert widened.chance_hit == pytest.approx((112 + 15) / 224, abs=0.01)


# --------------------------------------------------------------------------- energy pointing game


def test_it_gives_full_energy_to_a_map_that_lights_only_the_box():
    grid = torch.zeros(224, 224)
    grid[40:80, 40:80] = 1.0
    assert faithfulness.energy_pointing(grid, [[40, 40, 80, 80]], 224, 224) == pytest.approx(1.0)


def test_it_gives_a_constant_map_the_box_area_share():
    assert faithfulness.energy_pointing(torch.ones(7, 7), [[0, 0, 112, 112]], 224, 224) == pytest.approx(0.25)


def test_it_is_blind_to_an_offset_added_to_the_map():
    grid = torch.zeros(224, 224)
    grid[40:80, 40:80] = 1.0
    assert faithfulness.energy_pointing(grid + 5.0, [[40, 40, 80, 80]], 224, 224) == pytest.approx(1.0)


# --------------------------------------------------------------------------- deletion / insertion


class ObjectScorer:
    """A fake dual encoder: the score of an image is the mean of its pixels over a fixed object
    region, whatever the prompt. Counts forward passes."""

    grid = (4, 4)
    patch_size = 8
    image_size = 32

    def __init__(self, object_cells: list[tuple[int, int]]):
        self.region = torch.zeros(32, 32)
        for row, col in object_cells:
            self.region[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 1.0
        self.calls: list[int] = []

    def score(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        assert len(prompts) == len(pixel_values)
        self.calls.append(len(pixel_values))
        return (pixel_values.mean(dim=1) * self.region).sum(dim=(1, 2)) / self.region.sum()

    def score_matrix(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        """"an object" scores 10x the object's brightness, any other prompt 0."""
        self.calls.append(len(pixel_values))
        brightness = (pixel_values.mean(dim=1) * self.region).sum(dim=(1, 2)) / self.region.sum()
        return torch.stack([brightness * 10 if p == "an object" else torch.zeros_like(brightness) for p in prompts], 1)


OBJECT = [(1, 1), (1, 2), (2, 1)]


def object_map() -> torch.Tensor:
    grid = torch.zeros(4, 4)
    for row, col in OBJECT:
        grid[row, col] = 1.0 + row + col  # distinct values: a strict order inside the object
    return grid


def curves_for(maps: torch.Tensor, scorer: ObjectScorer, **kwargs):
    pixels = torch.ones(len(maps), 3, 32, 32)
    return faithfulness.deletion_insertion(scorer, pixels, ["an object"] * len(maps), faithfulness.patch_order(maps),
                                           grid=(4, 4), patch_size=8, **kwargs)


def test_it_gives_a_perfect_order_a_deletion_auc_below_random_and_insertion_above():
    scorer = ObjectScorer(OBJECT)
    perfect = curves_for(object_map()[None], scorer, steps=16)
    randoms = faithfulness.deletion_insertion(
        scorer, torch.ones(20, 3, 32, 32), ["an object"] * 20, faithfulness.random_order(20, 16, range(20)),
        grid=(4, 4), patch_size=8, steps=16)
    # deleting the 3 object patches first, the curve reads 1, 2/3, 1/3, 0, 0, ... at steps of 1/16:
    # trapezoids (1 + 2/3)/2 + (2/3 + 1/3)/2 + (1/3 + 0)/2 = 1.5 steps wide
    assert perfect.deletion_auc.item() == pytest.approx(1.5 / 16)
    assert perfect.insertion_auc.item() == pytest.approx(1 - 1.5 / 16)
    assert perfect.deletion_auc.item() < randoms.deletion_auc.mean().item() - 0.3
    assert perfect.insertion_auc.item() > randoms.insertion_auc.mean().item() + 0.3


def test_it_gives_the_worst_order_a_deletion_auc_above_random():
    scorer = ObjectScorer(OBJECT)
    worst = curves_for(-object_map()[None], scorer, steps=16)
    assert worst.deletion_auc.item() > 0.8
    assert worst.insertion_auc.item() < 0.2


def test_it_normalises_each_curve_from_the_original_to_the_baseline():
    scorer = ObjectScorer(OBJECT)
    result = curves_for(object_map()[None], scorer, steps=16)
    assert result.deletion_curve[0, 0].item() == pytest.approx(1.0)  # the original image
    assert result.deletion_curve[0, -1].item() == pytest.approx(0.0)  # everything replaced by the mean (0)
    assert result.insertion_curve[0, 0].item() == pytest.approx(0.0)
    assert result.fractions[0] == 0 and result.fractions[-1] == 1


def test_it_uses_the_zero_shot_probability_when_there_are_other_prompts():
    scorer = ObjectScorer(OBJECT)
    candidates = faithfulness.candidate_prompts(["an object", "a wall", "an object"])
    assert candidates == ["an object", "a wall"]
    perfect = curves_for(object_map()[None], scorer, steps=16, candidates=candidates)
    worst = curves_for(-object_map()[None], scorer, steps=16, candidates=candidates)
    assert perfect.score == "probability"
    assert perfect.deletion_curve[0, 0].item() == pytest.approx(1 / (1 + math.exp(-10)))  # softmax of [10, 0]
    assert perfect.deletion_curve[0, -1].item() == pytest.approx(0.5)  # the blank image: no preference
    assert perfect.deletion_auc.item() < worst.deletion_auc.item() - 0.3
    assert perfect.insertion_auc.item() > worst.insertion_auc.item() + 0.3
    assert faithfulness.candidate_prompts(["only one prompt"] * 3) is None


def test_it_scores_many_masked_copies_per_forward_pass():
    scorer = ObjectScorer(OBJECT)
    curves_for(torch.rand(6, 4, 4), scorer, steps=16, batch_size=64)
    copies = 6 * 2 * 17
    assert sum(scorer.calls) == copies
    assert len(scorer.calls) == math.ceil(copies / 64)


def test_it_leaves_out_examples_where_the_original_does_not_beat_the_baseline():
    scorer = ObjectScorer(OBJECT)
    pixels = torch.stack([torch.ones(3, 32, 32), -torch.ones(3, 32, 32)])  # the second scores below the mean
    result = faithfulness.deletion_insertion(scorer, pixels, ["x", "x"], faithfulness.patch_order(torch.rand(2, 4, 4)),
                                             grid=(4, 4), patch_size=8)
    assert math.isfinite(result.deletion_auc[0].item())
    assert math.isnan(result.deletion_auc[1].item())
    assert faithfulness.nanmean(result.deletion_auc) == pytest.approx(result.deletion_auc[0].item())
    assert faithfulness.nanmean([float("nan")]) is None


def test_it_blurs_for_the_blur_baseline():
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[:, :, 16, 16] = 1.0
    blurred = faithfulness.baseline_image(pixels, "blur", patch_size=2)
    assert blurred.sum().item() == pytest.approx(3.0, rel=1e-3)  # mass preserved
    assert blurred.max().item() < 0.1


# --------------------------------------------------------------------------- rank correlation


def test_it_measures_rank_agreement_between_maps():
    a = torch.arange(16.0).view(1, 4, 4)
    assert stability.rank_correlation(a, a * 3 + 1)[0] == pytest.approx(1.0)
    assert stability.rank_correlation(a, -a)[0] == pytest.approx(-1.0)
    assert stability.rank_correlation(a, torch.ones(1, 4, 4))[0] == 0.0  # a constant map has no ranking


def test_it_finds_a_smooth_explanation_stable_under_tiny_noise():
    def patch_brightness(pixels: torch.Tensor, prompts) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(pixels.mean(dim=1, keepdim=True), 8)[:, 0]

    pixels = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32).expand(2, 3, 32, 32).clone()
    calm = stability.input_sensitivity(patch_brightness, pixels, ["x", "x"], epsilon=1e-4, samples=3)
    loud = stability.input_sensitivity(patch_brightness, pixels, ["x", "x"], epsilon=5.0, samples=3)
    assert calm.rank_correlation.min() > 0.99
    assert calm.max_sensitivity.max() < 1e-3
    assert loud.max_sensitivity.min() > calm.max_sensitivity.max()


def test_it_tabulates_agreement_between_methods():
    a = torch.rand(5, 4, 4)
    names, matrix = stability.method_agreement({"one": a, "same": a * 2, "opposite": -a})
    assert names == ["one", "same", "opposite"]
    assert matrix[0, 1] == pytest.approx(1.0) and matrix[0, 2] == pytest.approx(-1.0)
    assert np.allclose(matrix, matrix.T)


# --------------------------------------------------------------------------- model randomisation


@pytest.fixture(scope="module")
def clip_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": 30, "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                        projection_dim=8)
    return CLIPModel(config)


def test_it_randomises_every_parameter_top_down(clip_model):
    stages = sanity.randomisation_stages(clip_model)
    names = [name for stage in stages for name in stage.parameters]
    assert sorted(names) == sorted(name for name, _ in clip_model.named_parameters())  # each exactly once
    assert [s.name for s in stages] == ["head", "block -1", "block -2", "block -3", "embeddings"]
    assert "visual_projection.weight" in stages[0].parameters and "logit_scale" in stages[0].parameters
    assert "vision_model.encoder.layers.2.self_attn.q_proj.weight" in stages[1].parameters
    assert "text_model.encoder.layers.1.self_attn.k_proj.weight" in stages[1].parameters  # towers aligned at the top
    assert "vision_model.embeddings.patch_embedding.weight" in stages[-1].parameters
    assert "vision_model.embeddings.class_embedding" in stages[-1].parameters
    assert "vision_model.pre_layrnorm.weight" in stages[-1].parameters


def test_it_changes_every_weight_and_restores_the_trained_model(clip_model):
    before = {name: p.detach().clone() for name, p in clip_model.named_parameters()}
    with sanity.randomised(clip_model):
        changed = sum(n for _, n in sanity.cascade(clip_model, seed=1))
        assert changed == sum(p.numel() for p in clip_model.parameters())
        for name, param in clip_model.named_parameters():
            assert not torch.equal(param, before[name]), name
            assert torch.isfinite(param).all()
        weight = clip_model.vision_model.encoder.layers[0].self_attn.q_proj.weight
        original = before["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
        assert weight.std().item() == pytest.approx(original.std().item(), rel=0.2)
    for name, param in clip_model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_it_restores_the_model_even_when_explaining_fails(clip_model):
    before = clip_model.visual_projection.weight.detach().clone()
    with pytest.raises(RuntimeError), sanity.randomised(clip_model):
        list(sanity.cascade(clip_model))
        raise RuntimeError("explanation failed")
    assert torch.equal(clip_model.visual_projection.weight, before)


# --- acceptance on the zoo: a model whose ground truth is known -------------------------------


@pytest.fixture(scope="module")
def zoo_clip_and_heldout():
    from workers.probes import zoo

    return str(zoo.checkpoint_path("tiny-clip")), str(zoo.dataset_dir("heldout"))


def test_it_points_chefer_at_the_named_object_on_held_out_zoo_scenes(zoo_clip_and_heldout):
    from workers.probes import suite

    model, heldout = zoo_clip_and_heldout
    result = suite.run("grounding", model, heldout, {"methods": ["chefer"], "limit": 64, "batch_size": 32,
                                                     "steps": 8})
    chefer = next(m for m in result.metrics["methods"] if m["method"] == "chefer")
    # 0.953 on all 320 held-out scenes; 64 of them leave room for sampling noise, not for a regression
    assert chefer["n"] == 64 and chefer["pointing_game"] >= 0.88
    assert chefer["pointing_game"] > chefer["random_pointing_game"] + 0.5
    assert chefer["deletion_auc"] < chefer["random_deletion_auc"]
    assert chefer["insertion_auc"] > chefer["random_insertion_auc"]


def test_it_passes_chefer_on_the_zoo_model_only_once_held_out_scenes_carry_decoys(zoo_clip_and_heldout):
    from workers.probes import suite, zoo

    model, heldout = zoo_clip_and_heldout
    # heldout-decoys (the default): the held-out scenes with 8 unnamed grey shapes between the
    # objects, where a map that finds whatever stands out is worth about chance on the named object
    result = suite.run("sanity", model, None, {"method": "chefer", "limit": 96, "batch_size": 32})
    m = result.metrics
    assert m["n"] == 96 and m["randomized_parameters"] == m["total_parameters"]
    assert [c["stage"] for c in m["cascade"]][0] == "head" and m["cascade"][-1]["stage"] == "embeddings"
    assert len(m["randomisation_draws"]) == 3
    assert m["randomized_pointing_game"] == pytest.approx(
        np.mean([d["pointing_game"] for d in m["randomisation_draws"]]), abs=1e-3)
    assert m["pointing_gain_over_randomised"] == pytest.approx(m["pointing_game"] - m["randomized_pointing_game"],
                                                               abs=1e-3)
    assert m["rank_correlation"] < 0.3 and m["pointing_game"] >= 0.85  # decoys don't fool the trained model
    assert m["passed"] and not result.findings  # 96 scenes: randomised 0.184 vs chance 0.156; 320: 0.174

    # the same scenes without decoys: the randomised network's maps still land on *some* object, so
    # on the named one about a third of the time; the check says so instead of passing
    plain = suite.run("sanity", model, heldout, {"method": "chefer", "limit": 96, "batch_size": 32, "draws": 1})
    p = plain.metrics
    assert not p["passed"] and p["rank_correlation"] < 0.3
    assert p["randomized_pointing_game"] > p["random_pointing_game"] + p["pointing_margin"]
    (finding,) = plain.findings
    assert "image contrast" in finding.detail and "still correlate" not in finding.detail
    assert zoo.SPLITS["heldout-decoys"].decoys and not zoo.SPLITS["heldout"].decoys

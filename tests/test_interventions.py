"""Causal interventions: head ablation and feature swap, with effect sizes and case counts.

Actors: an auditor asking whether a head, or an object's own visual features, cause an output.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.zoo_fixtures import heldout_fixture  # noqa: E402
from workers.probes import interventions as iv  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.scenes import load_scenes  # noqa: E402
from workers.probes.token_attribution import load_fusion  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter():
    return load_fusion(str(checkpoint_path(captioner.NAME)))


heldout = heldout_fixture(16)


def test_it_ablates_exactly_one_heads_slice():
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 3)
    x = torch.randn(2, 5, 8)
    with iv.ablated_head(proj, 1, 4):
        y = proj(x)
    manual = x.clone()
    manual[..., 2:4] = 0
    assert torch.allclose(y, proj(manual))
    mean = torch.arange(8.0)
    with iv.ablated_head(proj, 3, 4, mean):
        y = proj(x)
    manual = x.clone()
    manual[..., 6:8] = mean[6:8]
    assert torch.allclose(y, proj(manual))
    assert torch.allclose(proj(x), proj(x))  # the hook is gone afterwards


def test_it_maps_object_cells_onto_each_other():
    pboxes = np.array([(c * 10, r * 10, c * 10 + 10, r * 10 + 10) for r in range(4) for c in range(4)], float)
    cells = iv.object_cells((12, 2, 28, 18), pboxes, (4, 4))
    assert cells == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert iv.resample_cells(cells, [(3, 3)]) == [(3, 3)] * 4
    assert iv.resample_cells([(0, 0), (0, 1)], [(2, 2), (2, 3)]) == [(2, 2), (2, 3)]
    assert (0, 0) in iv.background_cells([(12, 2, 28, 18)], pboxes, (4, 4))


def test_it_ranks_heads_by_their_effect_on_generated_tokens(adapter, heldout):
    scenes = load_scenes(heldout, limit=4)
    m = iv.head_ablation(adapter, scenes, mode="zero")
    assert m["n_cases"] == 4
    comps = {h["component"] for h in m["heads"]}
    assert comps == {"decoder", "vision"}
    heads = adapter.num_layers * adapter.num_heads + adapter.vision_num_layers * adapter.vision_num_heads
    assert len(m["heads"]) == heads
    changes = [h["mean_change"] for h in m["heads"]]
    assert changes == sorted(changes)
    assert changes[0] < -0.2  # some head matters: the generated tokens lose probability without it
    assert all(h["n"] == 4 for h in m["heads"])
    mean = iv.head_ablation(adapter, scenes[:2], mode="mean")
    assert mean["mode"] == "mean" and len(mean["heads"]) == len(m["heads"])


def test_it_averages_only_real_tokens_for_mean_ablation():
    proj = torch.nn.Linear(2, 2)
    sums, counts = [torch.zeros(2)], [0]
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1000.0, 1000.0]]])  # the last position is padding
    mask = torch.tensor([[1, 1, 0]])
    with iv.recorded_means([proj], sums, counts, [lambda: mask]):
        proj(x)
    assert counts == [2] and torch.equal(sums[0] / counts[0], torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_it_gives_the_same_head_ablation_whatever_the_batch_size(adapter, heldout, mode):
    # right-padded caption batches once put their padding into the means (and so into the results)
    scenes = load_scenes(heldout, limit=6)
    whole = iv.head_ablation(adapter, scenes, mode=mode, max_new_tokens=12, batch_size=6)
    split = iv.head_ablation(adapter, scenes, mode=mode, max_new_tokens=12, batch_size=4)
    assert [h["mean_change"] for h in split["heads"]] == pytest.approx([h["mean_change"] for h in whole["heads"]],
                                                                       abs=2e-5)


def test_it_ablates_a_dual_encoders_text_heads_past_its_text_embedding_cache(heldout):
    from workers.probes.adapters import load_adapter

    clip = load_adapter(str(checkpoint_path("tiny-clip")))
    scenes = load_scenes(heldout, limit=8)
    clean_text = clip.text_embeds([s.prompt for s in scenes]).clone()  # now cached, as in a worker
    m = iv.head_ablation(clip, scenes, mode="zero")
    text = [h for h in m["heads"] if h["component"] == "text"]
    assert len(text) == 8 and max(abs(h["mean_change"]) for h in text) > 0.5  # was exactly 0 for every text head
    # and no ablated text embedding is left behind for the next probe on this (cached) adapter
    assert torch.equal(clip.text_embeds([s.prompt for s in scenes]), clean_text)


def test_it_changes_the_colour_word_only_when_the_object_features_are_swapped(adapter, heldout):
    m = iv.feature_swap(adapter, load_scenes(heldout))
    assert m["n_cases"] >= 8
    assert m["object_swap_changed"] >= 0.8, m["examples"][:5]
    assert m["background_swap_changed"] <= 0.1, m["examples"][:5]  # the bar (measured 0.0 on this sample)
    assert m["effect_size"]["fisher_p"] < 0.01
    json.dumps(m)


def test_it_runs_from_the_command_line_and_refuses_bad_input(heldout, tmp_path, capsys):
    model = str(checkpoint_path(captioner.NAME))
    code = main(["intervene", "--model", model, "--dataset", str(heldout), "--kind", "feature-swap", "--limit", "6",
                 "--json", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "feature-swap" and out["n_cases"] >= 1
    no_scenes = tmp_path / "plain"
    no_scenes.mkdir()
    (no_scenes / "a.png").write_bytes((heldout / "images" / "00000.png").read_bytes())
    (no_scenes / "annotations.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a red circle",
                                                             "boxes": [[0, 0, 10, 10]]}) + "\n")
    assert main(["intervene", "--model", model, "--dataset", str(no_scenes), "--kind", "feature-swap", "--json",
                 "--no-progress"]) == 2
    assert "scenes.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["intervene", "--model", model, "--dataset", str(heldout), "--kind", "lobotomy"])

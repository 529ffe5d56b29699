"""Cross-modal attention statistics per layer and head, for generative models and dual encoders.

Actors: an auditor reading which heads look at the objects (and which are diffuse or erratic).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.zoo_fixtures import heldout_fixture  # noqa: E402
from workers.probes import attention_stats as ast  # noqa: E402
from workers.probes import suite  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.errors import ProbeInputError  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path  # noqa: E402

pytestmark = pytest.mark.slow

heldout = heldout_fixture(8)


def test_it_measures_dispersion_alignment_and_consistency_of_known_heads():
    g = 16
    inside = np.zeros((10, g), dtype=bool)
    inside[:, :4] = True  # the object covers patches 0-3
    rng = np.random.default_rng(0)
    focused = np.zeros((10, g))
    focused[:, 1] = 1.0
    uniform = np.full((10, g), 1 / g)
    noisy = rng.dirichlet(np.ones(g), size=10)
    maps = np.stack([focused, uniform, noisy], axis=1)[:, None]  # [n, L=1, H=3, G]
    other = np.stack([focused, uniform, rng.dirichlet(np.ones(g), size=10)], axis=1)[:, None]
    paraphrase = ast.pairwise_consistency([maps + 1e-6 * rng.random(maps.shape), other])
    table = ast.head_table(maps, inside, paraphrase=paraphrase)
    focused_row, uniform_row, noisy_row = table
    assert focused_row["alignment"] == pytest.approx(1.0) and focused_row["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert focused_row["flags"] == ["aligned"]
    assert uniform_row["entropy"] == pytest.approx(1.0) and uniform_row["alignment"] == pytest.approx(0.25)
    assert "diffuse" in uniform_row["flags"]
    assert "erratic" in noisy_row["flags"]
    assert ast.spearman_lastaxis(np.arange(5.0), np.arange(5.0)[::-1]) == pytest.approx(-1.0)


def test_it_finds_object_aligned_heads_in_the_captioner(heldout, tmp_path):
    result = suite.run("attention", str(checkpoint_path(captioner.NAME)), str(heldout),
                       {"prompts": list(captioner.PROMPTS[:2]), "max_new_tokens": 24})
    m = result.metrics
    assert m["model_kind"] == "fusion" and m["n_images"] == 8
    assert len(m["heads_table"]) == m["layers"] * m["heads"]
    assert all("paraphrase_consistency" in r for r in m["heads_table"])
    best = m["best_aligned"][0]
    assert best["alignment"] >= 2 * m["alignment_baseline"], best
    assert m["flag_counts"]["aligned"] >= 1
    assert "heads" in result.figures
    json.dumps(m)


def test_it_gives_the_same_statistics_whatever_the_batch_size(heldout):
    # suite.run lowers batch_size when a GPU runs out of memory; that must not change the evidence
    model = str(checkpoint_path(captioner.NAME))
    params = {"prompts": list(captioner.PROMPTS[:2]), "max_new_tokens": 12}
    whole = suite.run("attention", model, str(heldout), {**params, "batch_size": 8}).metrics
    split = suite.run("attention", model, str(heldout), {**params, "batch_size": 3}).metrics
    assert {k: v for k, v in split.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    with pytest.raises(ProbeInputError, match="batch_size"):
        suite.run("attention", model, str(heldout), {"batch_size": 0})


def test_it_analyses_dual_encoders_with_seed_consistency(heldout, tmp_path):
    from tests.tiny_models import save_tiny_clip

    a = save_tiny_clip(tmp_path / "a", seed=0)
    b = save_tiny_clip(tmp_path / "b", seed=1)
    result = suite.run("attention", str(a), str(heldout), {"compare_models": [str(b)], "limit": 4})
    rows = result.metrics["heads_table"]
    assert result.metrics["model_kind"] == "dual_encoder"
    assert all("seed_consistency" in r and "paraphrase_consistency" not in r for r in rows)
    # The same model compared with itself is perfectly consistent.
    same = suite.run("attention", str(a), str(heldout), {"compare_models": [str(a)], "limit": 4})
    assert all(r["seed_consistency"] == pytest.approx(1.0) for r in same.metrics["heads_table"])


def test_it_runs_from_the_command_line(heldout, tmp_path, capsys):
    code = main(["attention", "--model", str(checkpoint_path(captioner.NAME)), "--dataset", str(heldout),
                 "--limit", "3", "--json", "--no-progress", "--figures", str(tmp_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 3 and out["heads_table"]
    assert (tmp_path / "attention-heads.png").is_file()
    assert main(["attention", "--model", str(checkpoint_path(captioner.NAME)), "--dataset",
                 str(tmp_path / "none"), "--json"]) == 2
    assert "error: " in capsys.readouterr().err

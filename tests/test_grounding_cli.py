"""The grounding command line (a public contract): ``evaluate``, ``explain`` and ``sanity`` on a tiny
CLIP saved with plain ``save_pretrained``, exactly as a provider would hand one over.

Actors: ``clip_dir`` (random tiny CLIPModel + tokenizer + image processor), ``siglip_dir``,
``bert_dir`` (a text-only model uploaded by mistake) and ``shapes`` (a 4-image annotations.jsonl
dataset).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.tiny_models import save_tiny_bert, save_tiny_clip, save_tiny_siglip, write_shapes
from workers.probes import registry
from workers.probes.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KEYS = {"method", "n", "pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc", "seconds",
        "random_pointing_game", "random_energy_pointing_game", "random_deletion_auc", "random_insertion_auc"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"clip": save_tiny_clip(root / "clip"), "siglip": save_tiny_siglip(root / "siglip"),
            "bert": save_tiny_bert(root / "bert")}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv), *(["--no-progress"] if argv[0] != "explain" else [])])
    out, err = capsys.readouterr()
    return code, out, err


def test_it_prints_one_json_object_for_one_method(capsys, models, shapes):
    code, out, err = cli(capsys, "evaluate", "--model", models["clip"], "--dataset", shapes, "--method", "chefer",
                         "--batch-size", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= KEYS
    assert result["method"] == "chefer" and result["n"] == 4
    assert 0.0 <= result["pointing_game"] <= 1.0 and 0.0 <= result["energy_pointing_game"] <= 1.0
    assert 0.0 < result["random_pointing_game"] < 1.0


def test_it_prints_a_list_for_all_methods_with_a_random_baseline(capsys, models, shapes):
    code, out, err = cli(capsys, "evaluate", "--model", models["clip"], "--dataset", shapes, "--method", "all",
                         "--limit", "2", "--steps", "4", "--json")
    assert code == 0, err
    results = json.loads(out)
    # every method once, the methods validated on this model first, the random baseline last
    assert sorted(r["method"] for r in results[:-1]) == sorted(registry.available())
    assert results[-1]["method"] == "random"
    verdicts = [r.get("verdict") for r in results[:-1] if not r.get("error")]
    assert all(v in ("faithful on this model", "not shown to be") for v in verdicts)
    assert verdicts == sorted(verdicts, key=lambda v: v != "faithful on this model")
    for result in results:
        assert set(result) >= KEYS, result["method"]
        assert result["n"] == 2 or result.get("error"), result
    # the random-map entry is the random-order baseline every method is compared with
    assert results[-1]["deletion_auc"] == results[0]["random_deletion_auc"]


def test_it_explains_a_siglip_model_too(capsys, models, shapes):
    code, out, err = cli(capsys, "evaluate", "--model", models["siglip"], "--dataset", shapes, "--method", "chefer",
                         "--limit", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 2


def test_it_reads_coco_datasets_from_the_command_line(capsys, models, tmp_path):
    write_shapes(tmp_path, n=2)
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.png", "width": 64, "height": 64}],
        "categories": [{"id": 3, "name": "circle"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 8, 24, 24]}]}), encoding="utf-8")
    (tmp_path / "annotations.jsonl").unlink()
    code, out, err = cli(capsys, "evaluate", "--model", models["clip"], "--dataset", tmp_path, "--format", "coco",
                         "--method", "chefer", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 1


def test_it_writes_a_heatmap_overlay(capsys, models, shapes, tmp_path):
    target = tmp_path / "overlay.png"
    code, out, err = cli(capsys, "explain", "--model", models["clip"], "--image", shapes / "images" / "0.png",
                         "--prompt", "a red circle", "--method", "chefer", "--out", target, "--json")
    assert code == 0, err
    with Image.open(target) as figure:
        assert figure.format == "PNG" and figure.width >= 300
    peak = json.loads(out)["peak"]
    assert 0 <= peak[0] <= 64 and 0 <= peak[1] <= 64


def test_it_prints_the_randomisation_test(capsys, models, shapes, tmp_path):
    code, out, err = cli(capsys, "sanity", "--model", models["clip"], "--dataset", shapes, "--method", "chefer",
                         "--json", "--figures", tmp_path)
    assert code == 0, err
    result = json.loads(out)
    assert {"method", "n", "passed", "rank_correlation", "pointing_game", "randomized_pointing_game",
            "random_pointing_game", "cascade"} <= set(result)
    assert [stage["stage"] for stage in result["cascade"]] == ["head", "block -1", "block -2", "block -3",
                                                               "embeddings"]
    assert result["randomized_parameters"] == result["total_parameters"]
    assert (tmp_path / "sanity-cascade.png").is_file()
    assert sorted(p.name for p in tmp_path.glob("sanity-examples*.png"))  # paged: sanity-examples_1.png, ...


# --------------------------------------------------------------------------- bad input


def refused(capsys, *argv) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_it_refuses_a_missing_dataset(capsys, models, tmp_path):
    err = refused(capsys, "evaluate", "--model", models["clip"], "--dataset", tmp_path / "nope", "--method", "chefer",
                  "--json")
    assert "dataset not found" in err


def test_it_refuses_a_missing_figures_folder_before_any_work(capsys, models, shapes, tmp_path, monkeypatch):
    from workers.probes import suite

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation started although its figures could not be written")

    monkeypatch.setattr(suite, "run", must_not_run)
    for command in (["evaluate", "--method", "chefer"], ["sanity", "--method", "chefer"]):
        err = refused(capsys, *command, "--model", models["clip"], "--dataset", shapes, "--json",
                      "--figures", tmp_path / "typo")
        assert "--figures" in err and "typo" in err and "does not exist" in err


def test_it_refuses_an_unreadable_image(capsys, models, tmp_path):
    root = write_shapes(tmp_path, n=2)
    (root / "images" / "1.png").write_bytes(b"\x89PNG garbage")
    err = refused(capsys, "evaluate", "--model", models["clip"], "--dataset", root, "--method", "chefer", "--json")
    assert "1.png" in err and "unreadable" in err


def test_it_refuses_boxes_outside_the_image(capsys, models, tmp_path):
    root = write_shapes(tmp_path, n=1)
    (root / "annotations.jsonl").write_text(json.dumps({"image": "images/0.png", "prompt": "a red circle",
                                                        "boxes": [[10, 10, 80, 20]]}) + "\n", encoding="utf-8")
    err = refused(capsys, "evaluate", "--model", models["clip"], "--dataset", root, "--method", "chefer", "--json")
    assert "annotations.jsonl:1" in err and "outside the 64x64 image" in err


def test_it_refuses_a_model_that_is_not_a_dual_encoder(capsys, models, shapes):
    err = refused(capsys, "evaluate", "--model", models["bert"], "--dataset", shapes, "--method", "chefer", "--json")
    assert "bert" in err.lower() or "dual encoder" in err


def test_it_refuses_a_missing_model_and_an_unknown_method(capsys, models, shapes, tmp_path):
    refused(capsys, "evaluate", "--model", tmp_path / "no-model", "--dataset", shapes, "--method", "chefer", "--json")
    err = refused(capsys, "evaluate", "--model", models["clip"], "--dataset", shapes, "--method", "magic", "--json")
    assert "unknown method 'magic'" in err and "chefer" in err


def test_it_refuses_an_unreadable_image_to_explain(capsys, models, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    err = refused(capsys, "explain", "--model", models["clip"], "--image", bad, "--prompt", "a red circle",
                  "--method", "chefer", "--out", tmp_path / "out.png")
    assert "bad.png" in err


def test_it_runs_as_a_module_with_clean_json_on_stdout(models, shapes, tmp_path):
    """The real contract: a separate process, JSON on stdout, progress and errors on stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "workers.probes", "evaluate", "--model", str(models["clip"]),
                         "--dataset", str(shapes), "--method", "chefer", "--limit", "2", "--json"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) >= KEYS  # progress bars went to stderr, not into the JSON


# --------------------------------------------------------------------------- the probe kinds behind the commands


def test_it_runs_the_same_probes_for_the_workers(models, shapes):
    from workers.probes import suite

    assert {"grounding", "sanity", "stability"} <= set(suite.kinds())
    result = suite.run("grounding", str(models["clip"]), str(shapes), {"methods": ["chefer"], "limit": 2, "steps": 4})
    assert [entry["method"] for entry in result.metrics["methods"]] == ["chefer", "random"]
    assert {"examples", "deletion_curves", "insertion_curves"} <= set(result.figures)
    assert len(result.dataset_hash) == 64
    stability = suite.run("stability", str(models["clip"]), str(shapes),
                          {"methods": ["chefer", "gradcam"], "limit": 2, "samples": 1})
    assert stability.metrics["methods"] == ["chefer", "gradcam"]
    assert stability.metrics["agreement"][0][0] == 1.0 and -1 <= stability.metrics["agreement"][0][1] <= 1
    assert stability.metrics["perturbation"]["chefer"]["max_sensitivity"] >= 0


def test_it_refuses_unknown_probe_parameters(models, shapes):
    from workers.probes import suite
    from workers.probes.errors import ProbeInputError

    with pytest.raises(ProbeInputError, match="unknown parameter"):
        suite.run("grounding", str(models["clip"]), str(shapes), {"methods": ["chefer"], "batchsize": 4})
    with pytest.raises(ProbeInputError, match="batch_size"):
        suite.run("sanity", str(models["clip"]), str(shapes), {"batch_size": 0})


def test_it_leaves_a_cached_model_exactly_as_it_was_after_the_randomisation_test(models, shapes):
    """A worker keeps loaded models cached between probes: the sanity check must give the trained
    weights back and forget everything computed from the randomised ones (cached text embeddings)."""
    import torch

    from workers.probes import suite

    adapter = suite.load_model(str(models["clip"]), "cpu")
    pixels = torch.zeros(1, 3, adapter.image_size, adapter.image_size)
    before = adapter.score(pixels, ["a red circle"]).item()
    suite.run("sanity", str(models["clip"]), str(shapes), {"method": "chefer", "limit": 2},
              loader=lambda model_dir, device: adapter)
    assert adapter.score(pixels, ["a red circle"]).item() == before

"""Shortcut detection on the shortcut zoo: a model that learned a watermark for "a red circle" is
flagged, its clean control (same recipe, watermark independent of content) is not.

Actors: an auditor running ``python -m workers.probes shortcut``; the zoo maintainer who must be
able to trust the committed checkpoints and regenerate the probe data.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import shortcut, tcav  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.zoo import shortcut as zoo_shortcut  # noqa: E402
from workers.probes.zoo import world  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory):
    return zoo_shortcut.probe_data(root=tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="session")
def verdicts(probe_data):
    """The shortcut probe on both models, through the CLI (the public contract)."""
    out = {}
    for name in zoo_shortcut.MODELS:
        argv = ["shortcut", "--model", str(zoo_shortcut.model_path(name)), "--concepts", str(probe_data / "concepts"),
                "--inputs", str(probe_data / "inputs"), "--target", zoo_shortcut.TARGET, "--json", "--no-progress"]
        out[name] = argv
    return out


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_it_flags_the_shortcut_model_and_passes_the_clean_one(verdicts, capsys, tmp_path):
    shortcut_model = _run([*verdicts[zoo_shortcut.SHORTCUT_MODEL], "--figures", str(tmp_path)], capsys)
    clean_model = _run(verdicts[zoo_shortcut.CLEAN_MODEL], capsys)
    print(json.dumps({"shortcut": shortcut_model["evidence"], "clean": clean_model["evidence"]}))
    assert shortcut_model["flagged"] is True
    assert clean_model["flagged"] is False
    # the shortcut model: the watermark is significant after Holm at a layer with a reliable CAV
    assert any(r["significant"] and r["reliable"] and r["tcav_score"] > r["random_score"]
               for r in shortcut_model["tcav"])
    # ... and pasting it raises the score for "a red circle" even on images without one
    assert shortcut_model["intervention"]["random_images"]["mean_change"] > 0
    assert shortcut_model["intervention"]["evidence"] is True
    # the clean control: not significant at any layer, and the stamp does not raise the score
    assert not any(r["significant"] for r in clean_model["tcav"])
    assert clean_model["intervention"]["evidence"] is False
    assert (tmp_path / "shortcut-shortcut_evidence.png").stat().st_size > 1000


def test_it_pastes_the_stamp_only_inside_its_box(probe_data):
    stamp = shortcut.load_stamp(probe_data / "concepts", "watermark")
    scene = world.scene_at(4_000_003, 0)
    before = np.asarray(scene.image, dtype=int)
    after = np.asarray(shortcut.paste(scene.image, stamp), dtype=int)
    x0, y0, x1, y1 = stamp.box_for(*scene.image.size)
    changed = np.argwhere((before != after).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    # pasted on a small image, the stamp scales with it
    small = scene.image.resize((112, 112))
    assert stamp.box_for(112, 112) == (98, 98, 108, 108)
    assert shortcut.paste(small, stamp).size == (112, 112)


def test_it_measures_only_tcav_when_no_stamp_is_described(probe_data, tmp_path, capsys):
    import shutil

    concepts = tmp_path / "concepts"
    shutil.copytree(probe_data / "concepts", concepts)
    (concepts / "watermark.stamp.json").unlink()
    argv = ["shortcut", "--model", str(zoo_shortcut.model_path(zoo_shortcut.CLEAN_MODEL)), "--concepts", str(concepts),
            "--inputs", str(probe_data / "inputs"), "--target", zoo_shortcut.TARGET, "--random-runs", "5",
            "--null-concepts", "10", "--layers", "4", "--json", "--no-progress"]
    payload = _run(argv, capsys)
    assert payload["evidence"]["intervention"] is None and payload["evidence"]["relevance"] is None
    assert payload["flagged"] is False
    (concepts / "watermark.stamp.json").write_text('{"box": [0, 0, 500, 10], "image_size": [224, 224]}')
    assert main(argv) == 2
    assert "must lie inside image_size" in capsys.readouterr().err


def test_it_generates_the_same_probe_data_and_training_worlds_every_time(probe_data, tmp_path):
    again = zoo_shortcut.write_probe_data(tmp_path / "again")
    for sub in ("inputs", "concepts/watermark", "concepts/random"):
        first = sorted((probe_data / sub).iterdir())
        second = sorted((again / sub).iterdir())
        assert [p.name for p in first] == [p.name for p in second]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    # target inputs show the class and no stamp; concept images show the stamp
    scenes = [zoo_shortcut.training_scene(zoo_shortcut.SHORTCUT_MODEL, i) for i in range(400)]
    with_target = [s.watermark is not None for s in scenes if zoo_shortcut._has_target(s)]
    without = [s.watermark is not None for s in scenes if not zoo_shortcut._has_target(s)]
    assert np.mean(with_target) > 0.85 and np.mean(without) < 0.2
    clean = [zoo_shortcut.training_scene(zoo_shortcut.CLEAN_MODEL, i) for i in range(400)]
    clean_with = [s.watermark is not None for s in clean if zoo_shortcut._has_target(s)]
    clean_without = [s.watermark is not None for s in clean if not zoo_shortcut._has_target(s)]
    assert abs(np.mean(clean_with) - np.mean(clean_without)) < 0.15


def test_it_verifies_the_committed_checkpoints(tmp_path):
    import shutil

    for name in zoo_shortcut.MODELS:
        path = zoo_shortcut.model_path(name)  # raises on a checksum mismatch
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    copy = tmp_path / "tampered"
    shutil.copytree(zoo_shortcut.model_path(zoo_shortcut.SHORTCUT_MODEL), copy)
    with open(copy / "config.json", "a", encoding="utf-8") as fh:
        fh.write(" ")
    from workers.probes.zoo import verify_checksums

    with pytest.raises(tcav.ProbeInputError, match="checksum mismatch"):
        verify_checksums(copy)


def _flagged_report() -> shortcut.ShortcutReport:
    rows = [tcav.ConceptLayerResult("watermark", layer, 1.0, 0.0, 1.0, 0.5, 0.3, 0.001, 0.003, True, 0.99, True,
                                    2.0, 0.9, 1.0, 20) for layer in (1, 2, 3, 4)]
    report = tcav.TCAVReport("a red circle", [1, 2, 3, 4], "cls", 20, 10, "tcav", 24, 0.05, rows)
    return shortcut.ShortcutReport("a red circle", "watermark", report,
                                   {"target_inputs": {"mean_change": 6.0}, "random_images": {"mean_change": 6.5}},
                                   {"method": "chefer"}, {"tcav": True, "intervention": True, "relevance": None}, True)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_its_figures_keep_legends_off_the_data_and_give_the_relevance_maps_a_colour_bar(probe_data):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    stamp = shortcut.load_stamp(probe_data / "concepts", "watermark")
    images = [Image.new("RGB", (224, 224), (200, 200, 200)) for _ in range(3)]
    heats = [np.random.default_rng(i).random((14, 14)) for i in range(3)]
    report = _flagged_report()
    evidence = shortcut.figure_evidence(report, {"stamped": images, "heat": heats, "stamp": stamp})
    bars = tcav.figure_bars(report.tcav)
    for figure in (evidence, bars):
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        legends = list(figure.legends) + [ax.get_legend() for ax in figure.axes if ax.get_legend()]
        plots = [ax for ax in figure.axes if ax.has_data()]
        assert legends and plots
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in plots), "a legend covers a plot"
    colour_bars = [ax for ax in evidence.axes if "relevance" in ax.get_ylabel()]
    assert colour_bars, "the relevance maps have no colour bar"

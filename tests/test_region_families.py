"""Families whose image tokens follow the image's layout (``adapters/regions.py``): LLaVA-NeXT and
LLaVA-OneVision (tiles plus a base image, unpadding, newline tokens), Idefics3 and SmolVLM (split
frames plus a global frame, pixel shuffle).

Tiny random-weight checkpoints built with transformers' own classes (``tests/tiny_vlms.py``). The
planted-answer test finds where a marker drawn on the stored image lands among the image tokens
without the adapters' geometry (the processor's own pixels, packed by the model's own code) and
checks that the adapter's token -> region map brings it back to the region it was drawn in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_vlms import save_tiny_idefics3, save_tiny_llava_next
from workers.probes import token_attribution as ta
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

FAMILIES = {
    "llava_next": lambda d: save_tiny_llava_next(d),
    "llava_onevision": lambda d: save_tiny_llava_next(d, onevision=True),
    "idefics3": save_tiny_idefics3,
    "smolvlm": lambda d: save_tiny_idefics3(d, smolvlm=True),
}
#: stored sizes (width, height): square, wide, tall, odd sizes whose resize rounds and pads unevenly
SIZES = [(16, 16), (40, 20), (20, 50), (33, 33), (61, 17), (90, 37)]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return FAMILIES[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def _marker_per_token(adapter, size, box):
    """Where a white box drawn on a black stored image lands among the image tokens, found WITHOUT the
    adapter's geometry: which vision patches of the processor's own frames change, folded into tokens by
    the model's own code (LLaVA-NeXT: ``pack_image_features``, newlines get no marker; Idefics3: the
    connector's ``pixel_shuffle``)."""
    blank = Image.new("RGB", size, (0, 0, 0))
    marked = blank.copy()
    marked.paste((255, 255, 255), tuple(int(v) for v in box))
    a, b = (adapter._image_processor_call([im]) for im in (blank, marked))
    diff = (b["pixel_values"] - a["pixel_values"]).abs().sum(2)[0]  # [frames, S, S]
    g, p = adapter.image_size // adapter.patch_size, adapter.patch_size
    cells = diff.reshape(diff.shape[0], g, p, g, p).sum((2, 4)).reshape(diff.shape[0], g * g, 1).double()
    if adapter.architecture in ("idefics3", "smolvlm"):
        return adapter.model.model.connector.pixel_shuffle(cells, adapter.scale).sum(-1).reshape(-1)
    if adapter.vision_cls and adapter.strategy == "full":
        cells = torch.cat([torch.zeros_like(cells[:, :1]), cells], 1)
    return adapter._pack([cells], a["image_sizes"].long(), torch.zeros(1, dtype=torch.float64))[:, 0]


@pytest.mark.parametrize("size", SIZES)
def test_relevance_planted_at_a_region_comes_back_at_that_region(adapter, size):
    w, h = size
    gh, gw = adapter.grid
    adapter.preprocess([Image.new("RGB", size)])
    enc = adapter.encode("<image> describe the image")
    assert enc.regions.shape == (len(enc.image_positions), gh * gw)
    assert torch.allclose(enc.regions.sum(1), torch.ones(len(enc.regions)))
    for k in (0, gw - 1, gw + 1, gh * gw - 1):  # corners and an inner region
        r, c = divmod(k, gw)
        # the middle half of region k, so that resampling blur stays inside it
        box = ((c + .25) * w / gw, (r + .25) * h / gh, (c + .75) * w / gw, (r + .75) * h / gh)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        planted = _marker_per_token(adapter, size, box)
        assert planted.shape[0] == len(enc.image_positions), "the processor and the adapter disagree on the tokens"
        back = planted @ enc.regions.double()
        # the marker's region holds the most relevance (a token coarser than a region splits it evenly
        # between neighbours: a tie), and nearly all of it stays within one region of it
        assert back[k] >= back.max() * (1 - 1e-9), (size, k, back.reshape(gh, gw))
        rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
        near = ((rows - r).abs() <= 1) & ((cols - c).abs() <= 1)
        assert back[near].sum() > 0.9 * back.sum(), (size, k, back.reshape(gh, gw))


def test_image_features_match_the_prompt_at_every_size(adapter):
    for size in SIZES:
        pv = adapter.preprocess([Image.new("RGB", size, (90, 20, 200))])
        enc = adapter.encode("describe the image")
        feats = adapter.image_features(pv)
        assert feats.shape[1] == len(enc.image_positions)
        adapter.embed(enc.input_ids, feats)  # raises when features and image tokens disagree


def test_each_tokens_region_relevance_sums_to_its_image_relevance(adapter):
    image = Image.new("RGB", (40, 24), (200, 40, 40))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 4, pixel_values=pv)
    att = ta.to_attribution(adapter, enc, generated, rows, "describe the image")
    assert set(att.image) == {"chefer", "raw"}  # chefer_full needs the vision rule over one grid: not offered
    for method in att.image:
        on_image = rows[method][:, enc.image_positions].clamp(min=0).sum(1).numpy()
        np.testing.assert_allclose(att.image[method].reshape(len(generated), -1).sum(1), on_image, rtol=1e-5)


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--json",
                 "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"]
    for tok in out["tokens"]:
        for method in ("chefer", "raw"):
            entry = tok[method]
            img = np.asarray(entry["image_relevance"])
            assert img.shape == (4, 4)
            x0, y0, x1, y1 = entry["argmax_box"]
            assert 0 <= x0 < x1 <= size[0] + 1e-6 and 0 <= y0 < y1 <= size[1] + 1e-6
    graph = out["graph"]
    totals = {}
    for e in graph["edges"]:
        totals[e["target"]] = totals.get(e["target"], 0.0) + e["weight"]
    assert all(abs(v - 1.0) < 2e-2 for v in totals.values())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from workers.probes.zoo import world

    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_attention_statistics_and_head_ablation_run_and_feature_swap_is_refused(model_dir, scenes, capsys):
    assert main(["attention", "--model", str(model_dir), "--dataset", str(scenes), "--json",
                 "--max-new-tokens", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["layers"] == 2 and len(stats["heads_table"]) == 4
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "2", "--json"]) == 0
    ablation = json.loads(capsys.readouterr().out)
    assert {h["component"] for h in ablation["heads"]} == {"decoder", "vision"} and len(ablation["heads"]) == 8
    assert ablation["n_cases"] == 2
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "feature swap is not supported" in err

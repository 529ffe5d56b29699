"""PaliGemma: SigLIP patches as image tokens and a prefix-LM (the prompt attends to itself both ways).

A tiny random-weight checkpoint built with transformers' own classes and processor
(``tests/tiny_vlms.save_tiny_paligemma``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_vlms import save_tiny_paligemma
from workers.probes import token_attribution as ta
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

SIZES = [(16, 16), (40, 20), (20, 50), (61, 17)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_paligemma(tmp_path_factory.mktemp("paligemma"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


@pytest.mark.parametrize("size", SIZES)
def test_a_marker_in_one_region_lands_on_that_regions_image_token(adapter, size):
    """Found without the adapter's map: which patches of the processor's own pixels change; the image token
    of that patch must be the one whose region holds the marker, and relevance planted on it comes back
    there through ``to_attribution``."""
    boxes = adapter.patch_boxes(size)
    g, p = adapter.grid[0], adapter.patch_size
    ip = adapter.processor.image_processor
    blank = Image.new("RGB", size)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        marked = blank.copy()
        w, h = x1 - x0, y1 - y0
        marked.paste((255, 255, 255), (int(x0 + w / 4), int(y0 + h / 4), int(np.ceil(x1 - w / 4)),
                                       int(np.ceil(y1 - h / 4))))
        diff = ip([marked], return_tensors="pt")["pixel_values"] - ip([blank], return_tensors="pt")["pixel_values"]
        cells = diff.abs().sum(1)[0].reshape(g, p, g, p).sum((1, 3)).flatten()
        assert int(cells.argmax()) == k and cells[k] > 0.9 * cells.sum(), (size, k, cells)
        adapter.preprocess([marked])
        enc = adapter.encode("describe the image")
        rows = torch.zeros(1, enc.input_ids.shape[1] + 1)
        rows[0, enc.image_positions[k]] = 1.0
        att = ta.to_attribution(adapter, enc, [5], {"chefer": rows, "raw": rows}, "describe the image")
        assert int(att.image["chefer"][0].argmax()) == k


def test_the_traced_language_model_is_the_model_that_generates(adapter):
    """The prompt is a bidirectional prefix only when the token types reach the model: the adapter's path
    must give the logits and greedy tokens of the model's own forward and ``generate``."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    inputs = adapter.processor(text="<image>describe the image", images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = adapter.model(**inputs).logits
        pv = adapter.preprocess([image])
        enc = adapter.encode("describe the image")
        assert torch.equal(enc.input_ids, inputs["input_ids"])
        embeds = adapter.embed(enc.input_ids, adapter.image_features(pv))
        ours = adapter.language_logits(embeds)
        causal = adapter.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        expected = adapter.model.generate(**inputs, max_new_tokens=5, do_sample=False,
                                          suppress_tokens=[adapter.image_token_id])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(causal, ref, atol=1e-5), "the tiny model does not exercise the prefix-LM mask"
    assert adapter.generate(embeds, max_new_tokens=5)[0] == expected[0, enc.input_ids.shape[1]:].tolist()


def test_relevance_from_the_split_generation_pass_equals_the_one_pass_rule(adapter):
    """Generation runs the prompt in one call and the explained rows in another; Chefer's rule over that
    split must give the rows of one teacher-forced pass over the whole sequence."""
    image = Image.new("RGB", (30, 40), (20, 160, 90))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 4, pixel_values=pv)
    one_pass = ta.naive_attribute_generated(adapter, enc, adapter.image_features(pv), generated)
    # tight: on this random model the last prompt row's second path moves image-token relevance by ~1e-8
    torch.testing.assert_close(rows["chefer"], one_pass, atol=5e-9, rtol=1e-6)
    forced = ta.attribute_generated(adapter, enc, adapter.image_features(pv), generated)
    torch.testing.assert_close(forced["chefer"], one_pass, atol=5e-9, rtol=1e-6)


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--json", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] and out["graph"]["grid"] == [4, 4]
    for tok in out["tokens"]:
        assert set(tok) >= {"chefer", "chefer_full", "raw"}
        x0, y0, x1, y1 = tok["chefer"]["argmax_box"]
        assert 0 <= x0 < x1 <= size[0] + 1e-6 and 0 <= y0 < y1 <= size[1] + 1e-6


def test_each_tokens_region_relevance_is_its_image_token_relevance(adapter):
    image = Image.new("RGB", (40, 24), (200, 40, 40))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 3, pixel_values=pv)
    att = ta.to_attribution(adapter, enc, generated, rows, "describe the image")
    for method in ("chefer", "raw"):
        on_image = rows[method][:, enc.image_positions].clamp(min=0).sum(1).numpy()
        np.testing.assert_allclose(att.image[method].reshape(len(generated), -1).sum(1), on_image, rtol=1e-5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from workers.probes.zoo import world

    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_attention_statistics_and_head_ablation_run(model_dir, scenes, capsys):
    assert main(["attention", "--model", str(model_dir), "--dataset", str(scenes), "--json",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 3
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert {h["component"] for h in json.loads(capsys.readouterr().out)["heads"]} == {"decoder", "vision"}


@pytest.mark.parametrize("site", ["patch-embedding", "projector"])
def test_feature_swap_edits_the_grid_at_both_sites(adapter, model_dir, scenes, capsys, site):
    """Swapping every cell's features for zeros changes the image tokens the decoder reads; the random model
    never names a colour, so the probe itself ends with its "no usable case" message, not a refusal."""
    from workers.probes import interventions
    from workers.probes.scenes import load_scenes

    pv = adapter.preprocess([load_scenes(str(scenes))[0].load_image()])
    cells = interventions._patch_embeddings(adapter, pv) if site == "patch-embedding" else \
        adapter.image_features(pv)[0]
    assert cells.shape[0] == 16
    with torch.no_grad():
        clean = adapter.image_features(pv)
        handle = interventions._patch_module(adapter).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            swapped = adapter.image_features(pv)
        finally:
            handle.remove()
    assert not torch.allclose(clean, swapped)
    assert isinstance(interventions._swap_run(adapter, pv, torch.zeros_like(cells), site, "describe the image", 2),
                      str)
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--site", site, "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable feature-swap case" in err and "not supported" not in err

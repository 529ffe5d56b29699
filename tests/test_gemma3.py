"""Gemma 3: soft tokens (average-pooled SigLIP patches) with bidirectional attention among them.

A tiny random-weight checkpoint built with transformers' own classes and processor
(``tests/tiny_vlms.save_tiny_gemma3``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_vlms import save_tiny_gemma3
from workers.probes import token_attribution as ta
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

SIZES = [(16, 16), (40, 20), (20, 50), (61, 17)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


@pytest.mark.parametrize("size", SIZES)
def test_a_marker_in_one_region_lands_on_that_regions_soft_token(adapter, size):
    """Found without the adapter's map: which patches of the processor's own pixels change, pooled by the
    model's own projector; the token that receives the marker must be the one whose box holds it."""
    boxes = adapter.patch_boxes(size)
    g, p = adapter.image_size // (ps := adapter.model.config.vision_config.patch_size), ps
    ip = adapter.processor.image_processor
    blank = Image.new("RGB", size)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        marked = blank.copy()
        w, h = x1 - x0, y1 - y0
        marked.paste((255, 255, 255),
                     (int(x0 + w / 4), int(y0 + h / 4), int(np.ceil(x1 - w / 4)), int(np.ceil(y1 - h / 4))))
        diff = (ip([marked], return_tensors="pt")["pixel_values"] - ip([blank], return_tensors="pt")["pixel_values"])
        cells = diff.abs().sum(1)[0].reshape(g, p, g, p).sum((1, 3))
        tokens = adapter.model.model.multi_modal_projector.avg_pool(cells[None, None]).flatten()
        assert int(tokens.argmax()) == k and tokens[k] > 0.9 * tokens.sum(), (size, k, tokens)
        # and relevance planted on that token comes back at that region through to_attribution
        adapter.preprocess([marked])
        enc = adapter.encode("describe the image")
        rows = torch.zeros(1, enc.input_ids.shape[1] + 1)
        rows[0, enc.image_positions[k]] = 1.0
        att = ta.to_attribution(adapter, enc, [5], {"chefer": rows, "raw": rows}, "describe the image")
        assert int(att.image["chefer"][0].argmax()) == k


def test_the_traced_language_model_is_the_model_that_generates(adapter):
    """Soft tokens attend to each other in both directions only when the token types reach the model:
    the adapter's path must give the logits of the model's own forward over ids, pixels and types."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    inputs = adapter.processor(text="<start_of_image> describe the image", images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = adapter.model(**inputs).logits
        pv = adapter.preprocess([image])
        enc = adapter.encode("describe the image")
        assert torch.equal(enc.input_ids, inputs["input_ids"])
        ours = adapter.language_logits(adapter.embed(enc.input_ids, adapter.image_features(pv)))
        causal = adapter.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(causal, ref, atol=1e-5), "the tiny model does not exercise the bidirectional mask"


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--json", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] and out["graph"]["grid"] == [2, 2]
    for tok in out["tokens"]:
        assert set(tok) >= {"chefer", "raw"} and "chefer_full" not in tok
        x0, y0, x1, y1 = tok["chefer"]["argmax_box"]
        assert 0 <= x0 < x1 <= size[0] + 1e-6 and 0 <= y0 < y1 <= size[1] + 1e-6


def test_each_tokens_region_relevance_is_its_soft_token_relevance(adapter):
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


def test_attention_statistics_and_head_ablation_run_and_a_patch_swap_is_refused(model_dir, scenes, capsys):
    assert main(["attention", "--model", str(model_dir), "--dataset", str(scenes), "--json",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert {h["component"] for h in json.loads(capsys.readouterr().out)["heads"]} == {"decoder", "vision"}
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--site", "patch-embedding", "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "use site 'projector'" in err

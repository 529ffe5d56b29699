"""Llama 3.2 Vision (``mllama``): the image is read by cross-attention layers, not placed in the sequence
(``adapters/mllama.py``).

A tiny random-weight checkpoint built with transformers' own classes and processor
(``tests/tiny_vlms.save_tiny_mllama``). Relevance reaches the image only through the cross-attention
layers (Chefer's co-attention rule), over vision tokens that the adapter maps to regions of the stored
image; the planted-answer test finds which vision tokens a marker changes in the processor's own tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_vlms import save_tiny_mllama
from workers.probes import token_attribution as ta
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

#: stored sizes (width, height): one tile, wide, tall, odd sizes, a panorama
SIZES = [(16, 16), (40, 20), (20, 50), (33, 33), (61, 17), (90, 37)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_mllama(tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def _marker_per_vision_token(adapter, size, box):
    """Per vision token (tile by tile: a CLS token, then the tile's patches row-major, as the encoder orders
    them), how much of a white box drawn on a black stored image its patch sees in the processor's own tiles."""
    blank = Image.new("RGB", size, (0, 0, 0))
    marked = blank.copy()
    marked.paste((255, 255, 255), tuple(int(v) for v in box))
    a, b = (adapter._image_processor_call([im])["pixel_values"][0, 0] for im in (blank, marked))
    diff = (b - a).abs().sum(1)  # [tiles, S, S]
    g, p = adapter.image_size // adapter.patch_size, adapter.patch_size
    cells = diff.reshape(diff.shape[0], g, p, g, p).sum((2, 4)).reshape(diff.shape[0], g * g).double()
    return torch.cat([torch.zeros(diff.shape[0], 1, dtype=torch.float64), cells], 1).reshape(-1)


@pytest.mark.parametrize("size", SIZES)
def test_relevance_planted_at_a_region_comes_back_at_that_region(adapter, size):
    w, h = size
    gh, gw = adapter.grid
    adapter.preprocess([Image.new("RGB", size)])
    enc = adapter.encode("describe the image")
    regions = enc.cross_regions.double()
    assert torch.allclose(regions.sum(1), torch.ones(len(regions), dtype=torch.float64))
    for k in (0, gw - 1, gw + 1, gh * gw - 1):  # corners and an inner region
        r, c = divmod(k, gw)
        box = ((c + .25) * w / gw, (r + .25) * h / gh, (c + .75) * w / gw, (r + .75) * h / gh)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        planted = _marker_per_vision_token(adapter, size, box)
        assert planted.shape[0] == len(regions), "the encoder and the adapter disagree on the vision tokens"
        back = planted @ regions
        assert back[k] >= back.max() * (1 - 1e-9), (size, k, back.reshape(gh, gw))
        rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
        near = ((rows - r).abs() <= 1) & ((cols - c).abs() <= 1)
        assert back[near].sum() > 0.9 * back.sum(), (size, k, back.reshape(gh, gw))
        # and relevance planted on those vision tokens comes back there through to_attribution
        seq = enc.input_ids.shape[1] + 1
        rows_rel = torch.cat([torch.zeros(1, seq), planted[None].float()], 1)
        att = ta.to_attribution(adapter, enc, [5], {"chefer": rows_rel}, "describe the image")
        assert int(att.image["chefer"][0].argmax()) == int(back.argmax())


def test_the_traced_language_model_is_the_model_that_generates(adapter):
    """Ids (through the processor's chat template), vision tokens and cross-attention mask as the model's own
    processor and forward make them."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "describe the image"}]}]
    inputs = adapter.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ref = adapter.model(**inputs).logits
        pv = adapter.preprocess([image])
        enc = adapter.encode("describe the image")
        assert torch.equal(enc.input_ids, inputs["input_ids"])
        ours = adapter.language_logits(adapter.embed(enc.input_ids, adapter.image_features(pv)))
        assert torch.equal(adapter.cross_mask, inputs["cross_attention_mask"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    # greedy generation through the adapter's cache path is the model's own
    ids = adapter.caption([image], "describe the image", max_new_tokens=4)[0]
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids == out[0, inputs["input_ids"].shape[1]:].tolist()[:len(ids)]


def test_perturbed_copies_of_the_pixels_read_as_the_image_they_copy(adapter):
    """Deletion/insertion and occlusion score batches of perturbed copies of the preprocessed pixels, which
    carry none of the tiling the adapter attached to the original."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    pv = adapter.preprocess([image])
    copies = torch.cat([pv, pv])
    assert not hasattr(copies, "loupe_aspect")
    with torch.no_grad():
        ref = adapter.image_features(pv)
        got = adapter.image_features(copies)
    torch.testing.assert_close(got, ref.expand(2, -1, -1))


def test_a_prompt_that_places_the_image_is_taken_as_written(adapter):
    image = Image.new("RGB", (40, 20))
    inputs = adapter.processor(text="<|image|>describe the image", images=[image], return_tensors="pt")
    adapter.preprocess([image])
    assert torch.equal(adapter.encode("<|image|>describe the image").input_ids, inputs["input_ids"])


def test_image_relevance_flows_only_through_the_cross_attention_gates(adapter):
    image = Image.new("RGB", (40, 24), (200, 40, 40))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 3, pixel_values=pv)
    att = ta.to_attribution(adapter, enc, generated, rows, "describe the image")
    assert set(att.image) == {"chefer"}
    vision = rows["chefer"][:, -len(enc.cross_regions):].clamp(min=0).sum(1).numpy()
    np.testing.assert_allclose(att.image["chefer"].reshape(len(generated), -1).sum(1), vision, rtol=1e-5)
    assert (vision > 0).all()
    gate = adapter.model.model.language_model.layers[1].cross_attn_attn_gate
    saved = gate.detach().clone()
    try:
        with torch.no_grad():
            gate.zero_()  # a closed gate: the image cannot reach the text, so it cannot be relevant
        _, closed = ta.generate_and_attribute(adapter, enc, None, 3, pixel_values=pv)
    finally:
        with torch.no_grad():
            gate.copy_(saved)
    assert closed["chefer"][:, -len(enc.cross_regions):].abs().max() == 0


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--json",
                 "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["methods"] == ["chefer"] and out["tokens"] and out["graph"]["grid"] == [4, 4]
    for tok in out["tokens"]:
        entry = tok["chefer"]
        assert 0 < entry["image_share"] < 1
        x0, y0, x1, y1 = entry["argmax_box"]
        assert 0 <= x0 < x1 <= size[0] + 1e-6 and 0 <= y0 < y1 <= size[1] + 1e-6


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from workers.probes.zoo import world

    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_head_ablation_runs_and_attention_statistics_and_feature_swap_are_refused(model_dir, scenes, capsys):
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "2", "--json"]) == 0
    ablation = json.loads(capsys.readouterr().out)
    assert {h["component"] for h in ablation["heads"]} == {"decoder", "cross", "vision"}
    code = main(["attention", "--model", str(model_dir), "--dataset", str(scenes), "--json", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "cross-attention" in err
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "feature swap is not supported for Llama 3.2 Vision" in err

"""Mistral 3: a Pixtral tower over the image at its own aspect ratio, then a patch merger
(``adapters/mistral3.py``).

A tiny random-weight checkpoint built with transformers' own classes (``tests/tiny_vlms.save_tiny_mistral3``).
The planted-answer test finds where a marker drawn on the stored image lands among the image tokens
without the adapter's geometry (the processor's own pixels, merged by the model's own patch merger)
and checks that the adapter's token -> region map brings it back to the region it was drawn in."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from tests import family_checks
from tests.tiny_vlms import save_tiny_mistral3
from workers.probes.adapters import load_adapter

pytestmark = pytest.mark.slow

#: stored sizes (width, height): square, wide, tall, odd sizes, larger than the longest edge
SIZES = [(16, 16), (40, 20), (20, 50), (33, 33), (61, 17), (90, 37)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_mistral3(tmp_path_factory.mktemp("mistral3"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def _marker_per_token(adapter, size, box):
    """Per image token, how much of a white box drawn on a black stored image it sees, found WITHOUT the
    adapter's geometry: which patches of the processor's own pixels change, merged by the model's own
    patch merger (its learned layer summed away: a sum over the merged patches' channels)."""
    blank = Image.new("RGB", size, (0, 0, 0))
    marked = blank.copy()
    marked.paste((255, 255, 255), tuple(int(v) for v in box))
    a, b = (adapter._image_processor_call([im]) for im in (blank, marked))
    diff = (b["pixel_values"] - a["pixel_values"]).abs().sum(1)[0]  # [rh, rw]
    p = adapter.patch_size
    rh, rw = (int(v) for v in a["image_sizes"][0])
    cells = diff.reshape(rh // p, p, rw // p, p).sum((1, 3)).reshape(-1, 1).double()
    merger = adapter.model.model.multi_modal_projector.patch_merger
    learned, merger.merging_layer = merger.merging_layer, torch.nn.Identity()
    try:
        return merger(cells, a["image_sizes"]).sum(-1)
    finally:
        merger.merging_layer = learned


@pytest.mark.parametrize("size", SIZES)
def test_relevance_planted_at_a_region_comes_back_at_that_region(adapter, size):
    w, h = size
    gh, gw = adapter.grid
    adapter.preprocess([Image.new("RGB", size)])
    enc = adapter.encode("describe the image")
    assert enc.regions.shape == (len(enc.image_positions), gh * gw)
    assert torch.allclose(enc.regions.sum(1), torch.ones(len(enc.regions)))
    for k in (0, gw - 1, gw + 1, gh * gw - 1):  # corners and an inner region
        r, c = divmod(k, gw)
        box = ((c + .25) * w / gw, (r + .25) * h / gh, (c + .75) * w / gw, (r + .75) * h / gh)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        planted = _marker_per_token(adapter, size, box)
        assert planted.shape[0] == len(enc.image_positions), "the processor and the adapter disagree on the tokens"
        back = planted @ enc.regions.double()
        # a token coarser than a region (a thin image's few token rows) splits it evenly between the regions
        # it covers: a tie at the top, and nearly all of it within one region of the marker
        assert back[k] >= back.max() * (1 - 1e-9), (size, k, back.reshape(gh, gw))
        # the token rows and columns of this image (the processor's own size): a token spans this many regions
        rh, rw = (int(v) for v in adapter._image_processor_call([Image.new("RGB", size)])["image_sizes"][0])
        span_r, span_c = max(1, math.ceil(gh * adapter.unit / rh)), max(1, math.ceil(gw * adapter.unit / rw))
        rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
        near = ((rows - r).abs() <= span_r) & ((cols - c).abs() <= span_c)
        assert back[near].sum() > 0.9 * back.sum(), (size, k, back.reshape(gh, gw))


def test_the_adapters_sequence_is_the_models_own(adapter):
    """Ids as PixtralProcessor writes them (rows of ``[IMG]`` closed by ``[IMG_BREAK]``, the last by
    ``[IMG_END]``), and the adapter's embedding path gives the logits of the model's own forward."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    tok = adapter.tokenizer
    marks = [t for t in tok.convert_ids_to_tokens(enc.input_ids[0].tolist()) if t.startswith("[IMG")]
    assert marks == ["[IMG]"] * 4 + ["[IMG_BREAK]"] + ["[IMG]"] * 4 + ["[IMG_END]"]  # 32 x 16 px: 2 rows of 4
    sizes = torch.tensor([[16, 32]])
    with torch.no_grad():
        ref = adapter.model(input_ids=enc.input_ids, pixel_values=pv, image_sizes=sizes).logits
        ours = adapter.language_logits(adapter.embed(enc.input_ids, adapter.image_features(pv)))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_each_tokens_region_relevance_sums_to_its_image_relevance(adapter):
    family_checks.assert_region_relevance_sums_to_image_relevance(adapter)


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    out = family_checks.run_attribute_command(model_dir, tmp_path, capsys, size)
    assert out["graph"]["grid"] == [4, 4]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from workers.probes.zoo import world

    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_attention_statistics_and_head_ablation_run_and_feature_swap_is_refused(model_dir, scenes, capsys):
    family_checks.assert_attention_and_head_ablation_run_and_feature_swap_is_refused(
        model_dir, scenes, capsys, "feature swap is not supported for Mistral 3")

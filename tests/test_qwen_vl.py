"""Qwen2.5-VL and Qwen3-VL: dynamic resolution, 2 x 2 merged patches, M-RoPE positions (and Qwen3-VL's
deepstack features).

Tiny random-weight checkpoints built with transformers' own classes (``tests/tiny_vlms.save_tiny_qwen_vl``).
The planted-answer test finds where a marker drawn on the stored image lands among the image tokens without
the adapter's geometry (which of the processor's own flat patches change, grouped as the merger groups
them) and checks that the adapter's token -> region map brings it back to the region it was drawn in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests import family_checks
from tests.tiny_vlms import save_tiny_qwen_vl
from workers.probes.adapters import load_adapter

pytestmark = pytest.mark.slow

#: stored sizes (width, height): square, wide, tall, odd sizes the processor rounds, and ones it shrinks
SIZES = [(32, 32), (40, 20), (20, 50), (33, 33), (61, 17), (90, 37), (120, 120)]


@pytest.fixture(scope="module", params=["2.5", "3"])
def model_dir(request, tmp_path_factory):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp(f"qwen{request.param}"), version=request.param)


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def _marker_per_token(adapter, size, box):
    """Which image tokens a white box drawn on a black stored image reaches, found from the processor's own
    flat patches (the rows of ``pixel_values`` that change), grouped ``merge x merge`` consecutive rows per
    token as the vision tower's merger groups them."""
    ip = adapter.processor.image_processor
    blank = Image.new("RGB", size, (0, 0, 0))
    marked = blank.copy()
    marked.paste((255, 255, 255), tuple(int(v) for v in box))
    a, b = (ip([im], return_tensors="pt")["pixel_values"] for im in (blank, marked))
    per_patch = (b - a).abs().sum(-1).double()
    return per_patch.reshape(-1, adapter.merge ** 2).sum(-1)


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
        planted = _marker_per_token(adapter, size, box)
        assert planted.shape[0] == len(enc.image_positions), "the processor and the adapter disagree on the tokens"
        back = planted @ enc.regions.double()
        assert back[k] >= back.max() * (1 - 1e-9), (size, k, back.reshape(gh, gw))
        rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
        near = ((rows - r).abs() <= 1) & ((cols - c).abs() <= 1)
        assert back[near].sum() > 0.9 * back.sum(), (size, k, back.reshape(gh, gw))


@pytest.mark.parametrize("size", [(40, 20), (20, 50)])
def test_the_traced_language_model_is_the_model_that_generates(adapter, size):
    """The probes run the language model on embeddings: the adapter must give it the M-RoPE positions (and
    Qwen3-VL's deepstack features) the model's own forward derives from ids, pixels and the grid."""
    image = Image.new("RGB", size, (200, 30, 90))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    grid = torch.tensor([dict(adapter.current_layout().extras)["image_grid_thw"]])
    inputs = {"input_ids": enc.input_ids, "pixel_values": pv.flatten(0, 1), "image_grid_thw": grid,
              "mm_token_type_ids": (enc.input_ids == adapter.image_token_id).int()}
    with torch.no_grad():
        ref = adapter.model(**inputs).logits
        embeds = adapter.embed(enc.input_ids, adapter.image_features(pv))
        ours = adapter.language_logits(embeds)
        plain = adapter.model.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                          suppress_tokens=[adapter.image_token_id])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(adapter.model.lm_head(plain), ref, atol=1e-5), "positions make no difference"
    assert adapter.generate(embeds, max_new_tokens=4)[0] == expected[0, enc.input_ids.shape[1]:].tolist()


def test_each_tokens_region_relevance_sums_to_its_image_relevance(adapter):
    family_checks.assert_region_relevance_sums_to_image_relevance(adapter)


@pytest.mark.parametrize("size", [(40, 24), (24, 60)])
def test_attribute_command_end_to_end(model_dir, tmp_path, capsys, size):
    out = family_checks.run_attribute_command(model_dir, tmp_path, capsys, size)
    assert out["caption"] is not None
    for tok in out["tokens"]:
        for method in family_checks.METHODS:
            assert np.asarray(tok[method]["image_relevance"]).shape == (4, 4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from workers.probes.zoo import world

    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_attention_statistics_and_head_ablation_run_and_feature_swap_is_refused(model_dir, scenes, capsys):
    family_checks.assert_attention_and_head_ablation_run_and_feature_swap_is_refused(
        model_dir, scenes, capsys, "feature swap is not supported")

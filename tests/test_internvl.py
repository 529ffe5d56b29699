"""InternVL: tiles plus a thumbnail, each read by InternViT and pixel-shuffled (``adapters/internvl.py``).

A tiny random-weight checkpoint built with transformers' own classes (``tests/tiny_vlms.save_tiny_internvl``).
The planted-answer test finds where a marker drawn on the stored image lands among the image tokens
without the adapter's geometry (the processor's own tiles, folded by the model's own ``pixel_shuffle``)
and checks that the adapter's token -> region map brings it back to the region it was drawn in."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests import family_checks
from tests.tiny_vlms import save_tiny_internvl
from workers.probes.adapters import load_adapter

pytestmark = pytest.mark.slow

#: stored sizes (width, height): one tile, wide, tall, odd sizes, a panorama
SIZES = [(16, 16), (40, 20), (20, 50), (33, 33), (61, 17), (90, 37)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_internvl(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def _marker_per_token(adapter, size, box):
    """Per image token, how much of a white box drawn on a black stored image it sees, found WITHOUT the
    adapter's geometry: which patches of the processor's own tiles change, folded by the model's own code."""
    blank = Image.new("RGB", size, (0, 0, 0))
    marked = blank.copy()
    marked.paste((255, 255, 255), tuple(int(v) for v in box))
    a, b = (adapter._image_processor_call([im])["pixel_values"] for im in (blank, marked))
    diff = (b - a).abs().sum(1)  # [tiles, S, S]
    g, p = adapter.image_size // adapter.patch_size, adapter.patch_size
    cells = diff.reshape(diff.shape[0], g, p, g, p).sum((2, 4))[..., None].double()
    return adapter.model.model.pixel_shuffle(cells, scale_factor=adapter.ratio).sum(-1).reshape(-1)


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
        assert back[k] >= back.max() * (1 - 1e-9), (size, k, back.reshape(gh, gw))
        rows, cols = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
        near = ((rows - r).abs() <= 1) & ((cols - c).abs() <= 1)
        assert back[near].sum() > 0.9 * back.sum(), (size, k, back.reshape(gh, gw))


def test_the_adapters_sequence_is_the_models_own(adapter):
    """Ids as InternVLProcessor would write them (``<img>``, one context token per tile token, ``</img>``),
    and the adapter's embedding path gives the logits of the model's own forward over ids and pixels."""
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    pv = adapter.preprocess([image])
    enc = adapter.encode("describe the image")
    tiles = pv.shape[1]
    assert tiles == 3  # 2 x 1 tiles and the thumbnail
    tok = adapter.tokenizer
    ids = enc.input_ids[0].tolist()
    start = ids.index(tok.convert_tokens_to_ids("<img>"))
    assert ids[start + 1 + adapter.tokens_per_tile * tiles] == tok.convert_tokens_to_ids("</img>")
    with torch.no_grad():
        ref = adapter.model(input_ids=enc.input_ids, pixel_values=pv[0]).logits
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
        model_dir, scenes, capsys, "feature swap is not supported for InternVL")


def test_prompts_go_through_the_directorys_chat_template(model_dir, tmp_path):
    import shutil

    from workers.probes.errors import UnsupportedModelError

    templated = tmp_path / "templated"
    shutil.copytree(model_dir, templated)
    (templated / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% for item in m['content'] %}{% if item['type'] == 'image' %}"
        "<IMG_CONTEXT>{% else %} {{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} a{% endif %}", encoding="utf-8")
    adapter = load_adapter(str(templated))
    adapter.preprocess([Image.new("RGB", (16, 16))])
    words = adapter.tokenizer.convert_ids_to_tokens(adapter.encode("describe the image").input_ids[0].tolist())
    # one BOS (the template's, not doubled), the image where the template puts it, the assistant's turn opened
    assert words == ["<s>", "<img>", *["<IMG_CONTEXT>"] * adapter.tokens_per_tile, "</img>", "describe", "the",
                     "image", "a"]
    (templated / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'][1]['text'] }}",
                                                   encoding="utf-8")
    adapter = load_adapter(str(templated))
    adapter.preprocess([Image.new("RGB", (16, 16))])
    with pytest.raises(UnsupportedModelError, match="chat template writes 0 image placeholders"):
        adapter.encode("describe the image")

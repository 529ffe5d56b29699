"""SigLIP 2 (NaFlex) as a dual encoder, explained on the square patch grid its processor gives a square image.

A tiny random-weight ``Siglip2Model`` saved with transformers' own classes (``tests/tiny_models.save_tiny_siglip2``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import save_tiny_siglip2, write_shapes
from workers.probes import registry
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

#: stored sizes (width, height): square, wide, tall, odd
SIZES = [(32, 32), (64, 40), (30, 70), (45, 45), (97, 23)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_siglip2(tmp_path_factory.mktemp("siglip2"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir))


def test_a_square_image_embeds_as_through_the_naflex_processor(adapter):
    image = Image.new("RGB", (32, 32), (200, 30, 90))
    image.paste((0, 255, 0), (3, 5, 20, 17))
    inputs = adapter.image_processor(images=[image], return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [list(adapter.grid)]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(adapter.model.get_image_features(**inputs).pooler_output, dim=-1)
        ours = adapter.image_embeds(adapter.preprocess([image]))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert "square" in adapter.describe()["naflex"]


@pytest.mark.parametrize("size", SIZES)
def test_a_marker_in_one_region_reaches_the_tower_as_that_regions_patch(adapter, size):
    """Found without the adapter's geometry: which row of the patch sequence the NaFlex tower's patch embedding
    reads changes when a marker is drawn in region ``k`` (``patch_boxes``) of the stored image."""
    captured: list[torch.Tensor] = []
    embedding = adapter.model.vision_model.embeddings.patch_embedding
    handle = embedding.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    blank = Image.new("RGB", size)
    try:
        for k, (x0, y0, x1, y1) in enumerate(adapter.patch_boxes(size)):
            w, h = x1 - x0, y1 - y0
            marked = blank.copy()
            marked.paste((255, 255, 255), (int(x0 + w / 4), int(y0 + h / 4), int(np.ceil(x1 - w / 4)),
                                           int(np.ceil(y1 - h / 4))))
            captured.clear()
            with torch.no_grad():
                adapter.image_embeds(adapter.preprocess([blank, marked]))
            rows = (captured[0][1] - captured[0][0]).abs().sum(-1)
            assert int(rows.argmax()) == k and rows[k] > 0.9 * rows.sum(), (size, k, rows)
    finally:
        handle.remove()


@pytest.mark.parametrize("method", registry.available())
def test_every_grounding_method_maps_onto_the_grid(adapter, method):
    image = Image.new("RGB", (64, 40), (230, 230, 230))
    image.paste((220, 20, 20), (8, 8, 24, 24))
    pv = adapter.preprocess([image])
    maps = registry.get(method)(adapter, pv, ["a red circle"])
    assert tuple(maps.shape) == (1, *adapter.grid) and torch.isfinite(maps).all()


def test_the_grounding_commands_run_end_to_end(model_dir, tmp_path, capsys):
    shapes = write_shapes(tmp_path / "shapes")
    assert main(["evaluate", "--model", str(model_dir), "--dataset", str(shapes), "--method", "chefer", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "chefer" and result["n"] == 4
    assert main(["attention", "--model", str(model_dir), "--dataset", str(shapes), "--json"]) == 0
    capsys.readouterr()
    from workers.probes.zoo import world

    scenes = tmp_path / "scenes"
    world.write_dataset(scenes, world.sample_scenes(1_000_003, 2))
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--json", "--no-progress"]) == 0
    assert {h["component"] for h in json.loads(capsys.readouterr().out)["heads"]} == {"vision", "text"}
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(shapes), "--kind", "feature-swap", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "feature swap is not supported for SigLIP 2" in err

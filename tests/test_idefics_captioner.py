"""The zoo's tiny Idefics3 captioner: split frames plus a global frame, pixel-shuffled, on the world.

Actors: an auditor who loads the committed reference model through Loupe (or stock transformers
classes) and checks token attribution on it, and a maintainer who rebuilds it from scratch.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.zoo_fixtures import HELDOUT_SEED  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path, file_sha256, verify_checksums, world  # noqa: E402
from workers.probes.zoo import idefics_captioner as ic  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter():
    from workers.probes import suite

    return suite.load_model(str(checkpoint_path(ic.NAME)), "cpu")  # checkpoint_path verifies SHA256SUMS


def test_loupe_loads_it_as_idefics3_with_frames_and_a_global_frame(adapter):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    assert adapter.architecture == "idefics3" and adapter.kind == "fusion"
    path = checkpoint_path(ic.NAME)
    assert not list(path.glob("*.bin")), "no pickled weights in the zoo"
    model = Idefics3ForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=world.scene_at(HELDOUT_SEED, 0).image, text="<image> describe the image",
                       return_tensors="pt")
    # a 224 px scene: 2 x 2 frames plus the global frame, 6 x 6 tokens each after the pixel shuffle
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 96, 96)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 5 * 36


def test_it_names_the_objects_of_held_out_scenes(adapter):
    model, processor = adapter.model, adapter.processor
    scenes = world.sample_scenes(HELDOUT_SEED, 8, start=40)
    captions = captioner.generate_captions(model, processor, [s.image for s in scenes])
    pairs = list(zip(captions, scenes, strict=True))
    assert all(c.startswith("a ") and c.split().count("a") == len(s.objects) for c, s in pairs), captions
    colours = [(w, s) for c, s in pairs for w in c.split() if w in world.COLOURS]
    assert sum(any(o.colour == w for o in s.objects) for w, s in colours) >= 0.9 * len(colours), captions
    shapes = [(w, s) for c, s in pairs for w in c.split() if w in world.SHAPES]
    assert sum(any(o.shape == w for o in s.objects) for w, s in shapes) >= 0.8 * len(shapes), captions


def test_a_colour_words_relevance_peaks_inside_its_object(adapter):
    """Gradient x attention (`chefer`), the best method on this model, mapped to regions by the token map."""
    from workers.probes import token_attribution as ta

    hits = []
    for i in range(3):
        scene = world.scene_at(HELDOUT_SEED, i)
        att = ta.attribute(adapter, scene.image, captioner.PROMPTS[0], max_new_tokens=24)
        boxes = adapter.patch_boxes(scene.image.size)
        for t, tok in enumerate(att.generated_tokens):
            named = [o for o in scene.objects if o.colour == tok]
            if len(named) == 1:
                x0, y0, x1, y1 = boxes[int(np.argmax(att.image["chefer"][t]))]
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                box = named[0].box
                hits.append(box[0] <= cx < box[2] and box[1] <= cy < box[3])
    assert len(hits) >= 6 and np.mean(hits) >= 0.8, hits


def test_its_attention_supervision_uses_the_probes_token_map():
    """The tokens a word's attention is pulled onto are those Loupe's region map puts on the object:
    in every split frame and in the global frame."""
    from workers.probes.adapters.idefics3 import Idefics3Adapter

    model, processor, _ = ic.initial_model(ic.TrainSpec())
    scene = world.scene_at(HELDOUT_SEED, 0)
    image_text, token_mask = ic.token_masker(model, processor, scene.size, 0.5)
    obj = scene.objects[0]
    mask = token_mask(obj.box, scene.size)
    assert image_text.count("<image>") == len(mask) == 5 * 36
    adapter = Idefics3Adapter(model, processor)
    adapter.preprocess([scene.image])
    boxes = adapter.token_boxes(adapter.current_layout()).numpy()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = ((centres[:, 0] >= obj.box[0]) & (centres[:, 0] < obj.box[2]) & (centres[:, 1] >= obj.box[1])
              & (centres[:, 1] < obj.box[3]))
    split = np.arange(len(mask)) < 4 * 36
    assert mask[split].any() and mask[~split].any()
    assert (mask[split] == inside[split]).all()  # a split-frame token is one region of Loupe's grid
    far = np.hypot(*(centres - [(obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2]).T) > 120
    assert not (mask & far).any()


def test_its_vision_tower_is_the_zoo_tiny_siglip_tower():
    from safetensors.torch import load_file

    path = checkpoint_path(ic.NAME)
    info = json.loads((path / "training.json").read_text())
    src = checkpoint_path(ic.VISION_SOURCE)
    assert info["vision_source"]["sha256"] == file_sha256(src / "model.safetensors"), (
        "tiny-siglip was rebuilt after the captioner: rebuild it with "
        "`python -m workers.probes.zoo build --only tiny-idefics3`")
    mine = load_file(path / "model.safetensors")
    siglip = load_file(src / "model.safetensors")
    tower = {k.split("model.vision_model.", 1)[1]: v for k, v in mine.items() if "model.vision_model." in k}
    assert tower and all(not k.startswith("head.") for k in tower)
    for key, value in tower.items():
        assert (siglip["vision_model." + key] == value).all(), key


def test_the_zoo_command_builds_it_after_the_dual_encoders(capsys):
    from workers.probes.zoo.__main__ import main

    assert main(["build", "--only", "no-such-model"]) == 2
    known = capsys.readouterr().err.split("known: ")[1].strip().split(", ")
    assert ic.NAME in known and known.index(ic.NAME) > known.index(ic.VISION_SOURCE)


def test_it_retrains_from_scratch_into_a_verified_checkpoint(tmp_path):
    from workers.probes import suite

    out = ic.train(tmp_path / "cap", ic.TrainSpec(train_scenes=8, steps=2, batch_size=4, eval_scenes=2),
                   log=lambda *_: None)
    verify_checksums(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
                 "training.json"):
        assert (out / name).is_file(), name
    assert suite.load_model(str(out), "cpu").architecture == "idefics3"


def test_deletion_hides_a_region_in_every_frame_that_shows_it(adapter):
    """Validation's deletion/insertion curves hide regions of the stored image, which reach every
    frame (split and global) that shows them; the frames cannot be masked on one patch grid."""
    import torch

    from workers.probes import token_perturbation as tp
    from workers.probes.errors import ProbeInputError

    scene = world.scene_at(HELDOUT_SEED, 1)
    clean = adapter.preprocess([scene.image])
    g = adapter.grid[0] * adapter.grid[1]
    boxes = adapter.patch_boxes(scene.image.size)
    box = scene.objects[0].box
    on_object = torch.tensor([box[0] <= (b[0] + b[2]) / 2 < box[2] and box[1] <= (b[1] + b[3]) / 2 < box[3]
                              for b in boxes])
    keep = torch.stack([torch.ones(g, dtype=torch.bool), torch.zeros(g, dtype=torch.bool), ~on_object])
    copies = tp.region_masked_copies(adapter, scene.image, keep)
    assert torch.allclose(copies[0], clean[0])
    assert copies[1].abs().max() < 0.02  # everything hidden: the mean colour in every frame
    changed = (copies[2] - clean[0]).abs().flatten(1).amax(1) > 0.1  # per frame
    assert changed[-1] and changed.sum() >= 2  # the global frame and every split frame the object lies in
    enc = adapter.encode(captioner.PROMPTS[0])
    with pytest.raises(ProbeInputError, match="stored image"):
        tp.word_deletion_insertion(adapter, enc, clean, [adapter.tokenizer.eos_token_id], [0],
                                   {"raw": torch.rand(1, g)})


def test_the_default_methods_are_those_that_apply_to_its_frames(capsys):
    from workers.probes.cli import main as probes

    base = ["token_attribution", "--model", str(checkpoint_path(ic.NAME)), "--json", "--no-progress", "--limit", "1",
            "--validate-images", "1", "--stability-images", "0", "--examples", "0"]
    assert probes(base) == 0
    metrics = json.loads(capsys.readouterr().out)
    # occlusion and the gradient methods perturb one patch grid; the frames are several: left out, and said so
    assert "occlusion" not in metrics["pointing"] and metrics["pointing"]["chefer"] is not None
    assert "idefics3" in metrics["perturbation_not_run"]
    assert sorted(metrics["validation"]["validated"] + metrics["validation"]["not_shown"]) == ["chefer", "raw"]
    # asked for by name, they are refused with the reason rather than silently dropped
    assert probes([*base, "--perturbation", "occlusion"]) == 2
    assert "tiles, frames or pools the image" in capsys.readouterr().err

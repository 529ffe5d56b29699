"""The reference zoo: a deterministic synthetic world and the committed tiny dual encoders.

Actors: an *auditor* who validates explanation methods on models with known ground truth
(needs exact boxes and reproducible data), and a *probe* that loads the zoo checkpoints like any
other Hugging Face model, offline, and must notice if they were tampered with.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from workers.probes import zoo
from workers.probes.errors import ProbeInputError
from workers.probes.zoo import world

pytestmark = pytest.mark.slow


def _colour_at(scene: world.Scene, x: int, y: int) -> np.ndarray:
    return np.asarray(scene.image, dtype=np.int32)[y, x]


# --- the world -------------------------------------------------------------------------------


def test_it_renders_the_same_scene_for_the_same_seed_and_index():
    a = world.sample_scenes(42, 5)
    b = world.sample_scenes(42, 3, start=2)
    assert [s.caption for s in a[2:]] == [s.caption for s in b]
    assert [s.objects for s in a[2:]] == [s.objects for s in b]
    assert np.array_equal(np.asarray(a[3].image), np.asarray(b[1].image))
    other = world.sample_scenes(43, 5)
    assert [s.objects for s in a] != [s.objects for s in other]


@pytest.mark.parametrize("size", [224, 160])
def test_it_keeps_boxes_inside_the_image_apart_and_out_of_the_watermark_corner(size):
    reserved = world.watermark_region(size)
    for scene in world.sample_scenes(7, 60, size=size, watermark="corner-stamp"):
        assert scene.image.size == (size, size)
        assert 2 <= len(scene.objects) <= 4
        boxes = [o.box for o in scene.objects]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert not world._overlaps((x0, y0, x1, y1), reserved, 0)
            for other in boxes[i + 1 :]:
                assert not world._overlaps((x0, y0, x1, y1), other, 0)
        # The stamp itself lies inside the reserved corner.
        wx0, wy0, wx1, wy1 = scene.watermark_box
        assert reserved[0] <= wx0 < wx1 <= size and reserved[1] <= wy0 < wy1 <= size


def test_it_draws_each_object_in_its_box_in_its_colour():
    for scene in world.sample_scenes(3, 20):
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            # The centre pixel of every shape (circle, square, triangle, cross) is filled.
            got = _colour_at(scene, (x0 + x1) // 2, (y0 + y1) // 2)
            want = np.array(world.COLOUR_RGB[obj.colour])
            assert np.abs(got - want).max() <= 14, (obj, got)
        # Caption names every object once, left to right.
        assert scene.caption.count(" a ") + 1 == len(scene.objects) or len(scene.objects) == 1
        for obj in scene.objects:
            assert obj.prompt in scene.caption


def test_it_gives_every_object_a_distinct_colour_and_shape_by_default():
    for scene in world.sample_scenes(5, 40):
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        assert all(len(scene.boxes_for(o.prompt)) == 1 for o in scene.objects)


def test_it_crowds_scenes_with_five_or_six_distinct_objects_from_the_wider_palette():
    scenes = [world.crowded_scene_at(5, i) for i in range(40)]
    for scene in scenes:
        assert 5 <= len(scene.objects) <= 6
        assert len({o.colour for o in scene.objects}) == len({o.shape for o in scene.objects}) == len(scene.objects)
        assert {o.colour for o in scene.objects} <= set(world.CROWDED_COLOURS)
        assert {o.shape for o in scene.objects} <= set(world.CROWDED_SHAPES)
    assert {o.shape for s in scenes for o in s.objects} == set(world.CROWDED_SHAPES)  # star and ring drawn too
    assert np.array_equal(np.asarray(world.crowded_scene_at(5, 3).image), np.asarray(scenes[3].image))
    orange = next(o for s in scenes for o in s.objects if o.colour == "orange")
    assert orange.prompt == f"an orange {orange.shape}"


def test_it_places_unnamed_grey_decoys_between_the_objects_without_moving_them():
    for i in range(30):
        plain, decoyed = world.scene_at(7, i), world.scene_at(7, i, decoys=8)
        assert decoyed.objects == plain.objects and decoyed.caption == plain.caption
        assert 6 <= len(decoyed.decoys) <= 8 and not plain.decoys
        boxes = [o.box for o in decoyed.objects] + [d.box for d in decoyed.decoys]
        for j, a in enumerate(boxes):  # nothing overlaps, and the watermark corner stays free
            assert not any(world._overlaps(a, b, 0) for b in boxes[j + 1:] + [world.watermark_region()])
        a, b = np.asarray(plain.image, dtype=np.int32), np.asarray(decoyed.image, dtype=np.int32)
        for o in decoyed.objects:  # the objects' pixels are untouched
            x0, y0, x1, y1 = o.box
            assert np.array_equal(a[y0:y1, x0:x1], b[y0:y1, x0:x1])
        for d in decoyed.decoys:  # a decoy is grey and darker than any background
            cx, cy = (d.box[0] + d.box[2]) // 2, (d.box[1] + d.box[3]) // 2 + 2
            px = b[cy, cx]
            assert px.max() - px.min() == 0 and px[0] == d.grey < 160
    again = world.scene_at(7, 29, decoys=8)  # reproducible, and kept when the watermark is toggled
    assert again.decoys == decoyed.decoys and np.array_equal(np.asarray(again.image), b)
    assert again.render("corner-stamp").render(None).decoys == again.decoys


def test_it_writes_the_decoys_split_as_the_held_out_annotations_with_decoys_in_the_scene_records(tmp_path):
    split = zoo.SPLITS["heldout-decoys"]
    assert split.seed == zoo.SPLITS["heldout"].seed and split.decoys == 8
    plain = world.write_dataset(tmp_path / "plain", (world.scene_at(split.seed, i) for i in range(4)))
    decoyed = world.write_dataset(tmp_path / "decoys", itertools.islice(split.scenes(), 4))
    assert (plain / "annotations.jsonl").read_text() == (decoyed / "annotations.jsonl").read_text()
    records = [json.loads(line) for line in (decoyed / "scenes.jsonl").read_text().splitlines()]
    assert all(len(r["decoys"]) == 8 and set(r["decoys"][0]) == {"shape", "grey", "box"} for r in records)
    assert "decoys" not in (plain / "scenes.jsonl").read_text()


def test_it_leaves_the_default_world_pixel_for_pixel_as_the_checkpoints_were_trained_on():
    # the crowded options must not shift the random stream of ordinary scenes (WORLD_VERSION 1)
    digest = hashlib.sha256(b"".join(np.asarray(world.scene_at(0, i).image).tobytes() for i in range(8)))
    assert digest.hexdigest() == "2e331e03fc2c8e10e8466e20e8f960c802c2dca604de86374672694a32ce429c"


def test_it_adds_and_removes_the_watermark_without_changing_anything_else():
    clean = world.scene_at(11, 0)
    stamped = clean.render("corner-stamp")
    again = stamped.render(None)
    a, b, c = (np.asarray(s.image) for s in (clean, stamped, again))
    assert np.array_equal(a, c)
    changed = np.argwhere((a != b).any(axis=-1))
    x0, y0, x1, y1 = stamped.watermark_box
    assert len(changed) > 0.5 * (x1 - x0) * (y1 - y0)
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert stamped.objects == clean.objects


def test_it_refuses_unknown_watermarks_and_impossible_scenes():
    with pytest.raises(ValueError, match="unknown watermark"):
        world.scene_at(0, 0, watermark="logo")
    with pytest.raises(ValueError, match="distinct shapes"):
        world.scene_at(0, 0, n_objects=5)


def test_it_writes_a_dataset_that_reads_back_with_the_same_boxes(tmp_path):
    scenes = world.sample_scenes(9, 4)
    out = world.write_dataset(tmp_path / "ds", scenes, world.all_object_prompts)
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(s.objects) for s in scenes)
    anns = list(world.read_dataset(out))
    k = 0
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            ann = anns[k]
            assert ann.image == out / f"images/{i:05d}.png" and ann.image.is_file()
            assert ann.prompt == obj.prompt and ann.boxes == [obj.box]
            k += 1
        from PIL import Image

        written = np.asarray(Image.open(out / f"images/{i:05d}.png").convert("RGB"))
        assert np.array_equal(written, np.asarray(scene.image))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["images"] == 4 and meta["examples"] == len(lines)


def test_it_generates_the_heldout_split_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(zoo.SPLITS, "heldout", zoo.Split(seed=zoo.SPLITS["heldout"].seed, n_images=6))
    d = zoo.dataset_dir("heldout")
    assert d.parent == tmp_path / "zoo"
    first = (d / "annotations.jsonl").read_text()
    mtime = (d / "annotations.jsonl").stat().st_mtime_ns
    assert zoo.dataset_dir("heldout") == d and (d / "annotations.jsonl").stat().st_mtime_ns == mtime
    # Deterministic: regenerating elsewhere gives the same annotations, disjoint from training.
    assert (zoo.dataset_dir("heldout", root=tmp_path / "again") / "annotations.jsonl").read_text() == first
    assert zoo.SPLITS["heldout"].seed != 0
    with pytest.raises(ProbeInputError, match="unknown zoo split"):
        zoo.dataset_dir("nope")


# --- the committed checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="session")
def loaded():
    """Every committed dual encoder, loaded offline through the Auto classes."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    out = {}
    for name in zoo.DUAL_ENCODERS:
        path = zoo.checkpoint_path(name)
        out[name] = (
            AutoModel.from_pretrained(path, use_safetensors=True).eval(),
            AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path),
        )
    return out


def test_it_loads_the_committed_checkpoints_offline_as_clip_and_siglip(loaded):
    from transformers import CLIPModel, SiglipModel

    assert isinstance(loaded["tiny-clip"][0], CLIPModel)
    assert isinstance(loaded["tiny-siglip"][0], SiglipModel)
    for name in zoo.DUAL_ENCODERS:
        path = zoo.checkpoint_path(name)
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        card = (path / "README.md").read_text()
        assert card.startswith("---\n") and "object_accuracy" in card


def test_it_pools_the_clip_text_at_the_eos_token(loaded):
    model, tok, _ = loaded["tiny-clip"]
    eos = model.config.text_config.eos_token_id
    # eos_token_id == 2 would switch transformers to legacy argmax pooling.
    assert eos == tok.eos_token_id and eos != 2
    ids = tok(["a red circle"])["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[-1] == eos


def test_it_gives_siglip_the_same_text_embedding_whatever_the_padding(loaded):
    model, tok, _ = loaded["tiny-siglip"]
    assert "attention_mask" not in tok(["a red circle"])
    with torch.no_grad():
        short = model.get_text_features(**tok(["a red circle"], return_tensors="pt"))
        padded = model.get_text_features(**tok(["a red circle"], padding="max_length", return_tensors="pt"))
    short = getattr(short, "pooler_output", short)
    padded = getattr(padded, "pooler_output", padded)
    assert torch.nn.functional.cosine_similarity(short, padded).item() > 0.9


def test_it_detects_a_tampered_checkpoint(tmp_path):
    copy = tmp_path / "tiny-clip"
    shutil.copytree(zoo.checkpoint_path("tiny-clip"), copy)
    zoo.verify_checksums(copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["logit_scale_init_value"] = 1.0
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ProbeInputError, match="checksum mismatch for config.json"):
        zoo.verify_checksums(copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(ProbeInputError, match="no SHA256SUMS"):
        zoo.verify_checksums(copy)
    with pytest.raises(ProbeInputError, match="no zoo checkpoint 'tiny-vit'"):
        zoo.checkpoint_path("tiny-vit")


#: Measured when the checkpoints were built (object_accuracy / top1_present): tiny-clip 0.894 / 1.0
#: (12x12 grid, 128 held-out images), tiny-siglip 0.79 / 0.95 (sigmoid loss, 12x12 grid, 128 images); chance
#: is about 0.07 / 0.16.
#: The floors leave room for the torchvision image-processor backend, which resizes slightly
#: differently from the PIL one the models were trained with.
MIN_ZERO_SHOT = {
    "tiny-clip": {"object_accuracy": 0.70, "top1_present": 0.85},
    "tiny-siglip": {"object_accuracy": 0.70, "top1_present": 0.85},
}


@pytest.mark.parametrize("name", zoo.DUAL_ENCODERS)
def test_it_recognises_held_out_objects_well_above_chance(loaded, name):
    from workers.probes.zoo.train import zero_shot_accuracy

    model, tok, proc = loaded[name]
    scenes = world.sample_scenes(zoo.SPLITS["heldout"].seed, 64)
    got = zero_shot_accuracy(model, tok, proc, scenes)
    for metric, floor in MIN_ZERO_SHOT[name].items():
        assert got[metric] >= floor, (name, got)

"""Grounding datasets: what a user's annotations look like, and every way they can be wrong.

Actor: ``make_dataset`` writes a small annotations.jsonl dataset of PNGs into a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from workers.probes.datasets import load_dataset
from workers.probes.errors import ProbeInputError


def write_image(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def make_dataset(root: Path, records: list | None = None, *, raw_lines: list[str] | None = None) -> Path:
    write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.png", (32, 32))
    if records is None:
        records = [{"image": "images/a.png", "prompt": "a green square", "boxes": [[4, 4, 20, 30]]},
                   {"image": "images/b.png", "prompt": "a red circle", "boxes": [[0, 0, 16, 16], [16, 16, 32, 32]]}]
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in records]
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def refusal(root: Path, **kwargs) -> str:
    with pytest.raises(ProbeInputError) as info:
        load_dataset(root, **kwargs)
    return str(info.value)


def test_it_reads_examples_with_sizes_and_boxes(tmp_path):
    dataset = load_dataset(make_dataset(tmp_path))
    assert len(dataset) == 2
    first = dataset[0]
    assert (first.prompt, first.width, first.height) == ("a green square", 64, 48)
    assert first.boxes == ((4.0, 4.0, 20.0, 30.0),)
    assert first.load_image().mode == "RGB"
    assert first.source == "annotations.jsonl:1"


def test_it_takes_the_first_n_examples_with_limit(tmp_path):
    assert len(load_dataset(make_dataset(tmp_path), limit=1)) == 1


def test_it_names_the_line_of_malformed_json(tmp_path):
    good = json.dumps({"image": "images/a.png", "prompt": "x", "boxes": [[0, 0, 1, 1]]})
    message = refusal(make_dataset(tmp_path, raw_lines=[good, "", '{"image": "images/a.png",']))
    assert "annotations.jsonl:3" in message and "malformed JSON" in message


def test_it_names_missing_keys(tmp_path):
    message = refusal(make_dataset(tmp_path, [{"image": "images/a.png", "prompt": "x"}]))
    assert "annotations.jsonl:1" in message and "boxes" in message


def test_it_refuses_a_missing_image(tmp_path):
    message = refusal(make_dataset(tmp_path, [{"image": "images/nope.png", "prompt": "x", "boxes": [[0, 0, 1, 1]]}]))
    assert "annotations.jsonl:1" in message and "image not found" in message and "nope.png" in message


def test_it_refuses_an_unreadable_image(tmp_path):
    root = make_dataset(tmp_path, [{"image": "images/junk.png", "prompt": "x", "boxes": [[0, 0, 1, 1]]}])
    (root / "images" / "junk.png").write_bytes(b"not a png at all")
    assert "unreadable image" in refusal(root)


def test_it_refuses_a_truncated_image_when_decoding(tmp_path):
    root = make_dataset(tmp_path)
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(data[: len(data) // 2])
    dataset = load_dataset(root)  # the header is intact
    with pytest.raises(ProbeInputError, match="unreadable image"):
        dataset[0].load_image()


@pytest.mark.parametrize("box, why", [([0, 0, 65, 10], "outside"), ([-1, 0, 10, 10], "outside"),
                                      ([10, 10, 5, 20], "inverted"), ([0, 0, 10], "x0, y0, x1, y1"),
                                      (["a", 0, 1, 1], "numbers"), ([0, 0, float("nan"), 1], "finite")])
def test_it_refuses_boxes_outside_or_malformed(tmp_path, box, why):
    line = json.dumps({"image": "images/a.png", "prompt": "x", "boxes": [box]}, allow_nan=True)
    message = refusal(make_dataset(tmp_path, raw_lines=[line]))
    assert "annotations.jsonl:1" in message and why in message


def test_it_refuses_an_example_without_boxes(tmp_path):
    assert "non-empty list" in refusal(make_dataset(tmp_path, [{"image": "images/a.png", "prompt": "x", "boxes": []}]))


def test_it_refuses_an_empty_dataset(tmp_path):
    assert "empty" in refusal(make_dataset(tmp_path, raw_lines=["", "  "]))


def test_it_refuses_a_folder_without_annotations(tmp_path):
    assert "annotations.jsonl" in refusal(tmp_path)
    assert "not found" in refusal(tmp_path / "missing")


def test_it_refuses_decompression_bombs_before_decoding(tmp_path):
    root = make_dataset(tmp_path)
    # 64x48 = 3072 pixels: over a 3000-pixel cap; the real cap is 40 megapixels
    assert "too large" in refusal(root, max_pixels=3000)


def test_it_keeps_image_paths_inside_the_dataset_folder(tmp_path):
    write_image(tmp_path / "secret.png")
    root = tmp_path / "data"
    message = refusal(make_dataset(root, [{"image": "../secret.png", "prompt": "x", "boxes": [[0, 0, 1, 1]]}]))
    assert "outside the dataset folder" in message
    message = refusal(make_dataset(root, [{"image": str(tmp_path / "secret.png"), "prompt": "x",
                                           "boxes": [[0, 0, 1, 1]]}]))
    assert "relative" in message


def test_it_refuses_formats_beyond_common_rasters(tmp_path):
    root = make_dataset(tmp_path, [{"image": "images/a.eps", "prompt": "x", "boxes": [[0, 0, 1, 1]]}])
    (root / "images" / "a.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert "unreadable image" in refusal(root)


def test_it_fingerprints_the_data_it_read(tmp_path):
    root = make_dataset(tmp_path)
    before = load_dataset(root).fingerprint()
    assert load_dataset(root).fingerprint() == before
    write_image(root / "images" / "b.png", (32, 32))
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "images" / "b.png")
    assert load_dataset(root).fingerprint() != before


# --------------------------------------------------------------------------- COCO


def make_coco(root: Path, annotations: list | None = None) -> Path:
    write_image(root / "images" / "000001.png", (64, 48))
    write_image(root / "images" / "000002.png", (32, 32))
    data = {
        "images": [{"id": 1, "file_name": "000001.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "000002.png", "width": 32, "height": 32}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 9, "name": "cat"}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 2, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [0, 0, 64, 48]},
            {"id": 4, "image_id": 2, "category_id": 9, "bbox": [4, 4, 8, 8]},
        ],
    }
    (root / "instances.json").write_text(json.dumps(data), encoding="utf-8")
    return root


def test_it_reads_coco_instances_one_example_per_image_and_category(tmp_path):
    dataset = load_dataset(make_coco(tmp_path), format="coco")
    assert [(e.image_path.name, e.prompt) for e in dataset] == [
        ("000001.png", "a photo of a dog"), ("000001.png", "a photo of a cat"), ("000002.png", "a photo of a cat")]
    assert dataset[0].boxes == ((1.0, 2.0, 11.0, 22.0), (30.0, 2.0, 40.0, 12.0))  # [x, y, w, h] -> corners


def test_it_builds_coco_prompts_from_a_template(tmp_path):
    dataset = load_dataset(make_coco(tmp_path), format="coco", prompt_template="{name}")
    assert dataset[0].prompt == "dog"
    assert "{name}" in refusal(tmp_path, format="coco", prompt_template="a {colour} {name}")


def test_it_refuses_coco_boxes_outside_the_image(tmp_path):
    root = make_coco(tmp_path, [{"id": 5, "image_id": 2, "category_id": 9, "bbox": [20, 20, 20, 20]}])
    message = refusal(root, format="coco")
    assert "annotation 0" in message and "outside the 32x32 image" in message


def test_it_refuses_coco_references_to_unknown_images(tmp_path):
    root = make_coco(tmp_path, [{"id": 5, "image_id": 42, "category_id": 9, "bbox": [0, 0, 1, 1]}])
    assert "unknown image_id 42" in refusal(root, format="coco")


def test_it_refuses_json_that_is_not_coco(tmp_path):
    (tmp_path / "instances.json").write_text('{"images": []}', encoding="utf-8")
    assert "not a COCO instances file" in refusal(tmp_path, format="coco")
    (tmp_path / "instances.json").write_text('{"images": [', encoding="utf-8")
    assert "malformed JSON" in refusal(tmp_path, format="coco")


def test_it_reads_every_scene_object_also_from_a_relative_dataset_path(tmp_path, monkeypatch):
    # scenes.jsonl keys are resolved paths; a dataset named relative to the working directory used
    # to lose the per-object colours and shapes silently (feature swap then had nothing to swap)
    from workers.probes.scenes import load_scenes
    from workers.probes.zoo import world

    world.write_dataset(tmp_path / "data", world.sample_scenes(5, 2))
    monkeypatch.chdir(tmp_path)
    scenes = load_scenes("data")
    assert [len(s.objects) for s in scenes] == [len(s.objects) for s in world.sample_scenes(5, 2)]
    assert all(o.colour in world.COLOURS and o.shape in world.SHAPES for s in scenes for o in s.objects)

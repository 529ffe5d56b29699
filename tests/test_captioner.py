"""The zoo's tiny LLaVA-style captioner: a plain Hugging Face checkpoint that describes the world.

Actors: an auditor who loads the committed reference model with stock transformers classes, and a
maintainer who rebuilds it from scratch.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes.errors import ProbeInputError  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path, file_sha256, verify_checksums, world  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_processor():
    return captioner.load()


def test_it_loads_the_committed_captioner_with_stock_transformers_classes(model_and_processor):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = checkpoint_path(captioner.NAME)  # verifies SHA256SUMS
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")), "no pickled weights in the zoo"
    assert (path / "README.md").read_text().startswith("---")
    model = LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(images=world.scene_at(1_000_003, 0).image, text="<image> describe the image",
                       return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == captioner.GRID ** 2
    assert tuple(inputs["pixel_values"].shape) == (1, 3, captioner.IMAGE_SIZE, captioner.IMAGE_SIZE)


def test_it_names_the_colours_of_held_out_scenes(model_and_processor):
    model, processor = model_and_processor
    scenes = world.sample_scenes(1_000_003, 16, start=100)
    captions = captioner.generate_captions(model, processor, [s.image for s in scenes])
    named = [(w, s) for c, s in zip(captions, scenes, strict=True) for w in c.split() if w in world.COLOURS]
    assert len(named) >= 2 * len(scenes)
    assert sum(any(o.colour == w for o in s.objects) for w, s in named) >= 0.9 * len(named), captions
    shapes = [(w, s) for c, s in zip(captions, scenes, strict=True) for w in c.split() if w in world.SHAPES]
    assert sum(any(o.shape == w for o in s.objects) for w, s in shapes) >= 0.8 * len(shapes), captions
    assert all(c.startswith("a ") for c in captions), captions


def test_its_vision_tower_is_the_zoo_tiny_clip_tower():
    """The LLaVA recipe: the captioner reuses (frozen) the grounded tiny-clip tower it was built on."""
    import json

    from safetensors.torch import load_file

    path = checkpoint_path(captioner.NAME)
    info = json.loads((path / "training.json").read_text())
    assert info["vision_source"]["name"] == captioner.VISION_SOURCE and info["spec"]["freeze_vision"]
    assert info["grid"] == [captioner.GRID, captioner.GRID]
    llava = load_file(path / "model.safetensors")
    clip_path = checkpoint_path(captioner.VISION_SOURCE)
    clip = load_file(clip_path / "model.safetensors")
    # the committed zoo must be consistent: a rebuilt tiny-clip means a rebuilt captioner
    assert file_sha256(clip_path / "model.safetensors") == info["vision_source"]["sha256"], (
        "tiny-clip was rebuilt after the captioner: "
        "rebuild it with `python -m workers.probes.zoo build --only tiny-llava`")
    tower = {k.split("vision_tower.", 1)[1]: v for k, v in llava.items() if "vision_tower." in k}
    assert len(tower) == sum(k.startswith("vision_model.") for k in clip)
    for key, value in tower.items():
        assert (clip["vision_model." + key] == value).all(), key


def test_it_supervises_attention_on_the_named_objects_cells():
    # A 40x40 box at the top left of a 224 px scene covers the cells whose centres (every 18.7 px,
    # from 9.3 px) lie inside it: rows/columns 0 and 1 of the 12x12 grid.
    cells = captioner.object_cells((0, 0, 40, 40), (224, 224), 96, 8).reshape(12, 12)
    assert cells[:2, :2].all() and cells.sum() == 4
    # A box between cell centres still gets its nearest cell.
    assert captioner.object_cells((10, 10, 18, 18), (224, 224), 96, 8).sum() == 1
    processor = captioner.build_processor(96, 8)
    scene = world.scene_at(1_000_003, 0)
    ids, labels, mask, grounding = captioner._encode_batch(processor, [scene], [captioner.PROMPTS[0]], 144)
    words = [w for w in scene.caption.replace(",", " ").split() if w in world.COLOURS or w in world.SHAPES]
    assert len(grounding) == len(words)
    for (_, pos, box, size), word in zip(grounding, words, strict=True):
        assert labels[0, pos + 1] == processor.tokenizer.convert_tokens_to_ids(word)  # position pos predicts it
        assert any(o.box == box and word in (o.colour, o.shape) for o in scene.objects) and size == scene.size


def test_the_zoo_command_builds_it_after_the_dual_encoders(capsys):
    from workers.probes.zoo.__main__ import main

    assert main(["build", "--only", "no-such-model"]) == 2
    known = capsys.readouterr().err.split("known: ")[1].strip().split(", ")
    assert captioner.NAME in known and known.index(captioner.NAME) > known.index(captioner.VISION_SOURCE)


def test_a_zoo_rebuild_trains_the_captioners_on_the_dual_encoder_built_beside_them(tmp_path):
    seen = []

    def train_with(overrides):
        seen.append(overrides)
        out = tmp_path / "root" / "cap"
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.json").write_text(json.dumps({"exact_caption_accuracy": 0.5, "final_loss": 0.1,
                                                       "seconds": 1.0, "train_cpu_seconds": 1.0}))
        return out

    root = tmp_path / "root"
    summary = captioner.zoo_build("cap", root / "cap", "tiny-clip", train_with, steps=3, threads=None)
    assert seen[-1] == {"steps": 3}  # no tower built beside it: the committed tiny-clip
    assert summary == {"name": "cap", "path": str(root / "cap"), "exact_caption_accuracy": 0.5, "final_loss": 0.1,
                       "seconds": 1.0, "train_cpu_seconds": 1.0}
    (root / "tiny-clip").mkdir()
    (root / "tiny-clip" / "config.json").write_text("{}")
    captioner.zoo_build("cap", root / "cap", "tiny-clip", train_with, steps=None, threads=1)
    assert seen[-1] == {"torch_threads": 1, "vision_source": str(root / "tiny-clip")}


def test_it_retrains_from_scratch_into_a_verified_checkpoint(tmp_path):
    from workers.probes.adapters.llava import LlavaAdapter

    out = captioner.train(tmp_path / "cap", captioner.TrainSpec(train_scenes=8, steps=2, restart_steps=1, batch_size=4,
                                                              eval_scenes=2, torch_threads=1), log=lambda *_: None)
    verify_checksums(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
                 "training.json"):
        assert (out / name).is_file(), name
    adapter = LlavaAdapter.from_pretrained(out)
    assert adapter.kind == "fusion" and adapter.grid == (captioner.GRID, captioner.GRID)


def test_it_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        captioner.train(tmp_path, captioner.TrainSpec(train_scenes=4, steps=1, batch_size=2, eval_scenes=1),
                        log=lambda *_: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_it_refuses_pickled_or_missing_weights(tmp_path):
    from workers.probes.adapters.llava import LlavaAdapter

    src = checkpoint_path(captioner.NAME)
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ProbeInputError, match="safetensors"):
        LlavaAdapter.from_pretrained(tmp_path)
    with pytest.raises(ProbeInputError, match="does not exist"):
        LlavaAdapter.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("module", ["captioner", "idefics_captioner", "mllama_captioner"])
def test_a_rebuild_refuses_a_directory_of_other_files_before_training(tmp_path, module):
    import importlib

    train = importlib.import_module(f"workers.probes.zoo.{module}").train
    (tmp_path / "notes.txt").write_text("a maintainer's notes")
    logged: list[str] = []

    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        train(tmp_path, log=logged.append)

    assert logged == []  # refused before rendering a single training scene
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

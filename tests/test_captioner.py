"""The zoo's tiny LLaVA-style captioner: a plain Hugging Face checkpoint that describes the world.

Actors: an auditor who loads the committed reference model with stock transformers classes, and a
maintainer who rebuilds it from scratch.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes.errors import ProbeInputError  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path, verify_checksums, world  # noqa: E402


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
    # Colour words name objects that are really there; shapes are often wrong (see the model card).
    named = [(w, s) for c, s in zip(captions, scenes) for w in c.split() if w in world.COLOURS]
    assert len(named) >= 2 * len(scenes)
    assert sum(any(o.colour == w for o in s.objects) for w, s in named) >= 0.9 * len(named), captions
    assert all(c.startswith("a ") for c in captions), captions


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

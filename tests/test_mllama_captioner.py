"""The zoo's tiny Llama 3.2 Vision captioner: cross-attention fusion whose ground truth is known.

Actors: an auditor who loads the committed reference model with stock transformers classes and checks
Loupe's token attribution on it, and a maintainer who rebuilds it with the zoo command.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers.probes import token_attribution as ta  # noqa: E402
from workers.probes.adapters import load_adapter  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.zoo import captioner, checkpoint_path, verify_checksums, world  # noqa: E402
from workers.probes.zoo import mllama_captioner as mc  # noqa: E402

pytestmark = pytest.mark.slow

HELDOUT = 1_000_003


@pytest.fixture(scope="module")
def model_and_processor():
    return mc.load()


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(str(checkpoint_path(mc.NAME)))


def test_it_loads_the_committed_checkpoint_with_stock_transformers_classes():
    import torch
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    path = checkpoint_path(mc.NAME)  # verifies SHA256SUMS
    assert not list(path.glob("*.bin")), "no pickled weights in the zoo"
    assert (path / "README.md").read_text().startswith("---")
    model = MllamaForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path)
    assert list(model.config.text_config.cross_attention_layers) == list(mc.CROSS_ATTENTION_LAYERS)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[[world.scene_at(HELDOUT, 0).image]], text=[text], return_tensors="pt",
                       add_special_tokens=False)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 1
    assert tuple(inputs["pixel_values"].shape) == (1, 1, 1, 3, captioner.IMAGE_SIZE, captioner.IMAGE_SIZE)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_it_names_the_objects_of_held_out_scenes(model_and_processor):
    model, processor = model_and_processor
    scenes = world.sample_scenes(HELDOUT, 16, start=100)
    captions = mc.generate_captions(model, processor, [s.image for s in scenes])
    named = [(w, s) for c, s in zip(captions, scenes, strict=True) for w in c.split() if w in world.COLOURS]
    assert len(named) >= 2 * len(scenes), captions
    assert sum(any(o.colour == w for o in s.objects) for w, s in named) >= 0.9 * len(named), captions
    shapes = [(w, s) for c, s in zip(captions, scenes, strict=True) for w in c.split() if w in world.SHAPES]
    assert sum(any(o.shape == w for o in s.objects) for w, s in shapes) >= 0.8 * len(shapes), captions
    assert all(c.startswith("a ") for c in captions), captions


def test_loupes_cross_attention_relevance_of_a_word_lands_on_the_object_it_names(adapter):
    hits = checked = 0
    for scene in world.sample_scenes(HELDOUT, 4, start=200):
        att = ta.attribute(adapter, scene.image, "describe the image", max_new_tokens=24)
        boxes = adapter.patch_boxes(scene.image.size)
        for t, tok in enumerate(att.generated_tokens):
            named = [o for o in scene.objects if tok in (o.colour, o.shape)]
            if len(named) != 1:
                continue
            x0, y0, x1, y1 = boxes[int(np.argmax(att.image["chefer"][t]))]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = named[0].box
            checked += 1
            hits += box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
    assert checked >= 16
    assert hits >= 0.8 * checked, (hits, checked)


def test_the_token_attribution_command_scores_and_validates_it(capsys):
    args = ["token_attribution", "--model", str(checkpoint_path(mc.NAME)), "--json", "--no-progress", "--limit", "2",
            "--perturbation", "none", "--validate-images", "1", "--stability-images", "0", "--examples", "0"]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_words"] > 0 and metrics["pointing"]["raw"] is None
    assert metrics["pointing"]["chefer"] >= 0.75
    # the cross-attended tile is no grid of image tokens in the sequence: deletion/insertion hide regions of
    # the stored image instead, and the method gets a verdict on this model from real curves
    (entry,) = metrics["validation"]["methods"]
    assert entry["method"] == "chefer" and entry["deletion_auc"]["n"] > 0 and entry["sanity"] is not None
    assert entry["deletion_minus_random"]["mean"] < 0 < entry["insertion_minus_random"]["mean"]


def test_its_supervision_reads_the_vision_tokens_as_loupe_maps_them(model_and_processor):
    import torch

    model, processor = model_and_processor
    adapter = mc._adapter(model, processor)
    scene = world.scene_at(HELDOUT, 0)
    adapter.preprocess([scene.image])
    token_boxes = adapter.vision_token_boxes(adapter.current_layout())
    is_cls = torch.zeros(len(token_boxes), dtype=torch.bool)
    is_cls[0] = True
    # a 40 px box at the top left of the 224 px scene holds the centres of patches (0,0), (0,1), (1,0), (1,1):
    # vision tokens 1, 2, 13 and 14 (token 0 is the tile's CLS, which stands for the whole tile)
    inside = mc.object_tokens((0, 0, 40, 40), token_boxes, is_cls)
    assert inside.nonzero().flatten().tolist() == [1, 2, 13, 14]
    assert mc.object_tokens((10, 10, 18, 18), token_boxes, is_cls).sum() == 1  # nearest token, never the CLS
    # the supervised positions predict the colour and shape words, after the chat-templated prompt
    prefix = mc.prompt_ids(processor.tokenizer, captioner.PROMPTS[0])
    assert processor.tokenizer.convert_ids_to_tokens(prefix)[:3] == ["<s>", "<|user|>", "<|image|>"]
    ids, labels, _, grounding = captioner._encode_batch(processor, [scene], [captioner.PROMPTS[0]], 0,
                                                        prefix_ids=lambda _p: prefix)
    words = [w for w in scene.caption.replace(",", " ").split() if w in world.COLOURS or w in world.SHAPES]
    assert len(grounding) == len(words)
    for (_, pos, _box, _size), word in zip(grounding, words, strict=True):
        assert labels[0, pos + 1] == processor.tokenizer.convert_tokens_to_ids(word)


def test_the_zoo_command_builds_it_after_tiny_clip(capsys):
    from workers.probes.zoo.__main__ import main as zoo_main

    assert zoo_main(["build", "--only", "no-such-model"]) == 2
    known = capsys.readouterr().err.split("known: ")[1].strip().split(", ")
    assert mc.NAME in known and known.index(mc.NAME) > known.index(mc.VISION_SOURCE)


def test_it_retrains_into_a_verified_checkpoint_that_loupe_loads(tmp_path):
    out = mc.train(tmp_path / "cap", mc.MllamaTrainSpec(train_scenes=8, steps=2, batch_size=4, eval_scenes=2,
                                                       distil_steps=1), log=lambda *_: None)
    verify_checksums(out)
    info = json.loads((out / "training.json").read_text())
    assert info["vision_source"]["name"] == mc.VISION_SOURCE and info["spec"]["steps"] == 2
    adapter = load_adapter(str(out))
    assert adapter.cross_attention_layers == mc.CROSS_ATTENTION_LAYERS
    assert adapter.grid == (captioner.GRID, captioner.GRID)

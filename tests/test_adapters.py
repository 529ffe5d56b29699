"""Model adapters: loading what a provider hands us, refusing what we can't trust or explain.

Actors: a provider's CLIP and SigLIP checkpoints saved with plain ``save_pretrained``; a provider
who uploads pickled weights, a text-only model, or a directory without a tokenizer.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import save_tiny_bert, save_tiny_clip, save_tiny_siglip
from workers.probes.adapters import load_adapter
from workers.probes.errors import ProbeInputError, UnsupportedModelError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="session")
def clip(clip_dir):
    return load_adapter(str(clip_dir))


@pytest.fixture(scope="session")
def siglip(siglip_dir):
    return load_adapter(str(siglip_dir))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red circle", "a blue square", "a photo of a cat"]


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_it_scores_like_the_hugging_face_forward(which, request):
    adapter = request.getfixturevalue(which)
    pv = adapter.preprocess(_images(3))
    assert pv.shape == (3, 3, adapter.image_size, adapter.image_size)
    ids, mask = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        reference = adapter.model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits_per_image
    torch.testing.assert_close(adapter.score_matrix(pv, PROMPTS), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.score(pv, PROMPTS), reference.diagonal(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_it_traces_attentions_and_hidden_states_with_gradients(which, request):
    adapter = request.getfixturevalue(which)
    pv = adapter.preprocess(_images(2))
    trace = adapter.trace(pv, PROMPTS[:2], text=True)
    # the hooks must not change what the model computes (SigLIP's pooling head is recomputed)
    torch.testing.assert_close(trace.score.detach(), adapter.score(pv, PROMPTS[:2]), rtol=1e-5, atol=1e-5)
    trace.score.sum().backward()
    t = adapter.num_prefix_tokens + adapter.grid[0] * adapter.grid[1]
    assert len(trace.attentions) == adapter.num_layers
    assert len(trace.hidden_states) == adapter.num_layers + 1
    for attn in trace.attentions:
        assert attn.shape == (2, adapter.num_heads, t, t)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, adapter.num_heads, t))
        assert attn.grad is not None and attn.grad.abs().sum() > 0
    assert trace.hidden_states[0].grad is not None
    assert all(a.grad is not None for a in trace.text_attentions)
    if which == "siglip":
        assert adapter.num_prefix_tokens == 0
        assert trace.pool_attention.shape == (2, adapter.num_heads, t)
        assert trace.pool_attention.grad is not None and trace.pool_attention.grad.abs().sum() > 0
    else:
        assert trace.pool_attention is None
    # no parameter gradients are computed: explanations never touch the weights
    assert all(p.grad is None for p in adapter.model.parameters())


def test_it_loads_a_siglip_without_transformers_false_alarm_about_its_token_ids(tmp_path, capfd):
    """An auditor reading the CLI's output must not be told a provider's config is broken when it
    is transformers' own default SigLIP text config that fails its check (transformers#47612)."""
    from transformers.utils import logging as hf_logging

    directory = save_tiny_siglip(tmp_path / "siglip")
    hf_logging.warning_once.cache_clear()  # an earlier load in this process must not hide it
    capfd.readouterr()
    adapter = load_adapter(str(directory))
    assert adapter.architecture == "siglip"
    assert "vocabulary" not in capfd.readouterr().err


def test_it_pairs_images_with_prompts_and_broadcasts_a_single_prompt(clip):
    pv = clip.preprocess(_images(3))
    torch.testing.assert_close(clip.score(pv, ["a cat"]), clip.score_matrix(pv, ["a cat"])[:, 0])
    with pytest.raises(ProbeInputError, match="3 images but 2 prompts"):
        clip.score(pv, PROMPTS[:2])
    with pytest.raises(ProbeInputError, match="pixel_values must be"):
        clip.score(torch.zeros(1, 3, 8, 8), ["a cat"])


def test_it_reads_hidden_states_of_chosen_layers(clip):
    pv = clip.preprocess(_images(2))
    feats = clip.vision_features(pv, [0, clip.num_layers])
    assert set(feats) == {0, clip.num_layers}
    assert feats[clip.num_layers].shape == (2, 1 + 16, 32)
    assert not feats[0].requires_grad


def test_it_refuses_a_directory_with_only_pickled_weights(clip_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(clip_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ProbeInputError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors only"):
        load_adapter(str(pickled))


def test_it_refuses_a_text_only_model_naming_the_missing_vision_tower(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*lacks a vision tower \(vision_config\)"):
        load_adapter(str(bert))


def test_it_refuses_a_model_without_a_tokenizer(tmp_path):
    d = save_tiny_clip(tmp_path / "notok", with_tokenizer=False)
    with pytest.raises(UnsupportedModelError, match="no usable tokenizer"):
        load_adapter(str(d))


def test_it_refuses_a_model_without_an_image_processor(tmp_path):
    d = save_tiny_clip(tmp_path / "noproc", with_processor=False)
    with pytest.raises(UnsupportedModelError, match=r"no image processor \(preprocessor_config.json\)"):
        load_adapter(str(d))


def test_it_refuses_weights_that_do_not_cover_the_model(clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(clip_dir, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProbeInputError, match="partly random"):
        load_adapter(str(partial))


def test_it_refuses_missing_paths_and_unpinned_hub_ids(tmp_path):
    with pytest.raises(ProbeInputError, match="not found"):
        load_adapter(str(tmp_path / "nope"))
    with pytest.raises(ProbeInputError, match="pinned revision"):
        load_adapter("openai/clip-vit-base-patch32", revision="main")
    with pytest.raises(ProbeInputError, match="no config.json"):
        load_adapter(str(tmp_path))
    # a pinned hub id that is not in the local cache: refused, nothing is downloaded
    with pytest.raises(ProbeInputError, match="cannot read the config of loupe-test/not-cached"):
        load_adapter("loupe-test/not-cached", revision="0" * 40)


def test_it_refuses_half_precision_on_cpu(clip_dir):
    with pytest.raises(ProbeInputError, match="float16 autocast needs a CUDA"):
        load_adapter(str(clip_dir), dtype="fp16")


def test_it_runs_bf16_autocast_on_cpu_close_to_float32(clip_dir, clip):
    bf16 = load_adapter(str(clip_dir), dtype="bf16")
    pv = clip.preprocess(_images(2))
    assert bf16.autocast_dtype is torch.bfloat16
    torch.testing.assert_close(bf16.score(pv, PROMPTS[:2]), clip.score(pv, PROMPTS[:2]), rtol=0.05, atol=0.1)


def test_it_maps_patch_cells_back_to_the_stored_image(clip, siglip):
    # CLIP: shortest edge to 32 px, centre crop 32 x 32: a 64 x 32 image shows only its middle half
    assert clip.input_window((64, 32)) == (16.0, 0.0, 48.0, 32.0)
    boxes = clip.patch_boxes((64, 32))
    assert boxes.shape == (16, 4)
    np.testing.assert_allclose(boxes[0], [16, 0, 24, 8])
    np.testing.assert_allclose(boxes[-1], [40, 24, 48, 32])
    # SigLIP: a plain resize to 32 x 32, the whole image is seen
    assert siglip.input_window((64, 32)) == (0.0, 0.0, 64.0, 32.0)
    np.testing.assert_allclose(siglip.patch_boxes((64, 32))[5], [16, 8, 32, 16])


def test_it_forgets_cached_text_embeddings_on_request(clip):
    before = clip.text_embeds(["a red circle"])
    with torch.no_grad():
        clip.model.text_projection.weight.mul_(-1)
    try:
        torch.testing.assert_close(clip.text_embeds(["a red circle"]), before)  # cached: stale on purpose
        clip.clear_caches()
        torch.testing.assert_close(clip.text_embeds(["a red circle"]), -before)
    finally:
        with torch.no_grad():
            clip.model.text_projection.weight.mul_(-1)
        clip.clear_caches()

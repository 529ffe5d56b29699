"""Memory planning (``workers.probes.memory``): what a model needs on a GPU, known before it is loaded.

Actors: the full-size configs providers submit most (LLaVA-1.5-7B, Qwen2.5-VL-7B, CLIP ViT-L/14 at
336 px), built on the meta device, never downloaded; a probe kind of this module that only records
the batch sizes it was given; a GPU whose free memory the test sets.
"""

from __future__ import annotations

import json

import pytest
from transformers import CLIPConfig, LlavaConfig, Qwen2_5_VLConfig

from workers.probes import kinds, memory, suite
from workers.probes.errors import OutOfDeviceMemory
from workers.probes.kinds import BatchSize, KindParams, ScoringBatchSize

GIB = 2 ** 30
KIND = "test.memory-planned"

pytestmark = pytest.mark.slow


def llava_1_5_7b() -> LlavaConfig:
    return LlavaConfig()  # transformers' defaults are llava-1.5-7b's layout: CLIP ViT-L/14-336 and Llama-2-7B


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        vocab_size=152064, tie_word_embeddings=False)


def clip_vit_l_14_336() -> CLIPConfig:
    return CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12),
                      vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=336, patch_size=14),
                      projection_dim=768)


@pytest.mark.parametrize(("config", "published"), [
    (llava_1_5_7b, 7_062_902_784),  # llava-hf/llava-1.5-7b-hf
    (qwen2_5_vl_7b, 8_292_166_656),  # Qwen/Qwen2.5-VL-7B-Instruct
    (clip_vit_l_14_336, 427_944_193),  # openai/clip-vit-large-patch14-336
])
def test_it_counts_full_size_models_exactly_without_allocating_them(config, published):
    fp = memory.footprint(config())
    assert fp.parameters == published
    assert fp.weight_bytes(4) == 4 * published


def test_it_runs_the_language_model_over_the_image_tokens_it_receives():
    llava, qwen, clip = (memory.footprint(c()) for c in (llava_1_5_7b, qwen2_5_vl_7b, clip_vit_l_14_336))
    assert [t.name for t in clip.towers] == ["vision"]  # the text embeddings are computed once, without gradients
    assert clip.towers[0].tokens == (336 // 14) ** 2 + 1
    assert llava.towers[1].tokens == 576 + memory.TEXT_TOKENS  # one token per patch of the 24 x 24 grid
    qwen_patches = qwen.towers[0].tokens - 1
    assert qwen.towers[1].tokens == qwen_patches // 4 + memory.TEXT_TOKENS  # Qwen merges 2 x 2 patches


def test_it_plans_the_largest_batch_that_fits_and_never_more_than_asked():
    fp = memory.footprint(llava_1_5_7b())
    requested = {"batch_size": 16, "score_batch_size": 64}
    backward = {"batch_size": True, "score_batch_size": False}
    on_80 = memory.plan(fp, requested, backward, free_bytes=80 * GIB, element_bytes=4)
    assert on_80.fits
    planned = on_80.batch_sizes["batch_size"]
    assert 1 <= planned < 16
    assert on_80.estimates_bytes["batch_size"] <= on_80.budget_bytes
    assert fp.peak_bytes(2 * planned, backward=True, element_bytes=4) > on_80.budget_bytes  # the largest that fits
    # a scoring pass keeps one layer's activations alive, not every layer's: larger batches fit
    assert on_80.batch_sizes["score_batch_size"] > planned
    roomy = memory.plan(fp, requested, backward, free_bytes=4096 * GIB, element_bytes=4)
    assert roomy.batch_sizes == requested


@pytest.fixture
def planned_kind(tmp_path, monkeypatch):
    """A kind recording the batch sizes it is run with, and a directory holding LLaVA-1.5-7B's config
    (no weights: planning reads the config alone)."""
    calls: list[dict] = []

    class Params(KindParams):
        batch_size: BatchSize = 16
        score_batch_size: ScoringBatchSize = 64

    def planned(model_dir, dataset_dir, params, *, device, progress):
        calls.append(params.model_dump())
        return suite.ProbeResult(kind=KIND, metrics={}, summary="ok")

    kinds.probe_kind(KIND, title=KIND, section=None, params=Params, help="a kind of this test module only")(planned)
    model = tmp_path / "llava-1.5-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llava_1_5_7b().to_dict()))
    yield calls, str(model)
    kinds.unregister(KIND)


def test_a_gpu_run_uses_batch_sizes_that_fit_and_says_so(planned_kind, monkeypatch):
    calls, model = planned_kind
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 40 * GIB)
    result = suite.run(KIND, model, None, device="cuda")
    plan = result.metrics["memory_plan"]
    assert calls == [plan["batch_sizes"]]
    assert plan["requested"] == {"batch_size": 16, "score_batch_size": 64}
    assert plan["batch_sizes"]["batch_size"] < 16 and plan["parameters"] == 7_062_902_784


def test_a_model_that_cannot_fit_is_refused_with_the_estimate_before_it_is_loaded(planned_kind, monkeypatch):
    calls, model = planned_kind
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 16 * GIB)
    with pytest.raises(OutOfDeviceMemory, match=r"weights alone take 26\.3 GiB .* 13\.6 GiB of the device's free"):
        suite.run(KIND, model, None, device="cuda")
    assert calls == []


def test_a_cpu_run_is_not_planned(planned_kind):
    calls, model = planned_kind
    result = suite.run(KIND, model, None, device="cpu")
    assert calls == [{"batch_size": 16, "score_batch_size": 64}] and "memory_plan" not in result.metrics

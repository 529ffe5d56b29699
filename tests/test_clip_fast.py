"""CLIP's fast paths (``workers.probes.adapters.clip_fast``): the same answers as the model's own
forward, checked on every model, and the model's own forward wherever they disagree.

Actors: a provider's random CLIP and SigLIP saved with ``save_pretrained``, loaded the way every
audit loads them (``load_adapter``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.tiny_models import save_tiny_clip, save_tiny_siglip
from workers.probes import registry
from workers.probes.adapters import load_adapter
from workers.probes.adapters.clip_fast import scoring_layer, traced_layer
from workers.probes.chefer import propagate_row, relevance, weighted_attention

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_adapter(str(save_tiny_clip(tmp_path_factory.mktemp("clip-fast"))))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return load_adapter(str(save_tiny_siglip(tmp_path_factory.mktemp("siglip-fast"))))


def test_a_loaded_clip_says_which_fast_paths_computed_its_evidence(tmp_path):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-describe")))
    assert adapter.describe()["fast_paths"] == {"cls_readout": "unchecked", "readout_trace": "unchecked"}
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    registry.get("chefer")(adapter, pv, ["a red circle", "a cat"])
    with torch.no_grad():
        adapter.image_embeds_for_scoring(pv)
    assert adapter.describe()["fast_paths"] == {"cls_readout": "in use", "readout_trace": "in use"}


def test_it_scores_with_the_last_layer_run_for_the_cls_token_only_and_gets_the_same_embedding(clip, siglip):
    pv = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(clip.image_embeds_for_scoring(pv), clip.image_embeds(pv), rtol=1e-4, atol=1e-5)
    assert clip.describe()["fast_paths"]["cls_readout"] == "in use"
    spv = torch.randn(2, 3, siglip.image_size, siglip.image_size)
    with torch.no_grad():  # SigLIP's pooling head reads every token: the model's own forward
        torch.testing.assert_close(siglip.image_embeds_for_scoring(spv), siglip.image_embeds(spv))
    assert "fast_paths" not in siglip.describe()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_its_lean_layers_equal_the_models_and_read_its_weights_afresh(act):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act=act)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(config).eval()
    hidden = torch.randn(3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(scoring_layer(layer, hidden), layer(hidden, None), rtol=1e-5, atol=1e-5)
        # chefer's traced variant: the same output, and the model's own attention probabilities
        out, probs = traced_layer(layer, hidden)
        torch.testing.assert_close(out, layer(hidden, None), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs, layer.self_attn(layer.layer_norm1(hidden), None)[1], rtol=1e-5, atol=1e-6)
        # the sanity check randomises weights in place; the randomised model must be what is scored
        for p in layer.parameters():
            p.normal_()
        torch.testing.assert_close(scoring_layer(layer, hidden), layer(hidden, None), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traced_layer(layer, hidden)[0], layer(hidden, None), rtol=1e-4, atol=1e-4)


def test_it_falls_back_to_the_models_own_forward_when_the_cls_readout_disagrees(tmp_path, monkeypatch):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-fallback")))
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    # e.g. a subclass whose last layer the hand-written path gets wrong
    monkeypatch.setattr(adapter, "_cls_readout_embeds", lambda x: torch.zeros(x.shape[0], 8))
    with torch.no_grad():
        torch.testing.assert_close(adapter.image_embeds_for_scoring(pv), adapter.image_embeds(pv))
        torch.testing.assert_close(adapter.image_embeds_for_scoring(pv), adapter.image_embeds(pv))
    assert adapter.describe()["fast_paths"]["cls_readout"] == "off"


def _chefer_through_the_full_trace(adapter, pv, prompts, start):
    # autograd on the model's own layers, not the lean trace
    trace = adapter.trace(pv, prompts, retain_grads=False)
    grads = torch.autograd.grad(trace.score.sum(), trace.attentions[start:])
    layers = [weighted_attention(a, g) for a, g in zip(trace.attentions[start:], grads, strict=True)]
    row = torch.zeros(pv.shape[0], layers[0].shape[-1])
    row[:, 0] = 1.0
    return propagate_row(row, layers)[:, 1:].reshape(pv.shape[0], *adapter.grid)


def test_it_explains_through_a_trace_whose_last_layer_runs_for_the_cls_token_only(tmp_path):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-readout")))
    pv = torch.randn(3, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(11))
    prompts = ["a red circle", "a cat", "a blue square"]

    def both():
        lean, full = adapter.readout_trace(pv, prompts), adapter.trace(pv, prompts, retain_grads=False)
        t = full.attentions[0].shape[-1]
        assert lean.attentions[-1].shape == (3, adapter.num_heads, 1, t)  # the CLS query's row alone
        torch.testing.assert_close(lean.score, full.score, rtol=1e-5, atol=1e-5)
        lean_grads = torch.autograd.grad(lean.score.sum(), lean.attentions)
        full_grads = torch.autograd.grad(full.score.sum(), full.attentions)
        for a, b, ga, gb in zip(lean.attentions, full.attentions, lean_grads, full_grads, strict=True):
            rows = a.shape[-2]
            torch.testing.assert_close(a, b[:, :, :rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ga, gb[:, :, :rows], rtol=1e-4, atol=1e-6)
            assert not gb[:, :, rows:].any()  # the rows left out never reach the score
        for start in range(adapter.num_layers):  # chefer's maps, whatever layer the rule starts at
            torch.testing.assert_close(relevance(adapter, pv, prompts, start_layer=start).image,
                                       _chefer_through_the_full_trace(adapter, pv, prompts, start),
                                       rtol=1e-4, atol=1e-6)

    both()
    assert adapter.describe()["fast_paths"]["readout_trace"] == "in use"
    with torch.no_grad():  # the sanity check randomises weights in place: the lean trace must see them
        for p in adapter.model.vision_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    both()


def test_it_keeps_its_fast_paths_under_bf16_autocast(tmp_path):
    # on a GPU audits run in bf16; the two paths then round differently at every operation, and a
    # float32 tolerance would turn the fast paths off for good without a word
    directory = save_tiny_clip(tmp_path / "clip-bf16")
    adapter, reference = load_adapter(str(directory), dtype="bf16"), load_adapter(str(directory))
    pv = torch.randn(4, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "a cat", "a blue square", "a dog"]
    maps = registry.get("chefer")(adapter, pv, prompts)
    with torch.no_grad():
        embeds = adapter.image_embeds_for_scoring(pv)
    assert adapter.readout_trace(pv, prompts).score.dtype == torch.float32
    assert adapter.describe()["fast_paths"] == {"cls_readout": "in use", "readout_trace": "in use"}
    # and still as close to float32 as the model's own bf16 forward is
    expected = registry.get("chefer")(reference, pv, prompts)
    assert (maps - expected).abs().max() <= 0.1 * expected.abs().max()
    with torch.no_grad():
        assert (embeds - reference.image_embeds(pv)).abs().max() < 0.05


def test_it_falls_back_to_the_full_trace_when_the_readout_trace_disagrees(tmp_path, monkeypatch, siglip):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-trace-fallback")))
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    expected = adapter.trace(pv, ["a red circle", "a cat"], retain_grads=False)
    lean = adapter._readout_trace

    def wrong_score(x, p):  # e.g. a subclass whose layers the hand-written path gets wrong
        trace = lean(x, p)
        return dataclasses.replace(trace, score=trace.score * 2)

    monkeypatch.setattr(adapter, "_readout_trace", wrong_score)
    trace = adapter.readout_trace(pv, ["a red circle", "a cat"])
    assert adapter.describe()["fast_paths"]["readout_trace"] == "off"
    torch.testing.assert_close(trace.score, expected.score)
    assert [a.shape for a in trace.attentions] == [a.shape for a in expected.attentions]  # every row again
    # SigLIP's pooling head reads every last-layer token: its readout trace is the full one
    spv = torch.randn(2, 3, siglip.image_size, siglip.image_size)
    trace = siglip.readout_trace(spv, ["a red circle", "a cat"])
    assert trace.pool_attention is not None and trace.attentions[-1].shape[-2] == trace.attentions[-1].shape[-1]


def test_an_out_of_memory_error_leaves_a_fast_path_unjudged(tmp_path, monkeypatch):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-oom")))
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(adapter, "_readout_trace", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # the caller lowers its batch size (suite.run) ...
        adapter.readout_trace(pv, ["a red circle", "a cat"])
    # ... and the fast path is tried again: running out of memory says nothing about whether it is right
    assert adapter.describe()["fast_paths"]["readout_trace"] == "unchecked"

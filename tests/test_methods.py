"""Grounding methods: do the maps point where the model actually looks, batched, deterministically?

Actors: a hand-built CLIP whose CLS token attends to coloured objects and whose score follows the
colour named in the prompt (``tiny_models.save_attending_clip``: we know the right answer); a
provider's random CLIP and SigLIP saved with ``save_pretrained`` (shapes, batching, references).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny_models import object_image, save_attending_clip, save_tiny_clip, save_tiny_siglip
from workers.probes import fused_attention, registry
from workers.probes.adapters import load_adapter
from workers.probes.chefer import propagate_row, relevance, weighted_attention
from workers.probes.errors import ProbeInputError
from workers.probes.flow import FlowTooLargeError, flow_inputs, flow_reference, max_flows
from workers.probes.occlusion import occlusion_pixels
from workers.probes.rollout import layer_matrices

pytestmark = pytest.mark.slow

METHODS = ["chefer", "gradcam", "rollout", "flow", "occlusion"]


@pytest.fixture(scope="session")
def attending(tmp_path_factory):
    return load_adapter(str(save_attending_clip(tmp_path_factory.mktemp("attending"))))


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    return load_adapter(str(save_tiny_clip(tmp_path_factory.mktemp("clip-m"))))


@pytest.fixture(scope="session")
def siglip(tmp_path_factory):
    return load_adapter(str(save_tiny_siglip(tmp_path_factory.mktemp("siglip-m"))))


# (red patch, blue patch, prompt, the patch the prompt refers to)
SCENES = [((1, 2), (3, 0), "a red circle", (1, 2)),
          ((1, 2), (3, 0), "a blue square", (3, 0)),
          ((0, 0), (2, 3), "the blue cross", (2, 3)),
          ((3, 3), (0, 1), "a photo of a red star", (3, 3))]


def _scenes():
    pv = torch.stack([object_image(red, blue) for red, blue, _, _ in SCENES])
    return pv, [prompt for _, _, prompt, _ in SCENES]


def test_it_registers_every_method_family():
    assert registry.available()[:5] == METHODS


@pytest.mark.parametrize("method", ["chefer", "gradcam", "occlusion"])
def test_it_points_at_the_object_the_prompt_names(attending, method):
    pv, prompts = _scenes()
    maps = registry.get(method)(attending, pv, prompts)
    for m, (red, blue, prompt, target) in zip(maps, SCENES, strict=True):
        assert np.unravel_index(int(m.argmax()), m.shape) == target, (prompt, m)
        other = blue if target == red else red
        assert m[target] > m[other]


@pytest.mark.parametrize("method", ["rollout", "flow"])
def test_it_attention_only_methods_point_at_the_objects_whatever_the_prompt(attending, method):
    pv, prompts = _scenes()
    maps = registry.get(method)(attending, pv, prompts)
    for m, (red, blue, _, _) in zip(maps, SCENES, strict=True):
        background = torch.ones_like(m, dtype=torch.bool)
        background[red] = background[blue] = False
        assert m[red] > m[background].max() and m[blue] > m[background].max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_it_returns_deterministic_float_maps_on_the_patch_grid(which, method, request):
    adapter = request.getfixturevalue(which)
    pv = torch.randn(3, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "a cat", "a blue square"]
    first = registry.get(method)(adapter, pv, prompts)
    again = registry.get(method)(adapter, pv, prompts)
    assert first.shape == (3, *adapter.grid) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["chefer", "gradcam", "occlusion"])
@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_it_gives_the_same_maps_batched_as_one_pair_at_a_time(which, method, request):
    adapter = request.getfixturevalue(which)
    pv = torch.randn(4, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "a cat", "a blue square", "a red circle"]
    fn = registry.get(method)
    batched = fn(adapter, pv, prompts)
    single = torch.cat([fn(adapter, pv[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_it_broadcasts_one_prompt_and_rejects_mismatched_pairs(clip):
    pv = torch.randn(2, 3, clip.image_size, clip.image_size)
    assert registry.get("chefer")(clip, pv, ["a cat"]).shape == (2, *clip.grid)
    with pytest.raises(ProbeInputError, match="2 images but 3 prompts"):
        registry.get("gradcam")(clip, pv, ["a", "b", "c"])


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_it_chefer_row_propagation_equals_the_literal_matrix_rule(which, request):
    adapter = request.getfixturevalue(which)
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(3))
    trace = adapter.trace(pv, ["a red circle", "a cat"])
    trace.score.sum().backward()
    bars = [weighted_attention(a, a.grad) for a in trace.attentions]
    t = bars[0].shape[-1]
    r = torch.eye(t).expand(2, t, t)
    for a in bars:  # R = R + A_bar @ R, layer by layer, as in the paper
        r = r + a @ r
    if trace.pool_attention is None:
        literal = r[:, 0]
    else:
        literal = torch.bmm(weighted_attention(trace.pool_attention, trace.pool_attention.grad).unsqueeze(1), r)[:, 0]
    row = torch.zeros(2, t)
    if trace.pool_attention is None:
        row[:, 0] = 1
    else:
        row = weighted_attention(trace.pool_attention, trace.pool_attention.grad)
    torch.testing.assert_close(propagate_row(row, bars), literal, rtol=1e-5, atol=1e-7)
    if trace.pool_attention is not None:
        # a pooling head's probe is a query over the encoder's tokens: Chefer's bi-modal rule
        # (eq. 10), R^pc = A_pool @ R_bar with R_bar = (R - I) / rowsum(R - I) + I (eq. 8-9), the
        # pooling step's attention being the readout row
        eye = torch.eye(t)
        r_bar = (r - eye) / (r - eye).sum(-1, keepdim=True) + eye
        literal = torch.bmm(trace.pool_attention.detach().mean(1).unsqueeze(1), r_bar)[:, 0]
    expected = literal[:, adapter.num_prefix_tokens:].reshape(2, *adapter.grid)
    torch.testing.assert_close(registry.get("chefer")(adapter, pv, ["a red circle", "a cat"]), expected,
                               rtol=1e-5, atol=1e-7)


def test_it_weighs_attention_into_a_constant_that_keeps_no_graph_alive():
    attn = torch.rand(2, 3, 5, 5, requires_grad=True)  # as recorded: part of the forward graph
    grad = torch.randn(2, 3, 5, 5)
    bar = weighted_attention(attn, grad)
    assert not bar.requires_grad and bar.grad_fn is None
    torch.testing.assert_close(bar, (grad * attn.detach()).clamp(min=0).mean(1))


def test_it_chefer_start_layer_skips_early_layers(attending):
    pv, prompts = _scenes()
    full = registry.get("chefer")(attending, pv, prompts)
    late = registry.get("chefer")(attending, pv, prompts, start_layer=1)
    assert not torch.allclose(full, late)
    with pytest.raises(ProbeInputError, match="out of range"):
        registry.get("chefer")(attending, pv, prompts, start_layer=5)


def test_it_chefer_text_relevance_singles_out_the_colour_word(attending):
    pv, prompts = _scenes()
    rel = relevance(attending, pv, prompts, text=True)
    torch.testing.assert_close(rel.image, registry.get("chefer")(attending, pv, prompts))
    for scores, tokens, prompt in zip(rel.text, rel.tokens, prompts, strict=True):
        words = {i: tok for i, tok in enumerate(tokens) if not tok.startswith("[")}
        best = max(words, key=lambda i: scores[i])
        assert words[best] in prompt.split() and words[best] in {"red", "blue"}, (tokens, scores)
        assert all(scores[i] == 0 for i, tok in enumerate(tokens) if tok == "[PAD]")


def test_it_gradcam_default_layer_has_patch_gradients_where_the_last_layer_has_none(clip):
    pv = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(4))
    # CLIP reads only the CLS token of the last layer: its patch tokens get exactly zero gradient
    assert registry.get("gradcam")(clip, pv, ["a cat"], layer=clip.num_layers).abs().sum() == 0
    assert registry.get("gradcam")(clip, pv, ["a cat"]).abs().sum() > 0


def test_it_rollout_normalises_rows_fuses_heads_and_discards(clip):
    pv = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(5))
    attentions, _ = clip.attentions(pv)
    for mats in (layer_matrices(attentions), layer_matrices(attentions, head_fusion="max", discard_ratio=0.5)):
        for a in mats:
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]))
    discarded = layer_matrices(attentions, discard_ratio=0.5)[0]
    off_diagonal = discarded[0] * (1 - torch.eye(discarded.shape[-1]))
    assert (off_diagonal[:, 1:] == 0).sum(-1).min() >= (discarded.shape[-1] - 1) // 2 - 1
    rollout = registry.get("rollout")
    maps = {f: rollout(clip, pv, ["a cat"], head_fusion=f) for f in ("mean", "max", "min")}
    assert not torch.allclose(maps["mean"], maps["max"]) and not torch.allclose(maps["mean"], maps["min"])
    with pytest.raises(ProbeInputError, match="head fusion"):
        rollout(clip, pv, ["a cat"], head_fusion="median")


@pytest.mark.parametrize("which", ["clip", "siglip", "attending"])
def test_it_flow_equals_the_networkx_reference(which, request):
    adapter = request.getfixturevalue(which)
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(6))
    if which == "attending":
        pv, _ = _scenes()
    sources = list(range(adapter.num_prefix_tokens, adapter.num_prefix_tokens + adapter.grid[0] * adapter.grid[1]))
    maps = registry.get("flow")(adapter, pv, ["a cat"])
    for m, (mats, pool) in zip(maps, flow_inputs(adapter, pv), strict=True):
        reference = flow_reference(mats, pool, sources)
        np.testing.assert_allclose(m.flatten().numpy(), reference, rtol=0, atol=1e-5)
        np.testing.assert_allclose(max_flows(mats, pool, sources), reference, rtol=0, atol=1e-6)


def test_it_flow_equals_the_reference_on_sharp_random_attention():
    rng = np.random.default_rng(0)
    for layers, tokens in ((2, 5), (3, 10), (4, 17)):
        logits = torch.from_numpy(rng.normal(size=(1, 3, tokens, tokens)) * 4)
        mats = torch.stack(layer_matrices([torch.softmax(logits * (k + 1), -1) for k in range(layers)]), 1)[0]
        np.testing.assert_allclose(max_flows(mats.numpy(), None, range(1, tokens)),
                                   flow_reference(mats.numpy(), None, range(1, tokens)), rtol=0, atol=1e-6)


def test_it_flow_certifies_each_value_to_the_rounding_its_cut_allows(monkeypatch):
    # coarse integer capacities make the bracket wide: a cut of many edges may lose up to 1/SCALE
    # on each (this tripped the old fixed 2e-7 check on a real 145-token ViT), but never more
    from workers.probes import flow

    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(1, 3, 12, 12)))
    mats = torch.stack(layer_matrices([torch.softmax(logits, -1) for _ in range(3)]), 1)[0].numpy()
    monkeypatch.setattr(flow, "SCALE", 2 ** 12)
    coarse = max_flows(mats, None, range(1, 12), tolerance=1e-2)
    np.testing.assert_allclose(coarse, flow_reference(mats, None, range(1, 12)), rtol=0, atol=12 * 3 * 12 / 2 ** 12)
    with pytest.raises(RuntimeError, match="wider than 2 x tolerance"):
        max_flows(mats, None, range(1, 12), tolerance=1e-9)


def test_it_flow_refuses_graphs_beyond_its_size_limit(clip):
    pv = torch.randn(1, 3, clip.image_size, clip.image_size)
    with pytest.raises(FlowTooLargeError, match="attention flow on 3 layers x 17 tokens"):
        registry.get("flow")(clip, pv, ["a cat"], max_work=1000)


def test_it_occlusion_matches_captum_at_the_same_window_and_stride(clip):
    from captum.attr import Occlusion

    pv = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(7))
    prompts = ["a red circle", "a cat"]
    ours = occlusion_pixels(clip, pv, prompts, window=12, stride=6, baseline=0.5, batch_size=7)
    theirs = Occlusion(lambda x: clip.score(x, prompts)).attribute(
        pv, sliding_window_shapes=(3, 12, 12), strides=(3, 6, 6), baselines=0.5)
    torch.testing.assert_close(ours, theirs.mean(1), rtol=1e-4, atol=1e-5)


def test_it_restores_eager_attention_after_fused_scoring_even_on_error(clip):
    # occlusion scores its copies with fused attention; the methods that read attention
    # probabilities must find eager attention again afterwards, whatever happened inside
    pv = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(3))
    eager = clip.score(pv, ["a cat", "a dog"])
    with clip.fused_attention():
        assert clip.model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(clip.score(pv, ["a cat", "a dog"]), eager, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), clip.fused_attention():
        raise RuntimeError("boom")
    assert clip.model.config._attn_implementation == "eager"
    assert relevance(clip, pv, ["a cat", "a dog"]).image.shape == (2, *clip.grid)


def test_it_scores_with_the_last_layer_run_for_the_cls_token_only_and_gets_the_same_embedding(clip, siglip):
    pv = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(clip.image_embeds_for_scoring(pv), clip.image_embeds(pv), rtol=1e-4, atol=1e-5)
    assert clip._cls_readout_ok is True  # the shortcut checked itself against the model's forward
    spv = torch.randn(2, 3, siglip.image_size, siglip.image_size)
    with torch.no_grad():  # SigLIP's pooling head reads every token: the plain forward
        torch.testing.assert_close(siglip.image_embeds_for_scoring(spv), siglip.image_embeds(spv))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_it_scores_through_a_lean_layer_that_equals_the_models_and_reads_its_weights_afresh(act):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from workers.probes.adapters.clip import CLIPAdapter

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act=act)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(config).eval()
    hidden = torch.randn(3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(CLIPAdapter._scoring_layer(layer, hidden), layer(hidden, None), rtol=1e-5, atol=1e-5)
        # chefer's traced variant: the same output, and the model's own attention probabilities
        out, probs = CLIPAdapter._traced_layer(layer, hidden)
        torch.testing.assert_close(out, layer(hidden, None), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs, layer.self_attn(layer.layer_norm1(hidden), None)[1], rtol=1e-5, atol=1e-6)
        # the sanity check randomises weights in place; occlusion on the randomised model must see them
        for p in layer.parameters():
            p.normal_()
        torch.testing.assert_close(CLIPAdapter._scoring_layer(layer, hidden), layer(hidden, None), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(CLIPAdapter._traced_layer(layer, hidden)[0], layer(hidden, None),
                                   rtol=1e-4, atol=1e-4)


def test_it_scores_occluded_copies_from_the_touched_patches_alone_and_gets_the_same_embeddings(clip, siglip):
    from workers.probes.adapters.base import occlude

    s = clip.image_size
    images = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(7))
    # boxes aligned with patches, straddling them, cut by the border, one pixel, and the whole image
    boxes = torch.tensor([[0, 8, 0, 8], [4, 12, 6, 14], [s - 3, s, s - 5, s], [9, 10, 17, 18], [0, s, 0, s],
                          [12, 20, 0, 4]])
    index = torch.tensor([0, 1, 0, 1, 0, 1])
    for adapter in (clip, siglip):
        px = torch.randn(2, 3, adapter.image_size, adapter.image_size) if adapter is siglip else images
        b = boxes.clamp(max=adapter.image_size)
        with torch.no_grad():
            expected = adapter.image_embeds(occlude(px, index, b, 0.5))
            torch.testing.assert_close(adapter.occluded_embeds_for_scoring(px, index, b, 0.5), expected,
                                       rtol=1e-4, atol=1e-5)
    assert clip._occlusion_shortcut_ok is True  # checked itself, and kept


def test_it_falls_back_to_the_models_own_forward_when_the_cls_shortcut_disagrees(tmp_path, monkeypatch):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-fallback")))
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    monkeypatch.setattr(adapter, "_cls_readout_embeds", lambda x: torch.zeros(x.shape[0], 8))
    with torch.no_grad():
        torch.testing.assert_close(adapter.image_embeds_for_scoring(pv), adapter.image_embeds(pv))
    assert adapter._cls_readout_ok is False


def _chefer_through_the_full_trace(adapter, pv, prompts, start):
    # autograd on the model's own layers: neither the lean trace nor the fused weighting
    trace = adapter.trace(pv, prompts, retain_grads=False)
    grads = torch.autograd.grad(trace.score.sum(), trace.attentions[start:])
    layers = [weighted_attention(a, g) for a, g in zip(trace.attentions[start:], grads, strict=True)]
    row = torch.zeros(pv.shape[0], layers[0].shape[-1])
    row[:, 0] = 1.0
    return propagate_row(row, layers)[:, 1:].reshape(pv.shape[0], *adapter.grid)


@pytest.fixture
def fuse_every_batch(monkeypatch):
    """One image per block: the tiny test models' batches take the fused path (``pays_off``)."""
    monkeypatch.setattr(fused_attention, "CPU_BLOCK_BYTES", 1)


def test_it_explains_through_a_trace_whose_last_layer_runs_for_the_cls_token_only(tmp_path, fuse_every_batch):
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
    assert adapter._readout_trace_ok is True  # checked itself against the model's forward, and kept
    assert adapter._fused_weighting_ok is True  # and the fused weighting against the lean trace
    with torch.no_grad():  # the sanity check randomises weights in place: the lean trace must see them
        for p in adapter.model.vision_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    both()


def test_it_keeps_its_shortcuts_under_bf16_autocast(tmp_path, fuse_every_batch):
    # on a GPU audits run in bf16; the two paths then round differently at every operation, and a
    # float32 tolerance would turn the shortcuts off for good without a word
    directory = save_tiny_clip(tmp_path / "clip-bf16")
    adapter, reference = load_adapter(str(directory), dtype="bf16"), load_adapter(str(directory))
    pv = torch.randn(4, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "a cat", "a blue square", "a dog"]
    maps = registry.get("chefer")(adapter, pv, prompts)
    with torch.no_grad():
        embeds = adapter.image_embeds_for_scoring(pv)
    assert adapter._fused_weighting_ok is True and adapter._cls_readout_ok is True
    assert adapter.readout_trace(pv, prompts).score.dtype == torch.float32 and adapter._readout_trace_ok is True
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
    adapter._readout_trace_ok = None  # as on a freshly loaded model
    trace = adapter.readout_trace(pv, ["a red circle", "a cat"])
    assert adapter._readout_trace_ok is False
    torch.testing.assert_close(trace.score, expected.score)
    assert [a.shape for a in trace.attentions] == [a.shape for a in expected.attentions]  # every row again
    # SigLIP's pooling head reads every last-layer token: its readout trace is the full one
    spv = torch.randn(2, 3, siglip.image_size, siglip.image_size)
    trace = siglip.readout_trace(spv, ["a red circle", "a cat"])
    assert trace.pool_attention is not None and trace.attentions[-1].shape[-2] == trace.attentions[-1].shape[-1]


def test_it_falls_back_to_autograd_when_the_fused_weighting_disagrees(tmp_path, monkeypatch, fuse_every_batch):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-fused-fallback")))
    pv = torch.randn(2, 3, adapter.image_size, adapter.image_size)
    prompts = ["a red circle", "a cat"]
    expected = registry.get("chefer")(adapter, pv, prompts)
    assert adapter._fused_weighting_ok is True
    fused = adapter._fused_weighted_attentions

    def wrong(*args):  # e.g. a subclass whose attention layout the fused path gets wrong
        weighted = fused(*args)
        return dataclasses.replace(weighted, layers=[layer.flip(-1) for layer in weighted.layers])

    monkeypatch.setattr(adapter, "_fused_weighted_attentions", wrong)
    adapter._fused_weighting_ok = None  # as on a freshly loaded model
    torch.testing.assert_close(registry.get("chefer")(adapter, pv, prompts), expected, rtol=1e-4, atol=1e-6)
    assert adapter._fused_weighting_ok is False


def test_it_fuses_only_batches_whose_attention_spans_more_than_one_cache_block(tmp_path, monkeypatch):
    adapter = load_adapter(str(save_tiny_clip(tmp_path / "clip-fuse-when")))
    t = adapter.num_prefix_tokens + adapter.grid[0] * adapter.grid[1]
    monkeypatch.setattr(fused_attention, "CPU_BLOCK_BYTES", 2 * adapter.num_heads * t * t * 4)  # 2 images a block
    calls = []
    fused = adapter._fused_weighted_attentions
    monkeypatch.setattr(adapter, "_fused_weighted_attentions", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    for batch in (1, 2, 3, 5):
        pv = torch.randn(batch, 3, adapter.image_size, adapter.image_size)
        registry.get("chefer")(adapter, pv, ["a red circle"] * batch)
    assert calls == [3, 5]  # one block's worth goes through autograd: it stays in cache there too
    assert not fused_attention.pays_off(64, adapter.num_heads, t, "cuda")  # not measured on a GPU
    monkeypatch.setattr(fused_attention, "FUSE", True)  # unless a benchmark asks for it
    assert fused_attention.pays_off(64, adapter.num_heads, t, "cuda") and fused_attention.pays_off(1, 4, t, "cpu")


def test_it_occlusion_rejects_windows_that_do_not_fit(clip):
    pv = torch.randn(1, 3, clip.image_size, clip.image_size)
    with pytest.raises(ProbeInputError, match="window must be"):
        registry.get("occlusion")(clip, pv, ["a cat"], window=64)
    with pytest.raises(ProbeInputError, match="stride must be"):
        registry.get("occlusion")(clip, pv, ["a cat"], window=8, stride=9)


def test_it_occludes_an_image_once_for_all_its_prompts(attending):
    pv, prompts = _scenes()
    # the same scene asked about both colours: one set of occluded copies, two maps
    pairs = pv[:1].expand(2, -1, -1, -1)
    calls = {"image_embeds": [], "occluded_embeds_for_scoring": []}

    def counting(name):
        original = getattr(attending, name)

        def count(*args):
            calls[name].append(args[1].shape[0] if len(args) > 1 else args[0].shape[0])  # copies, or images
            return original(*args)
        return count

    attending.occluded_embeds_for_scoring = counting("occluded_embeds_for_scoring")
    attending.image_embeds = counting("image_embeds")
    try:
        both = registry.get("occlusion")(attending, pairs, ["a red circle", "a blue square"])
    finally:
        del attending.image_embeds, attending.occluded_embeds_for_scoring
    windows = 7 * 7  # 32 px, window 8, stride 4
    assert sum(calls["occluded_embeds_for_scoring"]) == windows  # each window once for both prompts
    assert sum(calls["image_embeds"]) <= 2 + 2 + 2  # the two unoccluded pairs (+ the shortcuts' self-checks)
    separately = torch.cat([registry.get("occlusion")(attending, pv[:1], [p])
                            for p in ("a red circle", "a blue square")])
    torch.testing.assert_close(both, separately, rtol=1e-5, atol=1e-6)
    assert both[0][1, 2] > 0 and both[1][3, 0] > 0  # each prompt's own object

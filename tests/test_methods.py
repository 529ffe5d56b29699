"""Grounding methods: do the maps point where the model actually looks, batched, deterministically?

Actors: a hand-built CLIP whose CLS token attends to coloured objects and whose score follows the
colour named in the prompt (``tiny_models.save_attending_clip``: we know the right answer); a
provider's random CLIP and SigLIP saved with ``save_pretrained`` (shapes, batching, references).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import object_image, save_attending_clip, save_tiny_clip, save_tiny_siglip
from workers.probes import registry
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

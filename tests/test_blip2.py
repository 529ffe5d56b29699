"""BLIP-2 (``Blip2ForConditionalGeneration`` with an OPT decoder) behind the generative probes.

Actors: an auditor who hands Loupe a BLIP-2 directory and asks which patches produced each
generated word (library and CLI), and a provider who ships pickled weights.

The models are tiny and built from configs (no download): ``save_tiny_blip2`` (random weights)
and ``point_blip2_at_red`` (weights set by hand so that every Q-Former query reads one red patch).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.tiny_models import object_image, point_blip2_at_red, save_tiny_blip2  # noqa: E402
from workers.probes import chefer, interventions  # noqa: E402
from workers.probes import token_attribution as ta  # noqa: E402
from workers.probes.adapters import load_adapter  # noqa: E402
from workers.probes.adapters.blip2 import Blip2Adapter  # noqa: E402
from workers.probes.cli import main  # noqa: E402
from workers.probes.errors import ProbeInputError, UnsupportedModelError  # noqa: E402
from workers.probes.suite import load_model  # noqa: E402
from workers.probes.zoo import world  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "describe the image"
#: The attention methods BLIP-2 offers (chefer_bimodal is the patch-aligned families' projector rule).
BLIP2_ATTENTION = tuple(m for m in ta.ATTENTION_METHODS if m != "chefer_bimodal")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def adapter(blip2_dir):
    return load_adapter(str(blip2_dir))


@pytest.fixture(scope="module")
def pointing(tmp_path_factory):
    return load_adapter(str(save_tiny_blip2(tmp_path_factory.mktemp("blip2-red"), edit=point_blip2_at_red)))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    world.write_dataset(out, world.sample_scenes(1_000_003, 2))
    return out


def test_it_loads_through_the_architecture_table_and_generates(blip2_dir, adapter):
    assert isinstance(adapter, Blip2Adapter) and adapter.kind == "fusion" and not adapter.patch_aligned
    assert isinstance(load_model(str(blip2_dir)), Blip2Adapter)
    assert adapter.grid == (4, 4) and adapter.cross_layers == [0, 1]
    enc = adapter.encode(PROMPT)
    # as Blip2Processor builds it: the query tokens first, then BOS + prompt
    assert enc.input_ids[0, :4].tolist() == [adapter.image_token_id] * 4
    assert enc.image_positions.tolist() == [0, 1, 2, 3]
    assert adapter.encode("<image> " + PROMPT).input_ids.tolist() == enc.input_ids.tolist()
    image = world.scene_at(1_000_003, 0).image
    feats = adapter.image_features(adapter.preprocess([image]))
    assert feats.shape == (1, 4, 32)
    ids = adapter.caption([image], PROMPT, max_new_tokens=5)[0]
    assert 1 <= len(ids) <= 5 and adapter.image_token_id not in ids
    # the traced image path computes the same features as transformers' own get_image_features
    traced, attentions, _ = adapter.vision_trace(adapter.preprocess([image]))
    assert torch.allclose(traced, feats, atol=1e-6) and len(attentions) == 2 + 2 + 2


def test_it_attributes_tokens_to_patches_and_equals_the_naive_recomputation(adapter):
    image = world.scene_at(1_000_003, 1).image
    enc, feats = adapter.prepare([image], PROMPT)
    generated = adapter.generate(adapter.embed(enc.input_ids, feats), 6)[0]
    pv = adapter.preprocess([image])
    fast = ta.attribute_generated(adapter, enc, feats, generated, pixel_values=pv)
    loop = ta.attribute_generated(adapter, enc, feats, generated, batched=False, pixel_values=pv)
    naive = ta.naive_attribute_generated(adapter, enc, feats, generated)
    assert torch.allclose(fast["chefer"], naive, atol=1e-5)
    for key in ("chefer", "chefer_full", "chefer@patches", "raw@patches"):
        assert torch.allclose(fast[key], loop[key], atol=1e-6), key
    att = ta.to_attribution(adapter, enc, generated, fast, PROMPT)
    # the attention methods (no perturbation was asked for); BLIP-2 has no separate chefer_bimodal:
    # its chefer_full already is Chefer's bi-modal rule through the Q-Former
    assert set(att.image) == set(BLIP2_ATTENTION)
    for method, maps in att.image.items():
        assert maps.shape == (len(generated), 4, 4) and (maps >= 0).all(), method
    # raw: the decoder's attention on the query tokens, spread by cross-attention rows that sum to one
    # over CLS + patches, so it never exceeds the attention on the queries themselves
    on_queries = fast["raw"][:, enc.image_positions].sum(1)
    assert (att.image["raw"].reshape(len(generated), -1).sum(1) <= on_queries.numpy() + 1e-6).all()
    # patch maps need the traced image path: a clear error, not a wrong grid
    with pytest.raises(ProbeInputError, match="not grid cells"):
        ta.to_attribution(adapter, enc, generated, ta.attribute_generated(adapter, enc, feats, generated), PROMPT)


def test_it_decodes_as_transformers_and_attributes_from_the_generation_pass(adapter):
    # OPT takes its positions from the cache: Loupe's greedy loop must still pick transformers' tokens,
    # and the traced generation pass must give what attributing the finished caption gives.
    images = [world.scene_at(1_000_003, i).image for i in range(3)]
    enc, feats = adapter.prepare(images, PROMPT)
    embeds = adapter.embed(enc.input_ids.expand(len(images), -1), feats)
    theirs = adapter.causal_lm.generate(inputs_embeds=embeds,
                                        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                        do_sample=False, max_new_tokens=6, eos_token_id=adapter.eos_token_id,
                                        pad_token_id=adapter.tokenizer.pad_token_id,
                                        suppress_tokens=[adapter.image_token_id])
    for row, expected in zip(adapter.generate(embeds, 6), theirs.tolist(), strict=True):
        eos = adapter.eos_token_id
        assert row == (expected[:expected.index(eos)] if eos in expected else expected)
    pv = adapter.preprocess(images[:1])
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 6, pixel_values=pv)
    reference = ta.attribute_generated(adapter, enc, feats[:1], generated, pixel_values=pv)
    assert set(rows) == set(reference) and "chefer@patches" in rows
    for key, value in reference.items():
        assert torch.allclose(rows[key], value, atol=1e-6), key


@pytest.mark.parametrize("red", [(2, 1), (0, 3), (3, 0)])
def test_it_maps_query_relevance_to_the_patch_the_queries_read(pointing, red):
    pv = object_image(red, None)[None]
    enc = pointing.encode(PROMPT)
    feats = pointing.image_features(pv).detach()
    generated = pointing.generate(pointing.embed(enc.input_ids, feats), 4)[0]
    rows = ta.attribute_generated(pointing, enc, feats, generated, pixel_values=pv,
                                  perturbation=ta.PERTURBATION_METHODS)
    att = ta.to_attribution(pointing, enc, generated, rows, PROMPT)
    # the perturbation and gradient methods work on the vision tower's patch grid, not on the queries
    assert set(att.image) == {*BLIP2_ATTENTION, *ta.PERTURBATION_METHODS}
    cell = red[0] * 4 + red[1]
    for method, maps in att.image.items():
        maps = maps.reshape(len(generated), -1)
        assert (maps.sum(1) > 0).all(), method
        if method == "occlusion_2x2":
            # every window over the red patch hides it, so a neighbour whose windows all cover it ties
            assert (maps[:, cell] >= maps.max(1) * (1 - 1e-4)).all(), method
        else:
            assert [divmod(int(j), 4) for j in maps.argmax(1)] == [red] * len(generated), method
    mapping = pointing.image_token_patches(pv)[0]  # [n_q, G]
    assert [divmod(int(j), 4) for j in mapping.argmax(1)] == [red] * 4


def test_it_spreads_decoder_attention_over_the_patches_from_one_pass_through_the_image_path(adapter):
    from workers.probes.attention_stats import fusion_image_attention

    images = [world.scene_at(1_000_003, k).image for k in range(2)]
    passes = []
    hook = adapter.model.vision_model.register_forward_hook(lambda *_: passes.append(1))
    try:
        maps = fusion_image_attention(adapter, images, PROMPT, max_new_tokens=3)
    finally:
        hook.remove()
    # the LM-input features and the query -> patch mapping come out of the same traced pass
    assert len(passes) == 1
    assert maps.shape == (2, adapter.num_layers, adapter.num_heads, 16)
    assert abs(maps.sum(-1) - 1).max() < 1e-5
    features, mapping = adapter.image_features_and_patches(adapter.preprocess(images))
    assert torch.allclose(features, adapter.image_features(adapter.preprocess(images)), atol=1e-6)
    assert torch.equal(mapping, adapter.image_token_patches(adapter.preprocess(images)))


def test_it_follows_chefers_bimodal_rule():
    """``query_context_relevance`` against the equations written out by hand (two queries, three
    context tokens, one self-attention then one cross-attention layer)."""
    self_cam = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    cross_cam = torch.tensor([[[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]])
    context = torch.eye(3)[None] + torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    r_qq = torch.eye(2) + self_cam[0]  # eq. 6
    s = r_qq - torch.eye(2)
    r_qq_bar = s / s.sum(1, keepdim=True) + torch.eye(2)  # eq. 8-9
    c = context[0] - torch.eye(3)
    c_bar = c / c.sum(1, keepdim=True).clamp_min(1e-12) + torch.eye(3)
    expected = r_qq_bar.T @ cross_cam[0] @ c_bar  # eq. 10 (R^qc starts at zero)
    got = chefer.query_context_relevance([("self", self_cam), ("cross", cross_cam)], 2, 3, context)
    assert torch.allclose(got[0], expected)
    assert torch.allclose(chefer.query_context_relevance([("cross", cross_cam)], 2, 3)[0], cross_cam[0])


def test_it_ablates_decoder_vision_and_qformer_heads_and_refuses_a_projector_swap(adapter, scenes):
    from workers.probes.scenes import load_scenes

    loaded = load_scenes(str(scenes))
    metrics = interventions.head_ablation(adapter, loaded, max_new_tokens=3)
    assert {h["component"] for h in metrics["heads"]} == {"decoder", "vision", "qformer", "qformer-self"}
    assert len(metrics["heads"]) == 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2 and metrics["n_cases"] == 2
    # each Q-Former head hooks a module whose input holds that head's output: silencing one changes
    # what the Q-Former hands the decoder, and only while it is silenced
    pv = adapter.preprocess([world.scene_at(1_000_003, 0).image])
    clean = adapter.image_features(pv)
    for component in ("qformer", "qformer-self"):
        module = adapter.head_projections(component)[0]
        with interventions.ablated_head(module, 1, adapter.heads(component)):
            assert not torch.allclose(adapter.image_features(pv), clean, atol=1e-6), component
    assert torch.equal(adapter.image_features(pv), clean)
    with pytest.raises(UnsupportedModelError, match="learned queries"):
        interventions.feature_swap(adapter, loaded, site="projector", max_new_tokens=3)


def test_it_runs_the_commands_on_a_blip2_directory(blip2_dir, scenes, tmp_path, capsys):
    image = tmp_path / "scene.png"
    world.scene_at(1_000_003, 3).image.save(image)
    assert main(["attribute", "--model", str(blip2_dir), "--image", str(image), "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"chefer", "chefer_full", "raw"} <= set(out["tokens"][0])
    assert len(out["tokens"][0]["chefer"]["image_relevance"]) == 4
    assert out["graph"]["grid"] == [4, 4]
    assert main(["attention", "--model", str(blip2_dir), "--dataset", str(scenes), "--json",
                 "--max-new-tokens", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["layers"] == 2 and len(stats["heads_table"]) == 4
    assert main(["intervene", "--model", str(blip2_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "3", "--json"]) == 0
    ablation = json.loads(capsys.readouterr().out)
    assert "qformer" in {h["component"] for h in ablation["heads"]}
    code = main(["intervene", "--model", str(blip2_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--site", "projector", "--max-new-tokens", "3", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "patch-embedding" in err


def test_it_refuses_pickled_weights_and_a_partly_random_model(blip2_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in blip2_dir.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(blip2_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ProbeInputError, match="pickled"):
        load_adapter(str(pickled))
    image = tmp_path / "scene.png"
    world.scene_at(1_000_003, 0).image.save(image)
    assert main(["attribute", "--model", str(pickled), "--image", str(image), "--json"]) == 2
    err = capsys.readouterr().err
    assert "pickled" in err and "Traceback" not in err

    partial = tmp_path / "partial"
    partial.mkdir()
    for f in blip2_dir.iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    weights = load_file(blip2_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("qformer.encoder.layer.1.")},
              partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProbeInputError, match="partly random"):
        load_adapter(str(partial))


def test_it_refuses_an_encoder_decoder_blip2_and_a_misplaced_image_placeholder(adapter, tmp_path):
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        load_adapter(str(save_tiny_blip2(tmp_path / "t5", language_model="t5")))
    with pytest.raises(ProbeInputError, match="before the prompt"):
        adapter.encode("describe <image> the image")


def test_it_swaps_features_at_the_patch_embeddings_or_says_why_not(adapter, scenes):
    """The default feature-swap site is BLIP-2's vision patch embedding: replacing it changes what
    the Q-Former hands the decoder. The random model never names a colour, so the probe itself
    ends with its "no usable case" message rather than a made-up effect size."""
    from workers.probes.scenes import load_scenes

    loaded = load_scenes(str(scenes))
    pv = adapter.preprocess([loaded[0].load_image()])
    cells = interventions._patch_embeddings(adapter, pv)
    assert cells.shape == (16, 32)
    with torch.no_grad():
        clean = adapter.image_features(pv)
        handle = interventions._patch_module(adapter).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            swapped = adapter.image_features(pv)
        finally:
            handle.remove()
    assert not torch.allclose(clean, swapped)
    assert isinstance(interventions._swap_run(adapter, pv, torch.zeros_like(cells), "patch-embedding", PROMPT, 3), str)
    with pytest.raises(ProbeInputError, match="no usable feature-swap case"):
        interventions.feature_swap(adapter, loaded, max_new_tokens=3)


def test_it_runs_the_qformer_path_under_bf16_autocast(blip2_dir):
    import numpy as np

    bf16 = load_adapter(str(blip2_dir), dtype="bf16")
    image = world.sample_scenes(1_000_003, 1)[0].image
    enc, feats = bf16.prepare([image], PROMPT)
    assert feats.dtype == torch.bfloat16
    att = ta.attribute(bf16, image, PROMPT, max_new_tokens=4)
    assert set(att.image) == {*BLIP2_ATTENTION, *ta.PERTURBATION_METHODS}
    for method, maps in att.image.items():
        assert maps.shape == (len(att.generated_ids), *bf16.grid) and maps.dtype == np.float32, method
        assert np.isfinite(maps).all() and (maps >= 0).all(), method

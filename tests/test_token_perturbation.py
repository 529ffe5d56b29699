"""Per-word perturbation and gradient attribution of generated text, on the zoo captioner."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.zoo_fixtures import HELDOUT_SEED
from workers.probes import token_attribution as ta
from workers.probes import token_perturbation as tp
from workers.probes.zoo import captioner, checkpoint_path, world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case():
    adapter = ta.load_fusion(str(checkpoint_path(captioner.NAME)))
    scene = world.scene_at(HELDOUT_SEED, 3)
    enc, feats = adapter.prepare([scene.image], "describe the image")
    generated = adapter.generate(adapter.embed(enc.input_ids, feats), 12)[0]
    return adapter, scene, enc, adapter.preprocess([scene.image]), generated


def test_batched_occlusion_equals_hiding_one_patch_at_a_time(case):
    adapter, _, enc, px, generated = case
    rows = tp.occlusion_rows(adapter, enc, px, generated, batch_size=50)
    assert rows.shape == (len(generated), adapter.grid[0] * adapter.grid[1])
    ids, r, targets = tp.teacher_forced(enc, generated)
    clean = tp.word_log_probs(adapter, px, ids, r, targets, pruned=False)[0]
    p = adapter.patch_size
    for g in (0, 37, 100):
        top, left = (g // adapter.grid[1]) * p, (g % adapter.grid[1]) * p
        copy = px.clone()
        copy[..., top:top + p, left:left + p] = tp.BASELINE
        drop = clean - tp.word_log_probs(adapter, copy, ids, r, targets, pruned=False)[0]
        torch.testing.assert_close(rows[:, g], drop.cpu(), rtol=1e-3, atol=1e-4)


def test_pruned_scoring_equals_the_stock_forward_and_skips_unread_work(case):
    # The fast path must give the stock forward's scores while running neither the vision layer above
    # LLaVA's feature layer nor the decoder's last MLP at positions whose logits nobody reads.
    adapter, _, enc, px, generated = case
    ids, r, targets = tp.teacher_forced(enc, generated)
    copies = px + 0.3 * torch.randn(6, *px.shape[1:], generator=torch.Generator().manual_seed(0))
    last_vision = [m for n, m in adapter.model.named_modules() if n.endswith("encoder.layers")][0][-1]
    last_mlp = tp._decoder_layers(adapter)[-1].mlp
    seen: dict[str, list[int]] = {"vision": [], "mlp": []}
    hooks = [last_vision.register_forward_hook(lambda m, a, o: seen["vision"].append(a[0].shape[1])),
             last_mlp.register_forward_hook(lambda m, a, o: seen["mlp"].append(a[0].shape[1]))]
    try:
        stock = tp.word_log_probs(adapter, copies, ids, r, targets, batch_size=4, pruned=False)
        assert seen == {"vision": [145, 145], "mlp": [ids.shape[1]] * 2}
        seen["vision"].clear()
        seen["mlp"].clear()
        pruned = tp.word_log_probs(adapter, copies, ids, r, targets, batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"vision": [], "mlp": [len(generated)] * 2}
    torch.testing.assert_close(pruned, stock, rtol=1e-5, atol=1e-5)


def test_integrated_gradients_add_up_to_the_logit_change(case):
    # completeness (Sundararajan et al. 2017): the attributions sum to f(image) - f(baseline)
    adapter, _, enc, px, generated = case
    ig = tp.gradient_rows(adapter, enc, px, generated, steps=64)["integrated_gradients"]
    ids, r, targets = tp.teacher_forced(enc, generated)
    conv = tp.patch_projection(adapter)
    with torch.no_grad():
        e = conv(px)
        e0 = conv(torch.full_like(px, tp.BASELINE))
        full = tp._logits_with_embeddings(adapter, px, e, ids, r, targets)[0]
        empty = tp._logits_with_embeddings(adapter, px, e0, ids, r, targets)[0]
    torch.testing.assert_close(ig.sum(1), (full - empty).cpu(), rtol=0.05,
                               atol=0.05 * float((full - empty).abs().max()))


def test_object_words_point_at_their_objects_and_beat_a_random_deletion_order(case):
    adapter, scene, enc, px, generated = case
    rows = tp.perturbation_attribution(adapter, enc, px, generated)
    assert set(rows) == set(tp.METHODS)
    tokens = adapter.tokens(generated)
    boxes = adapter.patch_boxes(scene.image.size)
    words = [t for t, tok in enumerate(tokens) if any(tok in (o.colour, o.shape) for o in scene.objects)]
    assert words
    for t in words:
        obj = next(o for o in scene.objects if tokens[t] in (o.colour, o.shape))
        x0, y0, x1, y1 = boxes[int(rows["occlusion_2x2"][t].argmax())]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert obj.box[0] - 16 <= cx <= obj.box[2] + 16 and obj.box[1] - 16 <= cy <= obj.box[3] + 16, tokens[t]
    curves = tp.word_deletion_insertion(adapter, enc, px, generated, words, {"occlusion": rows["occlusion"]})
    mean = {k: {m: sum(v) / len(v) for m, v in modes.items()} for k, modes in curves.items()}
    assert mean["occlusion"]["deletion"] < mean["random"]["deletion"]
    assert mean["occlusion"]["insertion"] > mean["random"]["insertion"]

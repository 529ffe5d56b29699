"""Checks every generative family's test runs the same way: region relevance that adds up, the
``attribute`` command's contract, and attention / head ablation running while feature swap is
refused by name. Each family's test module calls them on its own tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workers.probes import token_attribution as ta
from workers.probes.cli import main

METHODS = ("chefer", "raw")


def assert_region_relevance_sums_to_image_relevance(adapter: Any, methods: tuple[str, ...] = METHODS) -> None:
    """Per generated token, the relevance over image regions adds up to its relevance on image tokens."""
    pv = adapter.preprocess([Image.new("RGB", (40, 24), (200, 40, 40))])
    enc = adapter.encode("describe the image")
    generated, rows = ta.generate_and_attribute(adapter, enc, None, 4, pixel_values=pv)
    att = ta.to_attribution(adapter, enc, generated, rows, "describe the image")
    assert set(att.image) == set(methods)
    for method in att.image:
        on_image = rows[method][:, enc.image_positions].clamp(min=0).sum(1).numpy()
        np.testing.assert_allclose(att.image[method].reshape(len(generated), -1).sum(1), on_image, rtol=1e-5)


def run_attribute_command(model_dir: Path, tmp_path: Path, capsys: Any, size: tuple[int, int],
                          methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """``attribute --json`` on a plain image of ``size``: tokens, no ``chefer_full``, every method's
    argmax box inside the image. Returns the printed JSON for the family's own checks."""
    image = tmp_path / "img.png"
    Image.new("RGB", size, (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(model_dir), "--image", str(image), "--json",
                 "--max-new-tokens", "3"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["tokens"]
    for tok in out["tokens"]:
        assert "chefer_full" not in tok
        for method in methods:
            x0, y0, x1, y1 = tok[method]["argmax_box"]
            assert 0 <= x0 < x1 <= size[0] + 1e-6 and 0 <= y0 < y1 <= size[1] + 1e-6
    return out


def assert_attention_and_head_ablation_run_and_feature_swap_is_refused(model_dir: Path, scenes: Path, capsys: Any,
                                                                      refusal: str) -> None:
    """Attention statistics over 2 layers, head ablation over decoder and vision heads (8), and
    feature swap refused with ``refusal`` in the message, no traceback."""
    assert main(["attention", "--model", str(model_dir), "--dataset", str(scenes), "--json",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2
    assert main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "head-ablation",
                 "--max-new-tokens", "2", "--json"]) == 0
    ablation = json.loads(capsys.readouterr().out)
    assert {h["component"] for h in ablation["heads"]} == {"decoder", "vision"} and len(ablation["heads"]) == 8
    code = main(["intervene", "--model", str(model_dir), "--dataset", str(scenes), "--kind", "feature-swap",
                 "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and refusal in err

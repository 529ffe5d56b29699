"""Checkpoints as people download them: weights in bf16, sharded safetensors with an index file, and a
``pytorch_model.bin`` beside them (a Hugging Face snapshot often holds both). Loupe loads the
safetensors (in float32, the precision relevance is accumulated in), never opens the pickle and reports
it as ignored, and the probes run end to end.

Tiny random-weight models of two families with different loading paths (InternVL: image-only processor;
Llama 3.2 Vision: its own ``MllamaProcessor``), built with transformers' own classes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.tiny_vlms import save_tiny_internvl, save_tiny_mllama
from workers.probes.adapters import load_adapter
from workers.probes.cli import main

pytestmark = pytest.mark.slow

FAMILIES = {"internvl": save_tiny_internvl, "mllama": save_tiny_mllama}


class _Trap:
    """Unpickling this writes a file: proof that the pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _as_downloaded(source: Path, directory: Path, marker: Path) -> Path:
    """``source``'s model re-saved in bf16 as several safetensors shards with an index, plus a pickle."""
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(source)
    model_cls = getattr(tf, cfg.architectures[0])
    model = model_cls.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="40KB")
    for name in source.iterdir():  # processor, tokenizer, templates: as the provider wrote them
        if name.suffix != ".safetensors" and not (directory / name.name).exists():
            (directory / name.name).write_bytes(name.read_bytes())
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def snapshot(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    source = FAMILIES[request.param](root / "source")
    marker = root / "unpickled.txt"
    return _as_downloaded(source, root / "snapshot", marker), marker


def test_the_snapshot_has_the_shapes_people_download(snapshot):
    directory, _ = snapshot
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and not (directory / "model.safetensors").exists()
    assert {shards_name for shards_name in index["weight_map"].values()} == {s.name for s in shards}
    with safe_open(str(shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_it_loads_the_sharded_bf16_safetensors_in_float32_and_ignores_the_pickle(snapshot):
    directory, marker = snapshot
    adapter = load_adapter(str(directory))
    assert not marker.exists(), "the pickle was opened"
    assert adapter.ignored_weights == ("pytorch_model.bin",)
    import transformers as tf

    model_cls = getattr(tf, adapter.hf_class)
    as_stored = dict(model_cls.from_pretrained(directory, dtype=torch.bfloat16).named_parameters())
    loaded = dict(adapter.model.named_parameters())
    assert loaded.keys() == as_stored.keys()
    for name, param in loaded.items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param.detach(), as_stored[name].detach().float()), name


def test_attribute_runs_on_the_snapshot_and_reports_the_ignored_pickle(snapshot, tmp_path, capsys):
    directory, marker = snapshot
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 24), (10, 200, 30)).save(image)
    assert main(["attribute", "--model", str(directory), "--image", str(image), "--json",
                 "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ignored_weights"] == ["pytorch_model.bin"] and not marker.exists()
    assert out["tokens"] and all(0 <= tok["chefer"]["image_share"] <= 1 for tok in out["tokens"])

"""Loupe's TCAV vs captum's ``captum.concept.TCAV`` on the same model, layers, concept and random runs.

    python -m benchmarks.tcav [--model DIR] [--runs 20] [--repeats 3] [--layers 2,4] [--device cpu]

Both start from the same PIL images and end with one TCAV score per random run and a p-value per
layer (captum has no significance test of its own: we add the usual scipy t-test, as its tutorial
does). Same CLS-token activations: captum hooks an identity "tap" module that the wrapper puts on
the CLS token after each chosen encoder layer, so both read the very same tensor and gradient.
Same sets: captum gets the concept folder and ``runs + 1`` random sets drawn from ``random/`` the
way Loupe draws them. Differences that remain: captum fits sklearn's SGDClassifier (Loupe a
ridge logistic regression), and Loupe additionally fits ``null_concepts x runs`` random-vs-random
CAVs for its folder-level null (``--null-concepts``; captum fits ``runs``).

Each side runs in its own child process (so peak memory is its own): wall time is the median of
``--repeats`` runs after the model is loaded, peak memory the child's maximum resident set size
growth (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(model_dir: str, device: str):
    from workers.probes import tcav
    from workers.probes.adapters import load_adapter
    from workers.probes.zoo import shortcut as zoo_shortcut

    data = zoo_shortcut.probe_data()
    adapter = load_adapter(model_dir, device=device)
    inputs = tcav.load_images(tcav.list_images(data / "inputs"))
    concept = tcav.load_images(tcav.list_images(data / "concepts" / "watermark"))
    random_images = tcav.load_images(tcav.list_images(data / "concepts" / "random"))
    return adapter, inputs, concept, random_images


def run_ours(model_dir: str, layers: list[int], runs: int, null_concepts: int, device: str) -> dict:
    from workers.probes import tcav
    from workers.probes.zoo import shortcut as zoo_shortcut

    adapter, inputs, concept, random_images = _load(model_dir, device)
    base = _rss_mb()
    times, report = [], None
    for seed in range(ARGS.repeats):
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = tcav.run_tcav(adapter, zoo_shortcut.TARGET, inputs, {"watermark": concept}, random_images,
                               layers=layers, runs=runs, null_concepts=null_concepts, seed=seed)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_mb": _peak(device, base),
            "scores": {r.layer: r.tcav_score for r in report.results},
            "p_values": {r.layer: r.p_value for r in report.results},
            "cavs_fitted_per_layer": runs * (1 + null_concepts)}


def run_captum(model_dir: str, layers: list[int], runs: int, device: str) -> dict:
    import torch
    from captum.concept import TCAV, Concept
    from scipy import stats

    from workers.probes import tcav
    from workers.probes.zoo import shortcut as zoo_shortcut

    adapter, inputs, concept, random_images = _load(model_dir, device)
    model = adapter.model
    text = adapter.text_embeds([zoo_shortcut.TARGET]).detach()

    class Tapped(torch.nn.Module):
        """pixel_values -> [B, 1] similarity with the target; ``tap_<l>`` carries layer l's CLS."""

        def __init__(self) -> None:
            super().__init__()
            self.taps = torch.nn.ModuleDict({f"tap_{layer}": torch.nn.Identity() for layer in layers})
            for layer in layers:
                model.vision_model.encoder.layers[layer - 1].register_forward_hook(self._hook(layer))

        def _hook(self, layer: int):
            def fn(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                cls = self.taps[f"tap_{layer}"](hidden[:, :1])
                hidden = torch.cat([cls, hidden[:, 1:]], dim=1)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return fn

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = model.get_image_features(pixel_values=pixel_values)
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            feats = torch.nn.functional.normalize(feats, dim=-1)
            return feats @ text.T * model.logit_scale.exp()

    wrapped = Tapped().eval()

    class Images(torch.utils.data.Dataset):
        def __init__(self, pixels: torch.Tensor) -> None:
            self.pixels = pixels

        def __len__(self) -> int:
            return len(self.pixels)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.pixels[i]

    base = _rss_mb()
    times, scores, p_values = [], {}, {}
    for seed in range(ARGS.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        k = min(len(concept), len(random_images) // 2, tcav.MAX_SET_SIZE)
        g = torch.Generator().manual_seed(seed)

        def loader(images):
            return torch.utils.data.DataLoader(Images(adapter.preprocess(images)), batch_size=64)

        concept_c = Concept(0, "watermark", loader(concept[:k]))
        randoms = []
        for i in range(runs + 1):
            idx = torch.randperm(len(random_images), generator=g)[:k].tolist()
            randoms.append(Concept(i + 1, f"random{i}", loader([random_images[j] for j in idx])))
        experimental = [[concept_c, r] for r in randoms[1:]] + [[randoms[0], r] for r in randoms[1:]]
        with tempfile.TemporaryDirectory() as save:
            engine = TCAV(wrapped, [f"taps.tap_{layer}" for layer in layers], save_path=save + "/")
            result = engine.interpret(adapter.preprocess(inputs), experimental, target=0)
        for layer in layers:
            key = f"taps.tap_{layer}"
            concept_scores = [float(result[f"0-{r.id}"][key]["sign_count"][0]) for r in randoms[1:]]
            random_scores = [float(result[f"{randoms[0].id}-{r.id}"][key]["sign_count"][0]) for r in randoms[1:]]
            scores[layer] = sum(concept_scores) / len(concept_scores)
            p_values[layer] = float(stats.ttest_ind(concept_scores, random_scores).pvalue)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_mb": _peak(device, base), "scores": scores, "p_values": p_values,
            "cavs_fitted_per_layer": 2 * runs}


def _peak(device: str, base: float) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mb() - base


def main(argv: list[str] | None = None) -> int:
    global ARGS
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shortcut zoo's shortcut-clip)")
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--null-concepts", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", choices=["ours", "captum"], default=None, help=argparse.SUPPRESS)
    ARGS = parser.parse_args(argv)
    if ARGS.model is None:
        from workers.probes.zoo import shortcut as zoo_shortcut

        ARGS.model = str(zoo_shortcut.model_path(zoo_shortcut.SHORTCUT_MODEL))
    layers = [int(v) for v in ARGS.layers.split(",")]
    if ARGS.only == "ours":
        print(json.dumps(run_ours(ARGS.model, layers, ARGS.runs, ARGS.null_concepts, ARGS.device)))
        return 0
    if ARGS.only == "captum":
        print(json.dumps(run_captum(ARGS.model, layers, ARGS.runs, ARGS.device)))
        return 0
    results = {}
    for side in ("ours", "captum"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.tcav", "--only", side, *argv],
                             capture_output=True, text=True, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["captum"]
    summary = {
        "model": ARGS.model, "device": ARGS.device, "layers": layers, "random_runs": ARGS.runs,
        "repeats": ARGS.repeats,
        "median_seconds": {"loupe": statistics.median(ours["seconds"]), "captum": statistics.median(theirs["seconds"])},
        "speedup": statistics.median(theirs["seconds"]) / statistics.median(ours["seconds"]),
        "peak_mb": {"loupe": ours["peak_mb"], "captum": theirs["peak_mb"]},
        "cavs_fitted_per_layer": {"loupe": ours["cavs_fitted_per_layer"], "captum": theirs["cavs_fitted_per_layer"]},
        "mean_tcav_score": {"loupe": ours["scores"], "captum": theirs["scores"]},
        "max_abs_score_difference": max(abs(ours["scores"][str(layer)] - theirs["scores"][str(layer)])
                                        for layer in layers),
        "p_value": {"loupe (folder-level, derivative)": ours["p_values"], "captum + scipy t-test": theirs["p_values"]},
    }
    print(json.dumps(summary, indent=2))
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())

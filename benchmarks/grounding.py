"""Grounding methods against their peers, measured in the same run (CPU).

- ``chefer``: one batched call (one forward, one backward for ``--batch`` pairs) vs a per-image
  loop of the same code (target >= 5x images/s at batch 32), with the ceiling this machine puts
  on that ratio (``chefer_ceiling``: the loop's time per image over the time the matrix products
  of one image take at the CPU's dense matmul rate);
- ``gradcam``: ours vs pytorch-grad-cam's ``GradCAM`` on the same model, layer and batch
  (target >= 1.0x). pytorch-grad-cam needs torchvision, which does not import beside the main
  venv's torch: run this benchmark from the benchmark venv (``benchmarks/README.md``); elsewhere
  the comparison is reported as skipped;
- ``occlusion``: ours vs captum's ``Occlusion`` at the same window, stride and baseline, captum
  at its default ``perturbations_per_eval=1`` and batched, each with eager and with fused
  attention (target >= 2x against the fastest of the four); once with one prompt per image and
  once with each image asked about 4 prompts;
- ``flow``: certified exact max-flow (scipy) vs the networkx reference (target >= 50x).

Implementations are timed interleaved (a, b, a, b, ...) so that load from other processes
hits them alike, and every pair is also checked to agree on the result. Times are medians over
``--repeats``; ``peak_mib`` is the largest peak resident-memory increase of one call. The model is
the zoo's ``tiny-clip`` when its checkpoint is present, else a random CLIP of the same size.
Prints a table and one JSON object (``--json`` also writes it to a file)::

    python -m benchmarks grounding [--batch 32] [--repeats 5] [--threads 1] [--only chefer,flow]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks._models import compare, count_flops, dense_matmul_rate, random_clip
from benchmarks._runtime import add_allocator_option, apply_allocator
from workers.probes.chefer import relevance
from workers.probes.flow import flow_inputs, flow_reference, max_flows
from workers.probes.gradcam import gradcam
from workers.probes.occlusion import occlusion_pixels

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple cross"]
SECTIONS = ("chefer", "gradcam", "occlusion", "flow")


def load_model(path: str | None):
    from workers.probes.adapters import load_adapter

    if path:
        return load_adapter(path), path
    try:
        from workers.probes.zoo import checkpoint_path

        zoo = checkpoint_path("tiny-clip")
        return load_adapter(str(zoo)), "zoo tiny-clip"
    except Exception:  # noqa: BLE001 - no zoo checkpoint yet: same size, random weights
        spec = dict(image_size=112, patch_size=16, hidden=64, layers=4, heads=4, text_hidden=64, text_layers=2,
                    text_heads=4, projection=64)
        return (random_clip(**spec),
                "random CLIP (112 px, 16 px patches, 4 layers, width 64: the first tiny-clip's size)")


def with_rate(entry: dict, n: int) -> dict:
    return {**entry, "images_per_s": n / entry["median_s"]}


def bench_chefer(adapter, pv, prompts, repeats):
    n = len(prompts)
    keep: dict = {}
    t = compare({"batched": lambda: relevance(adapter, pv, prompts),
                 "loop": lambda: [relevance(adapter, pv[i:i + 1], prompts[i:i + 1]) for i in range(n)]},
                repeats, keep=keep)
    diff = (keep["batched"].image - torch.cat([r.image for r in keep["loop"]])).abs().max()
    return {"batch": n, "loupe_batched": with_rate(t["batched"], n), "per_image_loop": with_rate(t["loop"], n),
            "speedup": t["loop"]["median_s"] / t["batched"]["median_s"], "target": 5.0, "max_abs_diff": float(diff),
            "ceiling": chefer_ceiling(count_flops(lambda: relevance(adapter, pv, prompts)) / n, dense_matmul_rate(),
                                      t["batched"]["median_s"] / n, t["loop"]["median_s"] / n)}


def chefer_ceiling(flops_per_image: float, matmul_rate: float, batched_s: float, loop_s: float) -> dict:
    """How far batching *could* take the ratio on this machine, from measured quantities.

    Batching removes per-call overhead; it cannot remove the arithmetic of each image's forward and
    backward pass. If the batched call did nothing but its matrix products, at the rate this
    machine multiplies large dense matrices, it would take ``flops_per_image / matmul_rate`` per
    image; with the loop as measured, the ratio could be at most ``loop_s`` over that. (Only matrix
    products are counted, so the true bound is lower still.)"""
    floor_s = flops_per_image / matmul_rate
    return {"matmul_mflop_per_image": flops_per_image / 1e6, "dense_matmul_gflops": matmul_rate / 1e9,
            "batched_gflops": flops_per_image / batched_s / 1e9,
            "batched_share_of_dense_rate": floor_s / batched_s,
            "loop_ms_per_image": loop_s * 1e3, "floor_ms_per_image": floor_s * 1e3,
            "max_speedup": loop_s / floor_s}


def bench_gradcam(adapter, pv, prompts, repeats):
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import scale_cam_image
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing to import
        return {"skipped": f"pytorch-grad-cam not importable here ({type(exc).__name__}: {exc}); "
                           "run from the benchmark venv, see benchmarks/README.md"}
    gh, gw = adapter.grid
    layer = adapter.num_layers - 1  # ours: the residual stream entering the last layer ...

    class PairScores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = adapter.model

        def forward(self, x):
            return adapter.score(x, prompts)

    def to_grid(t):
        return t[:, adapter.num_prefix_tokens:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)

    wrapper = PairScores()
    # ... which is the output of layer L-2: the same activations for both implementations
    target_layer = adapter.model.vision_model.encoder.layers[layer - 1]
    targets = [lambda out: out] * len(prompts)

    def theirs():
        adapter.model.requires_grad_(True)  # how a user hands a model to pytorch-grad-cam
        try:
            with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=to_grid) as cam:
                return cam(input_tensor=pv, targets=targets)
        finally:
            adapter.model.requires_grad_(False)
            adapter.model.zero_grad(set_to_none=True)

    keep: dict = {}
    t = compare({"ours": lambda: gradcam(adapter, pv, prompts, layer=layer), "theirs": theirs}, repeats, keep=keep)
    # theirs comes min-max scaled, resized to the input and scaled again (their per-layer and
    # aggregation steps): put ours through the same two calls of their own function
    ours_scaled = scale_cam_image(scale_cam_image(keep["ours"].numpy(), target_size=(pv.shape[-1], pv.shape[-2])))
    n = len(prompts)
    return {"batch": n, "layer": f"hidden_states[{layer}] (output of layer {layer - 1})",
            "loupe": with_rate(t["ours"], n), "pytorch_grad_cam": with_rate(t["theirs"], n),
            "speedup": t["theirs"]["median_s"] / t["ours"]["median_s"], "target": 1.0,
            "max_abs_diff_after_their_scaling": float(np.abs(ours_scaled - keep["theirs"]).max())}


def bench_occlusion(adapter, pv, prompts, repeats, window, stride):
    """Explanations of ``len(prompts)`` image-prompt pairs (``pv`` holds each pair's image).

    Ours runs its occluded copies with fused attention (``adapter.fused_attention``); so that the
    ratio measures the method and not the kernel, captum is timed both on the model as loaded
    (eager attention, what the explanation methods need) and with the same fused attention, and
    ``speedup_vs_best_captum`` is against the fastest of its four configurations."""
    from contextlib import nullcontext

    from captum.attr import Occlusion

    n = pv.shape[0]

    def captum(ppe, fused=False):
        def forward(x):
            return adapter.score(x, prompts * (x.shape[0] // n))
        with adapter.fused_attention() if fused else nullcontext():
            return Occlusion(forward).attribute(pv, sliding_window_shapes=(3, window, window),
                                                strides=(3, stride, stride), baselines=0.0, perturbations_per_eval=ppe)

    keep: dict = {}
    t = compare({"ours": lambda: occlusion_pixels(adapter, pv, prompts, window=window, stride=stride),
                 "captum_default": lambda: captum(1), "captum_batched": lambda: captum(64),
                 "captum_default_fused": lambda: captum(1, True), "captum_batched_fused": lambda: captum(64, True)},
                repeats, keep=keep)
    diff = max(float((keep["ours"] - keep[k].mean(1)).abs().max()) for k in ("captum_batched", "captum_batched_fused"))
    peers = ("captum_default", "captum_batched", "captum_default_fused", "captum_batched_fused")
    best = min(peers, key=lambda k: t[k]["median_s"])
    return {"pairs": n, "distinct_images": int(torch.unique(pv.flatten(1), dim=0).shape[0]), "window": window,
            "stride": stride, "loupe": with_rate(t["ours"], n),
            **{k: {**with_rate(t[k], n), "perturbations_per_eval": 1 if "default" in k else 64,
                   "attention": "fused (sdpa)" if k.endswith("fused") else "eager"} for k in peers},
            "speedup_vs_captum_default": t["captum_default"]["median_s"] / t["ours"]["median_s"],
            "best_captum": best, "speedup_vs_best_captum": t[best]["median_s"] / t["ours"]["median_s"],
            "target": 2.0, "max_abs_diff": diff}


def bench_flow(adapter, pv, repeats):
    mats, pool = flow_inputs(adapter, pv[:1])[0]
    sources = list(range(adapter.num_prefix_tokens, mats.shape[-1]))
    keep: dict = {}
    # the reference takes tens of seconds per image: at most 3 repeats, no warm-up
    t = compare({"ours": lambda: max_flows(mats, pool, sources),
                 "networkx": lambda: flow_reference(mats, pool, sources)},
                max(1, min(3, repeats)), warmup=0, keep=keep)
    return {"layers": int(mats.shape[0]), "tokens": int(mats.shape[-1]), "flows_per_image": len(sources),
            "loupe_scipy": with_rate(t["ours"], 1), "networkx_reference": with_rate(t["networkx"], 1),
            "speedup": t["networkx"]["median_s"] / t["ours"]["median_s"], "target": 50.0,
            "max_abs_diff": float(np.abs(keep["ours"] - keep["networkx"]).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks grounding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: zoo tiny-clip or same-size random)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch for chefer and gradcam")
    parser.add_argument("--occlusion-images", type=int, default=4)
    parser.add_argument("--window", type=int, default=None, help="occlusion window (default: patch size)")
    parser.add_argument("--stride", type=int, default=None, help="occlusion stride (default: window / 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--json", default=None, help="also write the JSON result to this file")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    allocator = apply_allocator(args.allocator)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    torch.set_num_threads(args.threads)
    adapter, model_name = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    pv = torch.randn(args.batch, 3, adapter.image_size, adapter.image_size, generator=gen)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    window = args.window or adapter.patch_size
    stride = args.stride or max(1, window // 2)

    result = {"benchmark": "grounding", "model": model_name, "device": "cpu", "threads": args.threads,
              "allocator": allocator, "torch": torch.__version__, "python": platform.python_version(),
              "repeats": args.repeats,
              "note": "medians; the CPU may be shared with other work, ratios are measured in the same run"}
    if "chefer" in only:
        result["chefer"] = bench_chefer(adapter, pv, prompts, args.repeats)
    if "gradcam" in only:
        result["gradcam"] = bench_gradcam(adapter, pv, prompts, args.repeats)
    if "occlusion" in only:
        k = args.occlusion_images
        result["occlusion"] = bench_occlusion(adapter, pv[:k], prompts[:k], args.repeats, window, stride)
        # the same images, each asked about 4 prompts (e.g. every object class in it)
        many = pv[:k].repeat_interleave(4, dim=0)
        many_prompts = [PROMPTS[j % len(PROMPTS)] for _ in range(k) for j in range(4)]
        result["occlusion_4_prompts_per_image"] = bench_occlusion(adapter, many, many_prompts, args.repeats, window,
                                                                  stride)
    if "flow" in only:
        result["flow"] = bench_flow(adapter, pv, args.repeats)

    print_table(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def print_table(result: dict) -> None:
    rows = []
    for section, ratio_key, ours_key, peer_key in (
            ("chefer", "speedup", "loupe_batched", "per_image_loop"),
            ("gradcam", "speedup", "loupe", "pytorch_grad_cam"),
            ("occlusion", "speedup_vs_best_captum", "loupe", "best_captum"),
            ("occlusion_4_prompts_per_image", "speedup_vs_best_captum", "loupe", "best_captum"),
            ("flow", "speedup", "loupe_scipy", "networkx_reference")):
        r = result.get(section)
        if r is None:
            continue
        if "skipped" in r:
            rows.append(f"{section:<30} skipped: {r['skipped']}")
            continue
        if peer_key == "best_captum":
            peer_key = r["best_captum"]
        rows.append(f"{section:<30} ours {r[ours_key]['images_per_s']:9.2f} expl/s"
                    f" (peak +{r[ours_key]['peak_mib']} MiB)"
                    f" | {peer_key} {r[peer_key]['images_per_s']:9.3f} expl/s (peak +{r[peer_key]['peak_mib']} MiB)"
                    f" | x{r[ratio_key]:.1f} (target >= {r['target']})")
        if "ceiling" in r:
            c = r["ceiling"]
            rows.append(f"{'':<30} ceiling: {c['matmul_mflop_per_image']:.0f} MFLOP of matrix products per image;"
                        f" at this CPU's dense matmul rate ({c['dense_matmul_gflops']:.0f} GFLOP/s, batched runs at"
                        f" {c['batched_share_of_dense_rate']:.0%} of it) batching could reach at most"
                        f" x{c['max_speedup']:.1f}")
    print("\n".join(rows), file=sys.stderr)

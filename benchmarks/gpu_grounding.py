"""Grounding on a GPU: explanations/s of ``chefer`` and ``gradcam`` for a ViT-B/16-sized CLIP, and
the share of the GPU's peak FLOP/s they achieve.

The model is built from a config with random weights (nothing is downloaded): vision ViT-B/16 at
224 px (12 layers, width 768, 12 heads, 197 tokens), text 12 layers of width 512, projection 512,
eager attention (the methods need the attention probabilities), frozen weights, bf16 autocast.
FLOPs of one explanation batch (forward + backward, as executed) are counted with
``torch.utils.flop_counter.FlopCounterMode``; achieved FLOP/s = counted FLOPs / median wall time.

Assumed dense bf16 peaks (no sparsity), from the vendors' data sheets; override with
``--peak-tflops``: H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989, A100 312, L40S 362,
L4 121 TFLOP/s. Self-contained, under 3 minutes; prints one JSON object::

    python benchmarks/gpu_grounding.py                # on a CUDA machine
    python benchmarks/gpu_grounding.py --smoke        # tiny model on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._models import count_flops, random_clip  # noqa: E402
from workers.probes.chefer import relevance  # noqa: E402
from workers.probes.gradcam import gradcam  # noqa: E402

PEAK_BF16_TFLOPS = [  # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
]
VIT_B16 = dict(image_size=224, patch_size=16, hidden=768, layers=12, heads=12, text_hidden=512, text_layers=12,
               text_heads=8, projection=512)
SMOKE = dict(image_size=32, patch_size=8, hidden=32, layers=2, heads=2, text_hidden=32, text_layers=1, text_heads=2,
             projection=16)
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def assumed_peak(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, repeats: int, budget_s: float) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script runs")
    parser.add_argument("--batch", type=int, default=None, help="pairs per explanation batch (default 64; smoke 4)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=40.0, help="max seconds of timing per method")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the assumed dense peak")
    args = parser.parse_args(argv)

    if args.smoke:
        device, spec, batch = "cpu", SMOKE, args.batch or 4
        dtype = None if args.dtype == "fp32" else torch.bfloat16  # fp16 autocast needs CUDA
    else:
        if not torch.cuda.is_available():
            print(json.dumps({"error": "no CUDA device; use --smoke to check the script on CPU"}))
            return 2
        device, spec, batch = "cuda", VIT_B16, args.batch or 64
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    started = time.perf_counter()
    adapter = random_clip(**spec, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pv = torch.randn(batch, 3, spec["image_size"], spec["image_size"], generator=gen).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    methods = {
        "chefer": lambda: relevance(adapter, pv, prompts),
        "gradcam": lambda: gradcam(adapter, pv, prompts, batch_size=batch),
    }
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (assumed_peak(name) if device == "cuda" else None)
    if device == "cuda" and dtype is None and args.peak_tflops is None:
        peak = None  # the table above is for bf16/fp16 tensor cores; say nothing rather than mislead
    result = {
        "benchmark": "gpu_grounding", "device": name, "smoke": args.smoke, "torch": torch.__version__,
        "model": {**spec, "tokens": (spec["image_size"] // spec["patch_size"]) ** 2 + 1, "weights": "random (config)",
                  "attention": "eager"},
        "dtype": args.dtype if dtype is not None or args.dtype == "fp32" else "fp32", "batch": batch,
        "assumed_peak_tflops": peak,
        "peak_note": "dense (non-sparse) bf16/fp16 tensor-core peak from the vendor data sheet",
    }
    for method, fn in methods.items():
        flops = count_flops(fn)
        timing = measure(fn, device, warmup=2 if not args.smoke else 1, repeats=args.repeats, budget_s=args.budget_s)
        achieved = flops / timing["median_s"] / 1e12
        entry = {**timing, "explanations_per_s": batch / timing["median_s"], "flops_per_batch": flops,
                 "gflops_per_explanation": flops / batch / 1e9, "achieved_tflops": achieved}
        if peak:
            entry["share_of_peak"] = achieved / peak
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            entry["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result[method] = entry
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

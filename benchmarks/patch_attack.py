"""Patch attack optimisation: one forward/backward pass per step for the whole batch of images vs
one image at a time.

Both variants run the same projected-gradient steps on the same images, positions and patch
(``patch_attack.optimise_patch`` with ``per_image`` False / True): each step's gradient is the sum
of the per-image gradients either way. Agreement is checked on one step's gradient
(``max_abs_diff``). Variants are timed interleaved (a, b, a, b, ...) so load from other processes
hits them alike; the ratio is of the medians over ``--repeats`` rounds. Run (CPU)::

    python -m benchmarks patch_attack [--model DIR] [--batch 32] [--steps 10] [--repeats 5] [--threads 1]
                                      [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks._runtime import add_allocator_option, apply_allocator
    from workers.probes import patch_attack as pa
    from workers.probes.adapters import load_adapter
    from workers.probes.zoo import checkpoint_path, world

    parser = argparse.ArgumentParser(prog="python -m benchmarks patch_attack")
    parser.add_argument("--model", default=None, help="default: the zoo's tiny-clip")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the result to this file")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    allocator = apply_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.model or str(checkpoint_path("tiny-clip")), device=args.device)
    scenes = world.sample_scenes(1_000_003, args.batch)
    prompts = [s.objects[0].prompt for s in scenes]
    target = "a red circle"
    train = pa.unit_inputs(adapter, [s.image for s in scenes])

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    side = pa.patch_side(0.06, train.shape[-1])
    patch = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0)).to(train.device)
    positions = pa.random_positions(torch.Generator().manual_seed(1), train.shape[0], train.shape[-1], side)
    g_batch, _ = pa.patch_gradient(adapter, train, patch, positions, target, prompts)
    g_loop, _ = pa.patch_gradient(adapter, train, patch, positions, target, prompts, per_image=True)
    max_diff = float((g_batch - g_loop).abs().max())

    def run(per_image: bool) -> None:
        pa.optimise_patch(adapter, train, target, prompts, steps=args.steps, batch_size=args.batch, seed=0,
                          per_image=per_image)

    variants = {"batched": False, "per_image": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, per_image in variants.items():
            sync()
            start = time.perf_counter()
            run(per_image)
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    image_steps = args.steps * args.batch
    out = {
        "benchmark": "patch_attack", "model": "zoo tiny-clip" if args.model is None else args.model,
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "allocator": allocator,
        "device": args.device if args.device == "cpu" else f"cuda:{torch.cuda.get_device_name(0)}",
        **{name: {"median_s": round(m, 4), "image_steps_per_s": round(image_steps / m, 1),
                  "runs_s": [round(t, 4) for t in times[name]]} for name, m in med.items()},
        "speedup_batched_vs_per_image": round(med["per_image"] / med["batched"], 2),
        "max_abs_diff": max_diff,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(f"patch_attack: batched {out['speedup_batched_vs_per_image']}x the per-image loop "
          f"(batch {args.batch}, {args.steps} steps, medians of {args.repeats})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

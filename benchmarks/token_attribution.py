"""Token attribution for a 10-token caption: tokens/s of Loupe's path vs a naive recomputation.

Both start from the same greedy generation (KV cache; timed once on its own and added for the
end-to-end ratio), then attribute every generated token with the same Chefer decoder rule:

- ``loupe``: ONE teacher-forced forward over the generated sequence (image and prompt, then the
  explained rows on their KV cache, so the backward pass skips the top layer over the prefix) and
  ONE batched backward pass for all targets (``torch.autograd.grad(..., is_grads_batched=True)``),
  only the needed row of the relevance matrix propagated;
- ``loupe-loop``: the same forward, then one backward per target (``retain_graph``), for reference;
- ``naive``: for each token, a fresh forward over its prefix and a fresh backward.

The results are checked to be equal (max abs difference printed). Medians over ``--repeats``;
``ru_maxrss`` is the process's peak resident memory. Run (CPU, ~1 minute uncontended)::

    python benchmarks/token_attribution.py [--model DIR] [--images 5] [--repeats 5] [--threads 1] [--device cuda]

On CUDA the timings synchronise the device (``benchmarks/gpu_check.sh`` runs it there).
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

import torch  # noqa: E402

from workers.probes import token_attribution as ta  # noqa: E402
from workers.probes.adapters.fusion import load_any  # noqa: E402
from workers.probes.zoo import checkpoint_path, world  # noqa: E402
from workers.probes.zoo.captioner import PROMPTS  # noqa: E402

N_TOKENS = 10


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the zoo's tiny-llava")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_any(args.model or str(checkpoint_path("tiny-llava")), args.device)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()
    prompt = PROMPTS[0]

    # Scenes whose caption has at least 10 tokens (3-4 objects); attribute the first 10.
    cases = []
    for scene in world.sample_scenes(1_000_003, 64):
        enc, feats = adapter.prepare([scene.image], prompt)
        gen = adapter.generate(adapter.embed(enc.input_ids, feats), 24)[0]
        if len(gen) >= N_TOKENS:
            cases.append((scene.image, enc, feats, gen[:N_TOKENS]))
        if len(cases) == args.images:
            break

    def generation(case):
        image = case[0]
        enc, feats = adapter.prepare([image], prompt)
        adapter.generate(adapter.embed(enc.input_ids, feats), N_TOKENS)
        return enc, feats

    # Attribution only: the generation pass is the same for every variant and timed on its own.
    def loupe(case):
        _, enc, feats, gen = case
        return ta.attribute_generated(adapter, enc, feats, gen)["chefer"]

    def loupe_loop(case):
        _, enc, feats, gen = case
        return ta.attribute_generated(adapter, enc, feats, gen, batched=False)["chefer"]

    def naive(case):
        _, enc, feats, gen = case
        return ta.naive_attribute_generated(adapter, enc, feats, gen)

    max_diff = max(float((loupe(c) - naive(c)).abs().max()) for c in cases)
    results = {}
    for name, fn in (("generation", generation), ("loupe", loupe), ("loupe-loop", loupe_loop), ("naive", naive)):
        fn(cases[0])  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            for case in cases:
                fn(case)
            sync()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results[name] = {"median_s": round(median, 4), "tokens_per_s": round(len(cases) * N_TOKENS / median, 1)}
    out = {
        "benchmark": "token_attribution", "tokens_per_caption": N_TOKENS, "captions": len(cases),
        "repeats": args.repeats, "threads": args.threads,
        "device": args.device if args.device == "cpu" else f"cuda:{torch.cuda.get_device_name(0)}", **results,
        "speedup_vs_naive": round(results["naive"]["median_s"] / results["loupe"]["median_s"], 2),
        "speedup_loop_vs_naive": round(results["naive"]["median_s"] / results["loupe-loop"]["median_s"], 2),
        # End to end (generation + attribution): what a user of `attribute` waits for.
        "speedup_end_to_end": round((results["generation"]["median_s"] + results["naive"]["median_s"])
                                    / (results["generation"]["median_s"] + results["loupe"]["median_s"]), 2),
        "max_abs_diff_vs_naive": max_diff,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

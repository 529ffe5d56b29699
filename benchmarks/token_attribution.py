"""Token attribution for a 10-token caption: tokens/s of Loupe's path vs a naive recomputation.

Every variant explains the same greedy 10-token captions with the same Chefer decoder rule:

- ``loupe``: generation and attribution together (``generate_and_attribute``): ONE generation
  pass whose run over the image and prompt is traced (it is the forward pass of the explanation),
  the 10 explained rows run once more in one call on its keys and values, and ONE batched
  backward pass for all targets (``torch.autograd.grad(..., is_grads_batched=True)``), only the
  needed row of the relevance matrix propagated;
- ``generation``: the same greedy generation, untraced: what the caption costs anyway;
- ``naive``: for each token, a fresh forward over its prefix and a fresh backward;
- ``teacher-forced`` / ``teacher-forced-loop``: Loupe's path for text generated elsewhere
  (``attribute_generated``: its own traced forward, then one batched backward / one backward
  per target).

Attribution tokens/s divide the 10 tokens by what attributing adds to generating the caption:
``loupe - generation`` for Loupe, the recomputations for ``naive``. ``speedup_end_to_end``
compares generation + attribution as a user of ``attribute`` waits for it (``loupe`` vs
``generation + naive``). Variants are timed interleaved (one round = each variant once), so that
load from other processes hits them alike; medians over ``--repeats`` rounds. The results are
checked to be equal (max abs difference printed); ``ru_maxrss`` is the process's peak resident
memory. Run (CPU, ~1 minute uncontended)::

    python benchmarks/token_attribution.py [--model DIR] [--images 5] [--repeats 5] [--threads 1] [--device cuda]
                                           [--allocator loupe|glibc]

On CUDA the timings synchronise the device (``benchmarks/gpu_check.sh`` runs it there).

``--perturbation`` benchmarks per-word patch occlusion instead (``token_perturbation.occlusion_rows``:
every patch hidden once, every word of the caption scored teacher-forced, copies batched) against

- ``per-patch-loop``: the same numbers, one forward pass per hidden patch (all words read from it),
  through the model's stock forward (``word_log_probs(..., pruned=False)``: the whole vision tower,
  every decoder layer at every position);
- ``batched-stock``: Loupe's batches through the stock forward, which separates what batching gains
  from what skipping unread work gains (``pruned``: vision layers above the feature layer, the last
  decoder layer off the word rows);
- ``captum``: ``captum.attr.FeatureAblation`` on the same model, pixels, feature mask (one feature
  per patch), baseline and words: one ``attribute`` call per word (its forward returns one scalar
  per example, through the stock forward), ``perturbations_per_eval`` at the batch Loupe uses.

``--variants`` picks which of them run (captum is by far the slowest on a loaded machine).

The three agree (max abs difference printed); medians over interleaved rounds as above.
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

from benchmarks._runtime import add_allocator_option, apply_allocator  # noqa: E402
from workers.probes import token_attribution as ta  # noqa: E402
from workers.probes.suite import load_model  # noqa: E402
from workers.probes.zoo import checkpoint_path, world  # noqa: E402
from workers.probes.zoo.captioner import PROMPTS  # noqa: E402

N_TOKENS = 10


def _interleaved_times(variants: dict, cases: list, repeats: int, sync,
                       cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per round for each variant over all cases, the variants interleaved in every round
    so that they share the machine's load; round 0 warms up and is not kept. ``cpu`` (if given)
    receives the process's CPU seconds per round, which other processes' load barely changes."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for case in cases:
                fn(case)
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the zoo's tiny-llava")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--perturbation", action="store_true",
                        help="benchmark per-word patch occlusion against a per-patch loop and captum")
    parser.add_argument("--batch", type=int, default=None,
                        help="occluded copies per forward (--perturbation; default: Loupe's for the device)")
    parser.add_argument("--variants", default="loupe,batched-stock,per-patch-loop,captum",
                        help="--perturbation: comma-separated variants to time")
    add_allocator_option(parser)
    args = parser.parse_args()
    allocator = apply_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    adapter = load_model(args.model or str(checkpoint_path("tiny-llava")), args.device)

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

    if args.perturbation:
        return perturbation_benchmark(adapter, cases, args, sync, allocator)

    def generation(case):
        _, enc, feats, _ = case
        return adapter.generate(adapter.embed(enc.input_ids, feats), N_TOKENS)[0]

    def loupe(case):
        _, enc, feats, _ = case
        return ta.generate_and_attribute(adapter, enc, feats, N_TOKENS)

    def teacher_forced(case):
        _, enc, feats, gen = case
        return ta.attribute_generated(adapter, enc, feats, gen)["chefer"]

    def teacher_forced_loop(case):
        _, enc, feats, gen = case
        return ta.attribute_generated(adapter, enc, feats, gen, batched=False)["chefer"]

    def naive(case):
        _, enc, feats, gen = case
        return ta.naive_attribute_generated(adapter, enc, feats, gen)

    max_diff = 0.0
    for case in cases:
        generated, rows = loupe(case)
        assert generated == case[3] == generation(case), "the traced generation must match the plain one"
        reference = naive(case)
        max_diff = max(max_diff, float((rows["chefer"] - reference).abs().max()),
                       float((teacher_forced(case) - reference).abs().max()))
    variants = {"generation": generation, "loupe": loupe, "teacher-forced": teacher_forced,
                "teacher-forced-loop": teacher_forced_loop, "naive": naive}
    times = _interleaved_times(variants, cases, args.repeats, sync)
    tokens = len(cases) * N_TOKENS
    med = {name: statistics.median(t) for name, t in times.items()}
    # What attributing adds to generating the caption, per round (same load), then the median.
    loupe_attr = statistics.median(lo - g for lo, g in zip(times["loupe"], times["generation"], strict=True))
    results = {name: {"median_s": round(m, 4), "tokens_per_s": round(tokens / m, 1)} for name, m in med.items()}
    results["loupe"]["attribution_s"] = round(loupe_attr, 4)
    out = {
        "benchmark": "token_attribution", "tokens_per_caption": N_TOKENS, "captions": len(cases),
        "repeats": args.repeats, "threads": args.threads, "allocator": allocator,
        "device": args.device if args.device == "cpu" else f"cuda:{torch.cuda.get_device_name(0)}", **results,
        "attribution_tokens_per_s": {"loupe": round(tokens / loupe_attr, 1), "naive": round(tokens / med["naive"], 1)},
        "speedup_vs_naive": round(med["naive"] / loupe_attr, 2),
        # Generation + attribution: what a user of `attribute` waits for.
        "speedup_end_to_end": round((med["generation"] + med["naive"]) / med["loupe"], 2),
        "speedup_teacher_forced_vs_naive": round(med["naive"] / med["teacher-forced"], 2),
        "speedup_teacher_forced_loop_vs_naive": round(med["naive"] / med["teacher-forced-loop"], 2),
        "max_abs_diff_vs_naive": max_diff,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=2))
    return 0


def perturbation_benchmark(adapter, cases, args, sync, allocator) -> int:
    from captum.attr import FeatureAblation

    from workers.probes import token_perturbation as tp

    gh, gw = adapter.grid
    p = adapter.patch_size
    batch = args.batch or tp.default_batch_size(adapter.device)
    mask = torch.arange(gh * gw).view(gh, gw).repeat_interleave(p, 0).repeat_interleave(p, 1)
    mask = mask.view(1, 1, gh * p, gw * p).to(adapter.device)

    def loupe(case):
        image, enc, _, gen = case
        return tp.occlusion_rows(adapter, enc, adapter.preprocess([image]), gen, batch_size=batch)

    def batched_stock(case):
        image, enc, _, gen = case
        return tp.occlusion_rows(adapter, enc, adapter.preprocess([image]), gen, batch_size=batch, pruned=False)

    def per_patch_loop(case):
        image, enc, _, gen = case
        px = adapter.preprocess([image])
        ids, rows, targets = tp.teacher_forced(enc, gen)
        clean = tp.word_log_probs(adapter, px, ids, rows, targets, pruned=False)[0]
        out = torch.zeros(len(gen), gh * gw)
        for g in range(gh * gw):
            copy = torch.where(mask == g, tp.BASELINE, px)
            out[:, g] = (clean - tp.word_log_probs(adapter, copy, ids, rows, targets, pruned=False)[0]).cpu()
        return out

    def captum(case):
        image, enc, _, gen = case
        px = adapter.preprocess([image])
        ids, rows, targets = tp.teacher_forced(enc, gen)

        def forward(x):
            return tp.word_log_probs(adapter, x, ids, rows, targets, batch_size=x.shape[0], pruned=False)

        ablation = FeatureAblation(forward)
        out = torch.zeros(len(gen), gh * gw)
        for t in range(len(gen)):
            attr = ablation.attribute(px, baselines=tp.BASELINE, target=t, feature_mask=mask.expand_as(px),
                                      perturbations_per_eval=batch)
            out[t] = attr[0, 0].reshape(gh, p, gw, p)[:, 0, :, 0].flatten().cpu()
        return out

    every = {"loupe": loupe, "batched-stock": batched_stock, "per-patch-loop": per_patch_loop, "captum": captum}
    chosen = ["loupe", *[v for v in args.variants.split(",") if v and v != "loupe"]]
    unknown = [v for v in chosen if v not in every]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(every)}")
    variants = {name: every[name] for name in chosen}
    max_diff = 0.0
    for case in cases[:2]:
        ref = loupe(case)
        for name, fn in variants.items():
            if name != "loupe":
                max_diff = max(max_diff, float((fn(case) - ref).abs().max()))
    cpu: dict[str, list[float]] = {}
    times = _interleaved_times(variants, cases, args.repeats, sync, cpu)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu_med = {name: statistics.median(t) for name, t in cpu.items()}
    ratios = {"per-patch-loop": "speedup_vs_per_patch_loop", "captum": "speedup_vs_captum_feature_ablation",
              "batched-stock": "speedup_vs_batched_stock"}
    out = {
        "benchmark": "token_attribution_perturbation", "method": "occlusion (1 patch, every word, teacher-forced)",
        "words_per_caption": N_TOKENS, "captions": len(cases), "patches": gh * gw, "batch": batch,
        "repeats": args.repeats, "threads": args.threads, "allocator": allocator, "device": args.device,
        **{name: {"median_s": round(m, 4), "rounds_s": [round(t, 3) for t in times[name]],
                  "cpu_median_s": round(cpu_med[name], 4)} for name, m in med.items()},
        **{key: round(med[name] / med["loupe"], 2) for name, key in ratios.items() if name in med},
        # per round (the variants of a round share the machine's load), then the median
        **{f"{key}_per_round_median": round(statistics.median(
            o / lo for o, lo in zip(times[name], times["loupe"], strict=True)), 2)
           for name, key in ratios.items() if name in med},
        # process CPU seconds (one thread): what each variant computes, whatever else the machine runs
        **{f"cpu_{key}": round(cpu_med[name] / cpu_med["loupe"], 2) for name, key in ratios.items() if name in med},
        "max_abs_diff": max_diff,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CLIP's fast paths (``workers/probes/adapters/clip_fast.py``), each against the plain path it
replaces, measured in the same run (CPU).

A fast path is kept only where it pays at least ``KEEP_AT`` (1.2x) on the call a probe makes on one
of the models below and loses nothing (>= 1.0x) on the other; this benchmark decides which. Each
comparison switches *one* path between fast and plain (its state set to off, as after a failed
self-check), everything else as Loupe runs it:

- ``cls_readout``: ``image_embeds_for_scoring`` (the last layer for the CLS token only) vs
  ``image_embeds``, both under ``fused_attention()`` as occlusion runs them;
- ``readout_trace``: chefer relevance through the lean trace vs the model's own traced forward.

Run on the zoo's ``tiny-clip`` (the size Loupe's tests and demo use) and a CLIP of ViT-B/32's size
with random weights (the size of the CLIP checkpoint most often downloaded). Variants are timed
interleaved (a, b, a, b, ...) and checked to agree (``max_abs_diff``). Prints a table and one JSON
object (``--json`` writes it)::

    python -m benchmarks clip_fast_paths [--repeats 5] [--threads 1] [--only tiny] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks._models import compare, random_clip
from benchmarks._runtime import add_allocator_option, apply_allocator
from workers.probes.chefer import relevance

KEEP_AT = 1.2
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def models() -> dict[str, Any]:
    from workers.probes.adapters import load_adapter
    from workers.probes.zoo import checkpoint_path

    return {
        "zoo tiny-clip (96 px, 8 px patches, 3 layers, width 64)":
            lambda: load_adapter(str(checkpoint_path("tiny-clip"))),
        "ViT-B/32-sized CLIP, random weights (224 px, 32 px patches, 12 layers, width 768)": lambda: random_clip(
            image_size=224, patch_size=32, hidden=768, layers=12, heads=12, text_hidden=64, text_layers=2,
            text_heads=4, projection=512),
    }


@contextmanager
def plain(adapter: Any, flag: str) -> Any:
    """The adapter with one fast path turned off (its flag False), as after a failed self-check."""
    before = getattr(adapter, flag)
    setattr(adapter, flag, False)
    try:
        yield
    finally:
        setattr(adapter, flag, before)


def timed_pair(fast: Callable[[], torch.Tensor], slow: Callable[[], torch.Tensor], repeats: int) -> dict:
    keep: dict = {}
    t = compare({"fast": fast, "plain": slow}, repeats, keep=keep)
    ratio = t["plain"]["median_s"] / t["fast"]["median_s"]
    return {"fast": t["fast"], "plain": t["plain"], "speedup": ratio, "kept": ratio >= KEEP_AT,
            "max_abs_diff": float((keep["fast"].float() - keep["plain"].float()).abs().max())}


def measure(adapter: Any, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    s = adapter.image_size
    pv = torch.randn(batch, 3, s, s)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    out: dict = {"batch": batch}

    def with_flag(flag: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with plain(adapter, flag):
                return fn()
        return run

    def scoring() -> torch.Tensor:
        with adapter.fused_attention():
            return adapter.image_embeds_for_scoring(pv)

    out["cls_readout"] = timed_pair(scoring, with_flag("_cls_readout_ok", scoring), repeats)

    def chefer() -> torch.Tensor:
        return relevance(adapter, pv, prompts).image

    out["readout_trace"] = timed_pair(chefer, with_flag("_readout_trace_ok", chefer), repeats)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks clip_fast_paths", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="images per call on the tiny model (a quarter of it "
                                                               "on the ViT-B/32-sized one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    allocator = apply_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "clip_fast_paths", "keep_at": KEEP_AT, "threads": args.threads,
                    "allocator": allocator, "repeats": args.repeats,
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "models": {}}
    for i, (name, build) in enumerate(models().items()):
        if args.only and args.only not in name:
            continue
        adapter = build()
        batch = args.batch if i == 0 else max(2, args.batch // 4)
        result["models"][name] = measure(adapter, batch, args.repeats)
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"{'model':<28} {'fast path':<16} {'fast s':>8} {'plain s':>8} {'speedup':>8}  kept  max_abs_diff")
    for name, rows in result["models"].items():
        for path, row in rows.items():
            if isinstance(row, dict):
                print(f"{name[:28]:<28} {path:<16} {row['fast']['median_s']:8.3f} {row['plain']['median_s']:8.3f} "
                      f"{row['speedup']:7.2f}x  {'yes' if row['kept'] else 'no ':<4}  {row['max_abs_diff']:.1e}")
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

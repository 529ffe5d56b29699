"""Models and measurement helpers shared by the grounding benchmarks (no downloads).

``random_clip`` builds a CLIPModel from a config with random weights and wraps it in Loupe's
adapter exactly as ``load_adapter`` would (eager attention, frozen weights), with a small
word-level tokenizer. ``peak_rss`` measures a call's peak resident memory increase;
``count_flops`` and ``dense_matmul_rate`` give the arithmetic a call does and the rate this machine
does dense arithmetic at, for ceilings that say how far a ratio *could* go.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["a", "an", "the", "photo", "of", "and", "red", "green", "blue", "yellow", "purple", "circle", "square",
         "triangle", "cross", "star"]


def word_tokenizer(max_length: int):
    from workers.probes.zoo.train import word_level_tokenizer

    return word_level_tokenizer(WORDS, max_length)


def random_clip(*, image_size: int, patch_size: int, hidden: int, layers: int, heads: int, text_hidden: int,
                text_layers: int, text_heads: int, projection: int, device: str = "cpu", dtype=None, seed: int = 0):
    """A randomly initialised CLIP behind ``FastCLIPAdapter`` (what ``load_adapter`` gives a CLIP)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from workers.probes.adapters.clip_fast import FastCLIPAdapter

    tokenizer, vocab = word_tokenizer(32)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=32,
                         eos_token_id=vocab["[EOS]"], bos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=projection)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPModel(config)
    model.config._attn_implementation = "eager"
    for sub in (model.vision_model, model.text_model):
        sub.config._attn_implementation = "eager"
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return FastCLIPAdapter(model, tokenizer, processor, device=device, autocast_dtype=dtype, source="random-config")


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


@contextmanager
def peak_rss():
    """Yields a dict filled on exit with ``peak_mib``: the peak resident memory *increase* while
    the block ran (Linux: resets the high-water mark via /proc/self/clear_refs). Torch's CPU
    allocations are invisible to tracemalloc, so resident memory is the honest measure."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        supported = True
    except OSError:
        supported = False
    before = _status()["VmRSS"] if supported else 0
    yield out
    out["peak_mib"] = round((_status()["VmHWM"] - before) / 1024, 1) if supported else float("nan")


def compare(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
            keep: dict | None = None) -> dict[str, dict[str, float]]:
    """Time several implementations *interleaved* (a, b, a, b, ...), so that load from other
    processes on a shared CPU hits all of them alike. Per implementation: median and min seconds
    and the peak-RSS increase of one more, untimed call. The last results go into ``keep``."""
    from workers.probes.allocator import release_free_memory

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if keep is not None:
                keep[name] = result
    peaks: dict[str, float] = {}
    for name, fn in fns.items():
        # Memory that earlier calls freed may still be resident (allocator.py keeps it on purpose);
        # hand it back first, or the call would reuse it and its peak would look smaller than it is.
        release_free_memory()
        with peak_rss() as mem:
            fn()
        peaks[name] = mem["peak_mib"]
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "repeats": repeats, "peak_mib": peaks[name]}
            for name, t in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs of one call (forward and backward, as executed), counted by
    ``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions only, so a lower
    bound on the call's arithmetic (softmax, GELU, layer norms are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def dense_matmul_rate(size: int = 1024, repeats: int = 15) -> float:
    """FLOP/s of a square float32 matmul on the CPU at the current ``torch.get_num_threads()``:
    about the best rate this machine does arithmetic at (median of ``repeats``)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b  # warm-up: thread pool, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)

"""The process setting every benchmark shares: which ``malloc`` configuration it runs under.

``--allocator loupe`` (the default) applies ``workers.probes.allocator.tune_malloc``, as the probe
command line and the Celery workers do, so a benchmark measures Loupe as it runs; ``--allocator
glibc`` keeps the C library's defaults. Either way every variant of a benchmark (Loupe and its
peer) runs in the same process under the same setting.
"""

from __future__ import annotations

import argparse


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allocator", choices=["loupe", "glibc"], default="loupe",
                        help="malloc settings: loupe (as the probe CLI and workers run, the default) "
                             "or glibc's defaults")


def apply_allocator(choice: str) -> str:
    """Apply ``choice`` to this process; returns what the benchmark's JSON records."""
    if choice == "glibc":
        return "glibc defaults"
    from workers.probes.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc

    if not tune_malloc():
        return "defaults (tuning unavailable or turned off)"
    return f"loupe (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"

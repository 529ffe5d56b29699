"""glibc ``malloc`` settings for the processes that run probes.

Why: PyTorch's CPU tensors come straight from ``malloc``. glibc serves blocks above its mmap
threshold (128 KiB at start, raised as large blocks are freed) with a fresh ``mmap`` and returns
them on ``free``, and gives the top of the heap back to the kernel once more than its trim
threshold is free there. A batched backward pass allocates and frees dozens of 0.2-10 MB
gradient tensors per explanation, so each one arrives as fresh pages that the kernel must fault
in and zero, thousands of page faults per attributed caption (their cost:
``benchmarks/token_attribution.py --allocator glibc`` vs ``loupe``). Keeping freed memory in the
process removes them.

The settings: a fixed mmap threshold of 32 MiB (the largest glibc accepts; larger blocks are still
mapped and unmapped) and a trim threshold of 256 MiB (at most that much freed memory stays with
the process). The cost is resident memory that is not handed back between probes; peak memory
is unchanged.

These are process-wide, so the library never applies them on import: Loupe's own processes opt
in. The probe task (``workers.tasks.run_probe``) applies them in whichever process runs a probe (a
worker's pool child, or the web or demo process on the embedded default), as do the probe command
line and the benchmarks. ``LOUPE_MALLOC_TUNING=0`` turns them off; on a C library other than glibc
(musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 256 * 2**20

_applied = False


@functools.cache  # find_library runs ldconfig in a subprocess: look glibc up once per process
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def tune_malloc() -> bool:
    """Apply the settings above to this process (once; safe to call again). Returns whether glibc's
    allocator runs with them: False on other C libraries or with ``LOUPE_MALLOC_TUNING=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get("LOUPE_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a value glibc refuses leaves its default in place.
    _applied = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _applied


def release_free_memory() -> None:
    """Hand the memory this process has freed back to the kernel now (glibc's ``malloc_trim``), e.g.
    before measuring what one call adds to the resident set. A no-op on other C libraries."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

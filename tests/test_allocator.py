"""Probe processes keep freed tensor memory instead of faulting it back in (workers/probes/allocator.py).

Actor: an auditor waiting for a batched explanation. Its backward pass frees and reallocates
MB-sized gradient tensors; under glibc's defaults each comes back as fresh pages the kernel must
fault in and zero. Each check runs in a fresh interpreter, because the setting is process-wide.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# A burst of per-target gradient tensors (30 x 3.5 MB), freed, then the same burst again.
BURST = """
import json, resource, torch
from workers.probes.allocator import tune_malloc
applied = tune_malloc()
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
def burst():
    ts = [torch.ones(10, 4, 147, 147) for _ in range(30)]
    del ts
before = rss_mib()
burst()
kept = rss_mib() - before
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
print(json.dumps({"applied": applied, "kept_mib": kept,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""

# tune_malloc deliberately changes nothing on other C libraries (musl, macOS): there is no tuning to observe.
# CI and the Docker image run on glibc, where these checks run.
needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                 reason="tune_malloc is a no-op by design off glibc (it sets glibc's mallopt)")


def burst(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", BURST], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@needs_glibc
def test_it_keeps_freed_tensor_memory_for_the_next_burst():
    tuned, untuned = burst(), burst(LOUPE_MALLOC_TUNING="0")
    assert tuned["applied"] is True and untuned["applied"] is False
    # glibc's defaults give the 100 MB back at once (and fault it in again next time); tuned, it stays
    assert untuned["kept_mib"] < 20
    assert tuned["kept_mib"] > 90
    assert untuned["faults"] > 20_000  # every page of the second burst is fresh
    assert tuned["faults"] < untuned["faults"] / 3


@pytest.mark.django_db
def test_it_is_applied_by_the_probe_task_before_anything_else(monkeypatch):
    # run_probe is where probes run, in a worker's pool child or in-process on the embedded default
    from governance.models import ProbeRun
    from workers.probes import allocator
    from workers.tasks import run_probe

    calls = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: calls.append("tuned") or True)
    outcome = run_probe.run(987654)  # no such run: the task stops at claiming it, already tuned
    assert outcome["skipped"] and outcome["status"] is None
    assert not ProbeRun.objects.filter(pk=987654).exists()
    assert calls == ["tuned"]


@needs_glibc
def test_it_is_applied_by_the_command_line():
    # before running a command (here one that fails on its input)
    done = subprocess.run([sys.executable, "-c", "import workers.probes.allocator as a\n"
                           "from workers.probes.cli import main\n"
                           "print(main(['attribute', '--model', 'no/such/dir', '--image', 'none.png']), a._applied)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "True"], done.stderr[-2000:]

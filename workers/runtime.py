"""Process-level concerns of a probe worker: which device to use, and a small model cache.

Kept apart from ``workers/tasks.py`` so the rules are easy to find:

- CUDA is selected when present, but never initialised in the forking parent: a CUDA context
  does not survive ``fork()``, so the prefork pool's children would crash on first use. We ask
  ``torch.cuda.is_available()`` only inside the child (in a task), and set
  ``PYTORCH_NVML_BASED_CUDA_CHECK`` so that even that query does not create a context.
- Loading a VLM costs seconds; a worker typically runs several probes on the same model in a row.
  Adapters are cached per process, keyed by the model's manifest hash (content, not path: a model
  directory replaced in place must not be served from a stale cache), with a small LRU bound so
  GPU memory stays predictable.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

MODEL_CACHE_SIZE = int(os.environ.get("LOUPE_MODEL_CACHE_SIZE", "2"))


def select_device(requested: str | None = None) -> str:
    """``"cuda"`` when a GPU is visible (and not disabled with ``LOUPE_DEVICE=cpu``), else ``"cpu"``."""
    requested = requested or os.environ.get("LOUPE_DEVICE") or "auto"
    if requested not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"LOUPE_DEVICE must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("LOUPE_DEVICE=cuda but no CUDA device is visible to this worker")
    return "cpu"


class ModelCache:
    """A tiny thread-safe LRU of loaded adapters keyed by ``(manifest_hash, device)``.

    The adapters are shared, and some methods change the shared model for the length of a call:
    occlusion switches it to fused attention, LLaVA's scoring cuts its vision tower after the
    feature layer. A second probe run on the same model meanwhile (a thread pool, or any second
    thread of a process) would read those changes and record maps of another model, without an
    error. So a run holds :meth:`exclusive` while it uses the cache: runs of one process take turns,
    which costs nothing under the documented prefork pool (one task per process at a time)."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._in_use = threading.RLock()
        self.hits = 0
        self.misses = 0

    def get(self, manifest_hash: str, device: str, loader: Any) -> Any:
        key = (manifest_hash, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = loader()
        with self._lock:
            self.misses += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the cached models for one probe run; another thread's run waits until it ends."""
        with self._in_use:
            yield


model_cache = ModelCache()


def code_version() -> str:
    """The Loupe version that ran a probe: the git commit when running from a checkout, else the
    installed package version (provenance for every run)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import subprocess
        from importlib import metadata
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        try:
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                 text=True, timeout=5, check=True).stdout.strip()
            _CODE_VERSION = f"git:{sha}"
        except (OSError, subprocess.SubprocessError):
            try:
                _CODE_VERSION = f"loupe {metadata.version('loupe')}"
            except metadata.PackageNotFoundError:
                _CODE_VERSION = "loupe (unknown version)"
    return _CODE_VERSION


_CODE_VERSION: str | None = None


# --------------------------------------------------------------------------------------------------
# Run leases, heartbeats and retry timing (see workers/tasks.py run_probe, governance/pipeline.py
# recover_runs). Read from settings at call time, so tests and operators can change them.
# --------------------------------------------------------------------------------------------------


def lease_duration():
    """How long a claimed run stays leased without a heartbeat (``LOUPE_RUN_LEASE_SECONDS``)."""
    import datetime as dt

    from django.conf import settings

    return dt.timedelta(seconds=settings.LOUPE_RUN_LEASE_SECONDS)


def heartbeat_interval() -> float:
    """A third of the lease: two heartbeats may be missed (a slow database) before the lease lapses."""
    return lease_duration().total_seconds() / 3


def retry_window() -> float:
    """Seconds during which transient errors are retried before a run fails (``LOUPE_RUN_RETRY_WINDOW``)."""
    from django.conf import settings

    return float(settings.LOUPE_RUN_RETRY_WINDOW)


def retry_delay(retries: int) -> float:
    """Exponential backoff: 1, 2, 4, ... seconds, capped at ``LOUPE_RUN_RETRY_MAX_DELAY``."""
    from django.conf import settings

    return float(min(2 ** min(retries, 16), settings.LOUPE_RUN_RETRY_MAX_DELAY))


def pause(seconds: float) -> None:
    """Sleep between in-process retries (its own name, so tests can skip the wait)."""
    import time

    time.sleep(seconds)


class Heartbeat:
    """Renews a run's lease every :func:`heartbeat_interval` seconds from a daemon thread while the
    probe works. It writes only while the run is still ``running`` under this lease token, so a
    delivery whose lease was taken over stops renewing (``lost`` becomes true). Database errors are
    logged and retried on the next beat: a blip must not kill the probe, and a long outage lets the
    lease lapse, which is exactly what the sweeper should then see."""

    def __init__(self, run_id: int, token: str) -> None:
        self.run_id = run_id
        self.token = token
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"loupe-heartbeat-{run_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> bool:
        from django.utils import timezone

        from governance.models import ProbeRun

        now = timezone.now()
        updated = ProbeRun.objects.filter(pk=self.run_id, lease_token=self.token,
                                          status=ProbeRun.Status.RUNNING).update(
            lease_expires_at=now + lease_duration(), heartbeat_at=now)
        return updated == 1

    def _loop(self) -> None:
        import logging

        from django.db import connection

        log = logging.getLogger(__name__)
        try:
            while not self._stop.wait(heartbeat_interval()):
                try:
                    if not self.beat():
                        self.lost = True
                        return
                except Exception:  # noqa: BLE001 - a database blip; the next beat tries again
                    log.warning("heartbeat of run %s failed", self.run_id, exc_info=True)
                    connection.close()
        finally:
            connection.close()  # this thread's own connection

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

import os
import threading
from collections import OrderedDict
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
    """A tiny thread-safe LRU of loaded adapters keyed by ``(manifest_hash, device)``."""

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
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

"""Running probe kinds, and what a run produces.

Kinds are declared in their own modules with :func:`workers.probes.kinds.probe_kind` (which says
what a kind is and what derives from its declaration). A kind function, as :func:`run` calls it::

    fn(model_dir: str, dataset_dir: str | None, params: KindParams, *, device: str,
       progress: Progress) -> ProbeResult

- ``model_dir``: a local Hugging Face-format directory (already verified by the caller). Load it
  with ``suite.load_model(model_dir, device)`` so that a worker can serve repeated loads of the same
  model from its cache (``workers/tasks.py`` passes ``loader=`` to :func:`run`).
- ``dataset_dir``: a dataset in the format the kind documents; ``None`` lets the kind use its own
  zoo default where it has one.
- ``params``: the kind's parameter schema, already checked (``kinds.parse_params``).
- ``progress(fraction, phase)``: call it as work advances (0..1) so runs show progress.

The command line (``workers/probes/cli.py``) and the Celery tasks (``workers/tasks.py``) both call
:func:`run`, so the evidence in a report is exactly what the CLI prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from workers.probes import kinds as kind_registry
from workers.probes import zoo
from workers.probes.errors import OutOfDeviceMemory, ProbeInputError


class Progress(Protocol):
    def __call__(self, fraction: float, phase: str) -> None: ...


def no_progress(fraction: float, phase: str) -> None:
    """A progress sink that ignores updates."""


@dataclass
class Finding:
    """Something a reviewer should look at. ``severity``: "high", "medium", "low" or "info"."""

    severity: str
    title: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "title": self.title, "detail": self.detail}


@dataclass
class ProbeResult:
    """What one probe run produced. Everything in ``metrics`` must be JSON-serialisable."""

    kind: str
    metrics: dict[str, Any]
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # name -> array (stored as .npy)
    findings: list[Finding] = field(default_factory=list)
    seed: int | None = None
    dataset_hash: str | None = None


ModelLoader = Callable[[str, str], Any]


def load_adapter_uncached(model_dir: str, device: str = "cpu") -> Any:
    """The adapter for ``model_dir``, loaded from disk (the loader :func:`run` uses by default)."""
    from workers.probes.adapters import load_adapter

    return load_adapter(model_dir, device=device)


_model_loader: ContextVar[ModelLoader] = ContextVar("model_loader", default=load_adapter_uncached)


FAMILIES = {"dual_encoder": "dual encoder (CLIP-like image-text model)", "fusion": "generative (fusion) VLM"}


def load_model(model_dir: str, device: str = "cpu", *, family: str | None = None) -> Any:
    """The adapter for ``model_dir``: the one way probes load a model, so the loader given to
    :func:`run` (a worker's cache) serves every load.

    ``family`` (``"dual_encoder"`` or ``"fusion"``): the adapter family the probe needs; another
    family is refused with a ``ProbeInputError`` saying what the model is."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ProbeInputError(f"device {device!r} requested but CUDA is not available on this machine")
    adapter = _model_loader.get()(model_dir, device)
    if family is not None and getattr(adapter, "kind", None) != family:
        actual = getattr(adapter, "kind", None) or type(adapter).__name__
        raise ProbeInputError(f"{model_dir} is a {FAMILIES.get(actual, f'{actual} model')}, not a "
                              f"{FAMILIES[family]}, which this probe needs")
    return adapter


def kinds() -> list[str]:
    """The names of every declared probe kind."""
    return kind_registry.names()


def run(name: str, model_dir: str, dataset_dir: str | None = None, params: Mapping[str, Any] | None = None, *,
        device: str = "cpu", progress: Progress = no_progress, loader: ModelLoader | None = None) -> ProbeResult:
    """Run probe kind ``name``; raises ``ProbeInputError`` for bad input.

    Memory backoff: a GPU shared with other work, or a model larger than the plan's batch sizes
    assumed, runs out of memory part-way. Failing the run would make the submitter guess smaller
    batch sizes and start again, so the kind runs again from the start with its ``batch_params``
    halved, down to 1; the sizes that fitted are recorded in ``metrics["memory_backoff"]``. Only
    when even batches of 1 do not fit does it raise :class:`OutOfDeviceMemory`.

    ``loader(model_dir, device)``: how :func:`load_model` loads models during this run (a worker
    passes its cache); the default loads from disk."""
    import torch

    spec = kind_registry.get(name)
    checked = kind_registry.parse_params(name, params)
    memory_plan = plan_memory(spec, checked, model_dir, device)
    if memory_plan is not None:
        checked = checked.model_copy(update=memory_plan["batch_sizes"])
    failed: list[dict[str, Any]] = []
    token = _model_loader.set(loader or load_adapter_uncached)
    try:
        while True:
            tried = {key: getattr(checked, key) for key in spec.batch_params}
            try:
                with zoo.recording_data() as generated:
                    result = spec.run(model_dir, dataset_dir, checked, device=device, progress=progress)
            except torch.OutOfMemoryError as exc:
                reason = (str(exc).splitlines() or ["out of memory"])[0]
            else:
                if memory_plan is not None:
                    result.metrics["memory_plan"] = memory_plan
                if failed:
                    result.metrics["memory_backoff"] = {"device": device, "batch_params": tried,
                                                        "out_of_memory_at": failed}
                if result.dataset_hash is None:
                    # Every kind's evidence names the exact data it measured, whether or not the kind
                    # fingerprints its own dataset format: the dataset given, else the generated data
                    # the kind read, else what generated its examples (which gives them again).
                    if dataset_dir:
                        result.dataset_hash = directory_fingerprint(dataset_dir)
                    elif generated:
                        result.dataset_hash = directories_fingerprint(generated)
                    else:
                        result.dataset_hash = generated_data_fingerprint(spec, checked, result.seed)
                return result
            # Only here, outside the except clause, has the error's traceback let go of the failed
            # attempt's frames, and with them its tensors.
            _release_device_memory()
            smaller = _halved(tried)
            if smaller is None:
                at = f" even with {_sizes(tried)}" if tried else " (it has no batch size to lower)"
                raise OutOfDeviceMemory(f"{name} ran out of {device} memory{at}; the model does not fit this device "
                                        f"next to what else runs on it ({reason})")
            failed.append(tried)
            progress(0.0, f"out of {device} memory at {_sizes(tried)}; starting again at {_sizes(smaller)}")
            checked = checked.model_copy(update=smaller)
    finally:
        _model_loader.reset(token)


def plan_memory(spec: kind_registry.KindSpec, params: kind_registry.KindParams, model_dir: str, device: str,
                *, free_bytes: int | None = None) -> dict[str, Any] | None:
    """Before a CUDA run: batch sizes that fit the device's free memory (``memory.plan``), never
    larger than asked, as ``{"batch_sizes": ..., "requested": ..., estimates}``; raises
    :class:`OutOfDeviceMemory` with the estimate when the model cannot fit at all. ``None`` on a
    CPU, for a kind without batch sizes, or where the model's config cannot be read (the kind's own
    loading then says what is wrong). ``free_bytes`` overrides the device's free memory."""
    if not device.startswith("cuda") or not spec.batch_params:
        return None
    from workers.probes import memory

    try:
        footprint = memory.footprint_of(model_dir)
    except (OSError, ValueError, KeyError):
        return None
    requested = {key: int(getattr(params, key)) for key in spec.batch_params}
    free = memory.device_free_bytes(device) if free_bytes is None else free_bytes
    planned = memory.plan(footprint, requested, spec.batch_backward, free_bytes=free, element_bytes=4)
    if not planned.fits:
        raise OutOfDeviceMemory(f"{spec.name}: {planned.refusal(device)}")
    return {**planned.as_dict(), "requested": requested, "device": device, "parameters": footprint.parameters}


def directory_fingerprint(path: str) -> str:
    """SHA-256 over every file below ``path`` (relative name and content digest, in sorted order)."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with file.open("rb") as handle:
            content = hashlib.sha256()
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                content.update(chunk)
        digest.update(content.digest())
    return digest.hexdigest()


def directories_fingerprint(paths: Sequence[str | os.PathLike[str]]) -> str:
    """SHA-256 of several datasets: one directory's :func:`directory_fingerprint`, or of their
    fingerprints in the given order."""
    if len(paths) == 1:
        return directory_fingerprint(str(paths[0]))
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(directory_fingerprint(str(path))))
    return digest.hexdigest()


def generated_data_fingerprint(spec: kind_registry.KindSpec, params: kind_registry.KindParams,
                               seed: int | None) -> str:
    """SHA-256 naming the examples a kind generated itself (no dataset given): its generator (the kind
    function), its parameters and its seed, canonical JSON. Batch sizes are left out: they change how
    the examples are processed, not which examples are made. With the run's code version, this is
    what regenerates the same data."""
    import hashlib
    import json

    settings = {key: value for key, value in params.model_dump(mode="json").items() if key not in spec.batch_params}
    identity = {"generator": f"{spec.run.__module__}.{spec.run.__qualname__}", "kind": spec.name,
                "params": settings, "seed": seed}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _halved(sizes: dict[str, Any]) -> dict[str, int] | None:
    """Every batch size halved (at least 1), or ``None`` when all are 1 already (or there are none)."""
    if not sizes or all(size <= 1 for size in sizes.values()):
        return None
    return {key: max(1, size // 2) for key, size in sizes.items()}


def _sizes(sizes: dict[str, Any]) -> str:
    return ", ".join(f"{key}={size}" for key, size in sizes.items())


def _release_device_memory() -> None:
    """Collect what the failed attempt left in reference cycles and hand the allocator's cached
    blocks back to the driver, so the next attempt starts from the model's own footprint."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

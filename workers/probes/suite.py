"""Probe kinds: the units of work an audit case plans and a worker runs.

Each probe family registers one or more *kinds* here with ``@probe_kind("name")``. A kind is a
plain function (no Django, no Celery)::

    fn(model_dir: str, dataset_dir: str | None, params: dict, *, device: str,
       progress: Progress) -> ProbeResult

- ``model_dir``: a local Hugging Face-format directory (already verified by the caller). Load it
  with ``suite.load_model(model_dir, device)`` (not ``load_adapter`` directly) so that a worker can
  serve repeated loads of the same model from its cache.
- ``dataset_dir``: a dataset in the grounding format (``annotations.jsonl``) or a concepts folder,
  as the kind documents; ``None`` lets the kind use its own zoo default where it has one.
- ``params``: JSON parameters from the case's probe plan (validate them; unknown keys are an error).
- ``progress(fraction, phase)``: call it as work advances (0..1) so runs show progress.

A kind whose parameters include batch sizes declares them with its defaults,
``@probe_kind("name", batch_params={"batch_size": 16})``: when a GPU runs out of memory, ``run``
starts the kind again with them halved (see ``run``).

The command line (``workers/probes/commands``) and the Celery tasks (``workers/tasks.py``) both call
these functions, so the evidence in a report is exactly what the CLI prints.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

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


ProbeKind = Callable[..., ProbeResult]


def _default_loader(model_dir: str, device: str) -> Any:
    from workers.probes.adapters import load_adapter

    return load_adapter(model_dir, device=device)


_model_loader: Callable[[str, str], Any] = _default_loader


def load_model(model_dir: str, device: str = "cpu") -> Any:
    """Load the adapter for ``model_dir``; probe kinds call this instead of ``load_adapter``."""
    return _model_loader(model_dir, device)


def set_model_loader(loader: Callable[[str, str], Any] | None) -> None:
    """Install a (caching) loader; ``None`` restores the default. Used by ``workers/tasks.py``."""
    global _model_loader
    _model_loader = loader or _default_loader

# Modules that define probe kinds; a family adds its module name here once.
KIND_MODULES = [
    "workers.probes.grounding_suite",
    "workers.probes.tcav",
    "workers.probes.shortcut",
    "workers.probes.robustness",
    "workers.probes.token_attribution",
    "workers.probes.attention_stats",
    "workers.probes.interventions",
    "workers.probes.selftest",
]

_KINDS: dict[str, ProbeKind] = {}
_BATCH_PARAMS: dict[str, dict[str, int]] = {}


def probe_kind(name: str, *, batch_params: dict[str, int] | None = None) -> Callable[[ProbeKind], ProbeKind]:
    """Register a kind. ``batch_params``: the parameters that only size its batches, with the kind's
    defaults (e.g. ``{"batch_size": 16}``); :func:`run` halves them when a GPU runs out of memory.
    Declare only parameters the results do not depend on (beyond float rounding)."""
    def decorator(fn: ProbeKind) -> ProbeKind:
        _KINDS[name] = fn
        _BATCH_PARAMS[name] = dict(batch_params or {})
        return fn

    return decorator


def _load_all() -> None:
    for module in KIND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def kinds() -> list[str]:
    _load_all()
    return sorted(_KINDS)


def get_kind(name: str) -> ProbeKind:
    _load_all()
    try:
        return _KINDS[name]
    except KeyError:
        raise ProbeInputError(f"unknown probe kind {name!r}; available: {', '.join(kinds())}") from None


def run(name: str, model_dir: str, dataset_dir: str | None = None, params: dict[str, Any] | None = None, *,
        device: str = "cpu", progress: Progress = no_progress) -> ProbeResult:
    """Run probe kind ``name``; raises ``ProbeInputError`` for bad input.

    Memory backoff: a GPU shared with other work, or a model larger than the plan's batch sizes
    assumed, runs out of memory part-way. Failing the run would make the submitter guess smaller
    batch sizes and start again, so the kind runs again from the start with its ``batch_params``
    halved, down to 1; the sizes that fitted are recorded in ``metrics["memory_backoff"]``. Only
    when even batches of 1 do not fit does it raise :class:`OutOfDeviceMemory`."""
    import torch

    kind = get_kind(name)
    params = dict(params or {})
    for key in _BATCH_PARAMS[name].keys() & params.keys():
        # Checked here for every kind alike: a plan's "batch_size": 0 or "8" would otherwise reach
        # range() or int() inside the kind and fail with Python's words, not ours.
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbeInputError(f"{name}: {key} must be an integer >= 1, got {value!r}")
    failed: list[dict[str, Any]] = []
    while True:
        tried = {key: params.get(key, default) for key, default in _BATCH_PARAMS[name].items()}
        try:
            result = kind(model_dir, dataset_dir, dict(params), device=device, progress=progress)
        except torch.OutOfMemoryError as exc:
            reason = (str(exc).splitlines() or ["out of memory"])[0]
        else:
            if failed:
                result.metrics["memory_backoff"] = {"device": device, "batch_params": tried, "out_of_memory_at": failed}
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
        params.update(smaller)


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

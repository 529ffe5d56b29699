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

The command line (``workers/probes/commands``) and the Celery tasks (``workers/tasks.py``) both call
these functions, so the evidence in a report is exactly what the CLI prints.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


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


def probe_kind(name: str) -> Callable[[ProbeKind], ProbeKind]:
    def decorator(fn: ProbeKind) -> ProbeKind:
        _KINDS[name] = fn
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
        from workers.probes.errors import ProbeInputError

        raise ProbeInputError(f"unknown probe kind {name!r}; available: {', '.join(kinds())}") from None


def run(name: str, model_dir: str, dataset_dir: str | None = None, params: dict[str, Any] | None = None, *,
        device: str = "cpu", progress: Progress = no_progress) -> ProbeResult:
    """Run probe kind ``name``; raises ``ProbeInputError`` for bad input."""
    return get_kind(name)(model_dir, dataset_dir, dict(params or {}), device=device, progress=progress)

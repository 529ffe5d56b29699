"""Turning a probe's result into stored, immutable evidence.

A :class:`workers.probes.suite.ProbeResult` holds metrics, figures (matplotlib) and arrays. Here they
become one :class:`~governance.models.Evidence` row with :class:`~governance.models.EvidenceArtifact`
files (PNG figures, ``.npy`` arrays, ``metrics.json``), each with its SHA-256, written in the same
transaction as the run's status change and its audit event. The run is marked finished last, which
is what makes the evidence immutable (see ``Evidence.save``).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from governance import audit_log
from governance.canonical import canonical_json
from governance.models import Evidence, EvidenceArtifact, ProbeRun

# Deterministic PNGs: no creation time or software version in the file, so the same figure has the
# same SHA-256 on every run (reports are rendered byte-identically from these files).
PNG_METADATA = {"Software": None}
FIGURE_DPI = 110


class AlreadyRecorded(Exception):
    """The run already has evidence (a redelivered task): nothing was written."""


def json_safe(value: Any) -> Any:
    """Metrics as plain JSON: numpy scalars and arrays become Python values, NaN/inf become ``None``
    (JSON has no NaN, and a digest over "NaN" would differ between serialisers)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def figure_png(figure: Any) -> bytes:
    """A matplotlib figure as deterministic PNG bytes (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def array_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "artifact"
    return cleaned[:120]


def record_result(run_id: int, result: Any, provenance: dict[str, Any]) -> Evidence:
    """Store ``result`` as the evidence of run ``run_id`` and mark the run succeeded.

    ``provenance`` holds ``device``, ``model_manifest_hash``, ``dataset_hash``, ``code_version``,
    ``seed`` and ``library_versions``. Raises :class:`AlreadyRecorded` if the run already has evidence
    (the task was delivered twice), leaving the first set untouched.
    """
    metrics = json_safe(result.metrics)
    findings = [f.as_dict() if hasattr(f, "as_dict") else dict(f) for f in result.findings]
    # Render outside the transaction: figures take time, and nobody should wait on the run's lock.
    files: list[tuple[str, bytes, str]] = [("metrics.json", canonical_json(metrics), "application/json")]
    for name, figure in sorted(result.figures.items()):
        files.append((f"{_safe_name(name)}.png", figure_png(figure), "image/png"))
    for name, array in sorted(result.arrays.items()):
        files.append((f"{_safe_name(name)}.npy", array_npy(array), "application/x-npy"))

    with transaction.atomic():
        run = ProbeRun.objects.select_for_update().get(pk=run_id)
        if Evidence.objects.filter(run_id=run_id).exists():
            raise AlreadyRecorded(f"run #{run_id} already has evidence")
        evidence = Evidence.objects.create(run=run, kind=run.kind, metrics=metrics, summary=result.summary or "",
                                           findings=findings)
        for name, content, content_type in files:
            EvidenceArtifact.from_bytes(evidence, name, content, content_type)
        run.status = ProbeRun.Status.SUCCEEDED
        run.progress = 1.0
        run.phase = "done"
        run.finished_at = timezone.now()
        run.error = ""
        run.seed = result.seed if result.seed is not None else provenance.get("seed")
        run.dataset_hash = result.dataset_hash or provenance.get("dataset_hash", "")
        for field in ("device", "model_manifest_hash", "code_version", "library_versions"):
            setattr(run, field, provenance.get(field, getattr(run, field)))
        run.save()
        audit_log.record(None, "evidence.recorded", evidence, {
            "run": run.pk, "kind": run.kind, "artifacts": {name: EvidenceArtifact.objects.get(
                evidence=evidence, name=name).sha256 for name, _, _ in files},
            "findings": len(findings), "device": run.device,
        })
    return evidence


def metrics_json(evidence: Evidence) -> str:
    """Pretty JSON of an evidence item's metrics (for people; digests use canonical JSON)."""
    return json.dumps(evidence.metrics, indent=2, sort_keys=True)

"""Turning a probe's result into stored, immutable evidence.

A :class:`workers.probes.suite.ProbeResult` holds metrics, figures (matplotlib) and arrays. Here they
become one :class:`~governance.models.Evidence` row with :class:`~governance.models.EvidenceArtifact`
files (PNG figures, ``.npy`` arrays, ``metrics.json``), each with its SHA-256, written in the same
transaction as the run's status change and its audit event. The run is marked finished last, which
is what makes the evidence immutable (see ``Evidence.save``).

It also defines the *content digest* of every row the log vouches for (evidence, sign-offs, reports,
countersignatures): the RFC 8785 digest of the row's content (:func:`content_of`). The audit event
that records a row carries it as ``content_digest``; :func:`ledger_problems` recomputes every current
row's digest against the first event that recorded it, so a direct database edit of a row is found
(``manage.py verify_audit_log``) and no report is issued from it (:func:`unbound_case_rows`).
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
from governance.canonical import canonical_json, digest
from governance.models import AuditEvent, Evidence, EvidenceArtifact, ImmutableError, ProbeRun, Report, Signoff

# Deterministic PNGs: no creation time or software version in the file, so the same figure has the
# same SHA-256 on every run (reports are rendered byte-identically from these files).
PNG_METADATA = {"Software": None}
FIGURE_DPI = 110


MAX_EXACT_INT = 2**53 - 1

# The audit event that records each kind of row, keyed by the row's model name (AuditEvent.object_type).
RECORDING_ACTIONS = {"evidence": "evidence.recorded", "signoff": "signoff.created", "report": "report.issued",
                     "countersignature": "report.countersigned"}
BACKFILL_ACTION = "integrity.digest_backfilled"  # rows recorded before events carried digests (0005_i19)


class DigestMismatch(ImmutableError):
    """A row differs from the content digest the audit log recorded for it (it was changed in the
    database after it was recorded), or the log never recorded it. Nothing may be issued from it."""


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
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_EXACT_INT:
        return str(value)  # RFC 8785 (I-JSON) numbers are doubles: keep big integers exact as text
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def figure_png(figure: Any) -> bytes:
    """A matplotlib figure as deterministic PNG bytes (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    from workers.probes.captions import png_metadata

    buffer = io.BytesIO()
    # The probe's words for what the figure shows travel inside the PNG: the report captions it from them.
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={**PNG_METADATA, **png_metadata(figure)},
                   bbox_inches="tight")
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
        log_recorded(evidence)
    return evidence


def log_recorded(evidence: Evidence, actor=None) -> None:
    """Write the ``evidence.recorded`` event for a finished run's evidence, with its content digest.
    Call it in the transaction that finishes the run."""
    run = evidence.run
    audit_log.record(actor, "evidence.recorded", evidence, {
        "run": run.pk, "kind": run.kind,
        "artifacts": {a.name: a.sha256 for a in EvidenceArtifact.objects.filter(evidence=evidence).order_by("name")},
        "findings": len(evidence.findings or []), "device": run.device, "content_digest": content_digest(evidence),
    })


# --- content digests --------------------------------------------------------------------------

def _iso(value) -> str | None:
    return value.isoformat() if value else None


def evidence_content(evidence: Evidence) -> dict[str, Any]:
    """An evidence row's content as the manifest lists it (the manifest entry without its ``digest``)."""
    artifacts = [{"id": a.pk, "name": a.name, "content_type": a.content_type, "sha256": a.sha256, "size": a.size}
                 for a in sorted(evidence.artifacts.all(), key=lambda a: (a.name, a.pk))]
    return {"id": evidence.pk, "run_id": evidence.run_id, "kind": evidence.kind, "metrics": evidence.metrics,
            "summary": evidence.summary, "findings": evidence.findings, "artifacts": artifacts,
            "created_at": _iso(evidence.created_at)}


def signoff_content(signoff: Signoff) -> dict[str, Any]:
    return {"id": signoff.pk, "case_id": signoff.case_id, "reviewer_id": signoff.reviewer_id,
            "decision": signoff.decision, "comment": signoff.comment, "digest": signoff.digest,
            "review_round": signoff.review_round, "evidence_id": signoff.evidence_id,
            "report_section": signoff.report_section, "created_at": _iso(signoff.created_at)}


def report_content(report: Report) -> dict[str, Any]:
    return {"id": report.pk, "case_id": report.case_id, "version": report.version, "sha256": report.sha256,
            "manifest_sha256": digest(report.manifest), "author_id": report.author_id,
            "supersedes": report.supersedes.version if report.supersedes is not None else None,
            "changelog": report.changelog, "created_at": _iso(report.created_at)}


def countersignature_content(countersignature) -> dict[str, Any]:
    return {"id": countersignature.pk, "report_id": countersignature.report_id,
            "reviewer_id": countersignature.reviewer_id, "sha256": countersignature.sha256,
            "previous_sha256": countersignature.previous_sha256, "cert_sha256": countersignature.cert_sha256,
            "sequence": countersignature.sequence, "created_at": _iso(countersignature.created_at)}


def content_of(obj) -> dict[str, Any]:
    name = obj._meta.model_name
    if name == "evidence":
        return evidence_content(obj)
    if name == "signoff":
        return signoff_content(obj)
    if name == "report":
        return report_content(obj)
    if name == "countersignature":
        return countersignature_content(obj)
    raise TypeError(f"no content digest is defined for {name}")


def content_digest(obj) -> str:
    """The RFC 8785 digest of a row's content (what its recording audit event carries)."""
    return digest(content_of(obj))


def _bound_models():
    from governance.models import Countersignature

    return {"evidence": Evidence, "signoff": Signoff, "report": Report, "countersignature": Countersignature}


def recorded_digests(object_type: str, ids: list[str] | None = None) -> dict[str, tuple[int, str | None]]:
    """``{object_id: (seq, content_digest)}`` from the first event that recorded each row with a digest
    (its recording event, or for older rows the migration's backfill event)."""
    events = AuditEvent.objects.filter(object_type=object_type,
                                       action__in=[RECORDING_ACTIONS[object_type], BACKFILL_ACTION])
    if ids is not None:
        events = events.filter(object_id__in=ids)
    found: dict[str, tuple[int, str | None]] = {}
    for object_id, seq, payload in events.order_by("seq").values_list("object_id", "seq", "payload"):
        try:
            value = json.loads(payload).get("content_digest")
        except (ValueError, AttributeError):
            value = None
        if object_id not in found or found[object_id][1] is None:
            found[object_id] = (seq, value)
    return found


def _row_problems(object_type: str, rows) -> list[str]:
    rows = list(rows)
    recorded = recorded_digests(object_type, [str(r.pk) for r in rows])
    problems = []
    for row in rows:
        label = f"{object_type} #{row.pk}" + (f" ({row.kind}, run #{row.run_id})" if object_type == "evidence" else "")
        seq, logged = recorded.get(str(row.pk), (None, None))
        if logged is None:
            where = (f"its {RECORDING_ACTIONS[object_type]} event (seq {seq}) carries no content digest" if seq
                     else f"no {RECORDING_ACTIONS[object_type]} event records it")
            problems.append(f"{label}: not bound to the audit log: {where}")
            continue
        current = content_digest(row)
        if current != logged:
            problems.append(f"{label}: its content digest is {current[:16]}... but the audit log recorded "
                            f"{logged[:16]}... at seq {seq}: the row was changed after it was recorded")
    return problems


def ledger_problems() -> list[str]:
    """Recompute the content digest of every evidence, sign-off, report and countersignature row
    against the audit log. Returns one sentence per row that differs or is not bound."""
    problems: list[str] = []
    for object_type, model in _bound_models().items():
        queryset = model.objects.order_by("pk")
        if object_type == "evidence":
            queryset = queryset.select_related("run").prefetch_related("artifacts")
        for start in range(0, queryset.count(), 500):
            problems += _row_problems(object_type, queryset[start:start + 500])
    return problems


def unbound_case_rows(case) -> list[str]:
    """:func:`ledger_problems` for the evidence and sign-offs of one case (what a report would state)."""
    evidence = (Evidence.objects.filter(run__case=case).select_related("run").prefetch_related("artifacts")
                .order_by("pk"))
    signoffs = Signoff.objects.filter(case=case).order_by("pk")
    return _row_problems("evidence", evidence) + _row_problems("signoff", signoffs)


def metrics_json(evidence: Evidence) -> str:
    """Pretty JSON of an evidence item's metrics (for people; digests use canonical JSON)."""
    return json.dumps(evidence.metrics, indent=2, sort_keys=True)

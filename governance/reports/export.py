"""The export bundle of a case: one zip a provider can hand to a notified body.

Contents::

    README.txt                     what is inside and how to check it
    SHA256SUMS                     SHA-256 of every other file in the bundle
    report/<latest report>.pdf     the latest issued report (signed if signing is configured)
    manifest.json                  that report's manifest (also embedded in the PDF)
    evidence/run-<id>-<kind>/...   every evidence artifact, byte for byte as stored
    model-card/README.md           the model card in Hugging Face format (YAML metadata + sections)
    audit-log.json                 every audit-log row about the case, with prev/row hashes

Entries are sorted and dated from the case state, so the same state gives the same zip.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from typing import Any

from governance.models import AuditCase, EvidenceArtifact
from governance.reports import manifest as mf
from governance.reports.versions import latest


def _model_card(case: AuditCase) -> str:
    from governance.modelcard import export_card

    return export_card(case.model_version)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:40]


def build_bundle(case: AuditCase) -> bytes:
    from governance import audit_log

    report = latest(case)
    files: dict[str, bytes] = {}
    notes = []
    if report is not None:
        with report.pdf.open("rb") as handle:
            files[f"report/loupe-case-{case.pk}-report-v{report.version}.pdf"] = handle.read()
        manifest = report.manifest
        files["manifest.json"] = mf.manifest_bytes(manifest)
    else:
        manifest = mf.build_manifest(case, version=0)
        files["manifest-unreported.json"] = mf.manifest_bytes(manifest)
        notes.append("No report has been issued for this case yet; manifest-unreported.json describes the "
                     "current case state and is not signed or embedded in any report.")
    artifacts = EvidenceArtifact.objects.filter(evidence__run__case=case).select_related("evidence__run")
    for artifact in artifacts.order_by("evidence__run_id", "name"):
        with artifact.file.open("rb") as handle:
            content = handle.read()
        if hashlib.sha256(content).hexdigest() != artifact.sha256:
            notes.append(f"WARNING: artifact #{artifact.pk} {artifact.name} no longer matches its recorded SHA-256.")
        run = artifact.evidence.run
        files[f"evidence/run-{run.pk}-{_slug(run.kind)}/{artifact.name}"] = content
    files["model-card/README.md"] = _model_card(case).encode("utf-8")
    rows = audit_log.excerpt(case)
    problems = audit_log.verify_rows(rows) if hasattr(audit_log, "verify_rows") else []
    # An excerpt is not contiguous: "deleted"/"inserted" gaps between case rows are expected; only
    # a row whose own hashes fail is a problem inside the excerpt.
    own = [str(p) for p in problems if p.kind == "modified"]
    files["audit-log.json"] = json.dumps({"case": case.pk, "rows": rows, "rows_with_bad_hashes": own},
                                         indent=1, sort_keys=True, default=str).encode("utf-8")
    readme = [
        f"Loupe export bundle of audit case #{case.pk}: {case.title}",
        f"Model: {case.model_version.ai_model.name} {case.model_version.version}",
        f"Latest report: v{report.version} (SHA-256 {report.sha256})" if report else "Latest report: none issued",
        "",
        "Check the report:   python manage.py verify_report report/<file>.pdf",
        "Check the files:    sha256sum -c SHA256SUMS",
        "The audit-log rows carry payload_hash, prev_hash and row_hash; governance.audit_log.verify_rows()",
        "recomputes each row's hashes without database access.",
        "",
        *notes,
    ]
    files["README.txt"] = "\n".join(readme).encode("utf-8")
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(body).hexdigest()}  {name}\n"
                                  for name, body in sorted(files.items())).encode("ascii", "replace")
    stamp = dt.datetime.fromisoformat(manifest["as_of"]).astimezone(dt.UTC)
    date_time = (max(stamp.year, 1980), stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    return buffer.getvalue()


def bundle_filename(case: AuditCase) -> str:
    return f"loupe-case-{case.pk}-export.zip"


__all__: list[Any] = ["build_bundle", "bundle_filename"]

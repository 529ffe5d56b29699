"""A case ready for review with real evidence: heatmap PNGs rendered by matplotlib, metric tables,
findings of every severity. Shared by ``test_admin_review.py`` (test client) and ``test_browser.py``
(Playwright).

The actors come from ``conftest.py``; the admin needs ``is_staff``, so :func:`admit` grants it
(``audit_demo`` does the same for its reviewers, auditors and admins).
"""

from __future__ import annotations

import io

import numpy as np
from django.utils import timezone

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def heatmap_png(seed: int, size: int = 24) -> bytes:
    """A small relevance heatmap over a synthetic image, as a PNG (what grounding probes store)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    relevance = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2)) + 0.05 * rng.random((size, size))
    fig, ax = plt.subplots(figsize=(2.4, 2.4), dpi=80)
    ax.imshow(rng.random((size, size)), cmap="gray")
    ax.imshow(relevance, cmap="jet", alpha=0.55)
    ax.set_title(f"chefer, image {seed}", fontsize=8)
    ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def admit(*users) -> None:
    """Give ``users`` staff status: the gate to the admin (the roles decide everything after it)."""
    for user in users:
        user.is_staff = True
        user.save(update_fields=["is_staff"])


def make_review_case(draft_case, *, alice, ada, rita, rob, summary: str = "Relevance lands on the prompted object."):
    """``draft_case`` walked to ``evidence_ready`` with one grounding run: two heatmaps, a CSV, metrics
    (scalars and a per-method table) and findings of several severities. Returns (case, evidence)."""
    from governance import workflow
    from governance.evidence import log_recorded
    from governance.models import Evidence, EvidenceArtifact, ProbeRun

    workflow.assign_reviewers(draft_case, [rita, rob], by=ada)
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case)
    run = ProbeRun.objects.create(case=draft_case, kind=draft_case.probe_plan[0]["kind"], params={"n": 3},
                                  status=ProbeRun.Status.RUNNING, started_at=timezone.now(), seed=0, device="cpu",
                                  model_manifest_hash=draft_case.model_version.manifest_hash, code_version="test")
    evidence = Evidence.objects.create(
        run=run, kind="grounding", summary=summary,
        metrics={"pointing_game": 0.81, "deletion_auc": 0.123, "n_images": 8,
                 "methods": [{"method": "chefer", "pointing_game": 0.81, "insertion_auc": 0.64},
                             {"method": "gradcam", "pointing_game": 0.55, "insertion_auc": 0.41}]},
        findings=[{"severity": "low", "title": "Slight colour bias", "detail": "Red objects score higher."},
                  {"severity": "high", "title": "Shortcut on watermark", "detail": "Relevance on the corner logo."},
                  {"severity": "info", "title": "Sanity checks passed", "detail": ""}])
    EvidenceArtifact.from_bytes(evidence, "heatmap-grid.png", heatmap_png(1), "image/png")
    EvidenceArtifact.from_bytes(evidence, "heatmap-chefer-0.png", heatmap_png(2), "image/png")
    EvidenceArtifact.from_bytes(evidence, "scores.csv", b"image,score\n1,0.8\n", "text/csv")
    run.status = ProbeRun.Status.SUCCEEDED
    run.progress = 1.0
    run.phase = "done"
    run.finished_at = timezone.now()
    run.save()
    log_recorded(evidence)  # bound to the audit log by its content digest, as record_result does
    workflow.mark_evidence_ready(draft_case)
    return draft_case, evidence


def make_second_version(acme_model, kind: str, *, alice, ada, reviewers):
    """Version 2.0 of ``acme_model`` (hostile model details, no limitations) with a case of its own,
    reviewed by ``reviewers``, whose grounding evidence no longer has the watermark finding."""
    from governance import workflow
    from governance.models import AuditCase, ModelVersion
    from tests.actors import finish_run_with_evidence

    version = ModelVersion(ai_model=acme_model, version="2.0", source=ModelVersion.Source.HUB,
                           hub_id="acme/clip-tiny", hub_revision="c" * 40, model_details=HOSTILE,
                           intended_uses="Tagging product photos.", created_by=alice)
    version.set_manifest({"config.json": "3" * 64, "model.safetensors": "4" * 64})
    version.save()
    case = AuditCase.objects.create(model_version=version, title="Acme CLIP 2.0 audit", created_by=alice,
                                    probe_plan=[{"kind": kind, "params": {"n": 3}}])
    workflow.assign_reviewers(case, reviewers, by=ada)
    workflow.submit(case, by=alice)
    workflow.start_runs(case)
    finish_run_with_evidence(case, kind="grounding")
    workflow.mark_evidence_ready(case)
    return version

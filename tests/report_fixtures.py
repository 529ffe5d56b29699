"""Audit cases with evidence, artifacts and sign-offs for the report tests and benchmark.

Until the pipeline stores real evidence everywhere, these build the rows directly, shaped like the
probes' output (``workers/probes``): metrics JSON, findings, PNG figures stored through Django's
storage with their SHA-256. Actors: Priya (provider/submitter), Rita and Ravi (reviewers).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io

import numpy as np
from django.contrib.auth import get_user_model
from django.utils import timezone

from governance.models import (AIModel, AuditCase, Evidence, EvidenceArtifact, ModelVersion, Organisation,
                               ProbeRun, Signoff)
from governance.reports import figures

ALL_KINDS = ("grounding", "sanity", "tcav", "shortcut", "robustness", "token_attribution", "attention", "intervention")
T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


def heatmap_grid_png(seed: int, size: int = 12) -> bytes:
    """A small stored "heatmap grid" figure, as a probe would store it."""
    rng = np.random.default_rng(seed)
    return figures.heatmap(f"heatmap grid {seed}", rng.random((size, size)))


def metrics_for(kind: str, seed: int) -> tuple[dict, list[dict], str]:
    rng = np.random.default_rng(seed)
    r = lambda: round(float(rng.random()), 4)  # noqa: E731
    xs = [i / 10 for i in range(11)]
    if kind == "grounding":
        return ({"methods": {m: {"deletion_auc": r(), "insertion_auc": r(), "pointing_game": r()}
                             for m in ("chefer", "gradcam", "rollout", "occlusion")},
                 "curves": {f"{m} deletion": {"x": xs, "y": sorted((r() for _ in xs), reverse=True)}
                            for m in ("chefer", "gradcam")},
                 "method_disagreement": {"mean_rank_correlation": r()}, "images": 64},
                [{"severity": "medium", "title": "Rollout is barely better than random on deletion",
                  "detail": "deletion AUC close to the random baseline"}], "Chefer relevance is the most faithful method.")
    if kind == "sanity":
        return ({"layers": [{"layer": i, "ssim": r(), "rank_correlation": r()} for i in range(6)], "passed": True},
                [], "All methods change under cascading randomisation.")
    if kind == "tcav":
        results = [{"concept": c, "layer": 4, "tcav_score": r(), "tcav_score_std": 0.05, "p_value": r() / 10,
                    "p_adjusted": r() / 5, "significant": True, "random_score": 0.5, "cav_accuracy": 0.9}
                   for c in ("watermark", "stripes", "red")]
        return ({"target": "cat", "alpha": 0.05, "correction": "holm", "results": results},
                [{"severity": "high", "title": "Watermark concept drives 'cat' predictions",
                  "detail": "TCAV 0.93, corrected p=0.001"}], "The watermark concept is significant.")
    if kind == "shortcut":
        return ({"shortcut": "corner watermark", "accuracy_with": 0.97, "accuracy_without": 0.61, "gap": 0.36},
                [{"severity": "high", "title": "Shortcut: corner watermark", "detail": "accuracy drops by 36 points"}],
                "The model relies on a corner watermark.")
    if kind == "robustness":
        return ({"curves": {c: {"x": [1, 2, 3, 4, 5], "y": sorted((r() for _ in range(5)), reverse=True)}
                            for c in ("gaussian_noise", "blur", "jpeg", "typographic")},
                 "explanation_stability": {"mean_ssim": r()}, "clean_accuracy": 0.91},
                [{"severity": "low", "title": "Typographic attack lowers accuracy", "detail": ""}], "Mostly robust.")
    return ({"summary_value": r(), "per_layer": [r() for _ in range(8)]}, [], f"{kind} statistics recorded.")


def make_actors():
    User = get_user_model()
    users = {}
    for username, first, last in (("priya", "Priya", "Provider"), ("rita", "Rita", "Reviewer"),
                                  ("ravi", "Ravi", "Reviewer"), ("olga", "Olga", "Outsider")):
        users[username] = User.objects.get_or_create(username=username, defaults={"first_name": first,
                                                                                  "last_name": last})[0]
    return users


def make_case(*, kinds=ALL_KINDS, figures_per_evidence: int = 1, card_text: str | None = None,
              comment: str | None = None, signoffs: bool = True, title: str = "Demo audit") -> AuditCase:
    users = make_actors()
    org, _ = Organisation.objects.get_or_create(name="Acme Vision", slug="acme")
    ai_model, _ = AIModel.objects.get_or_create(
        organisation=org, name="acme-clip", defaults=dict(
            provider_name="Acme Vision GmbH", provider_contact="compliance@acme.example",
            intended_purpose=card_text or "Retrieve product photos from text queries in a web shop.",
            risk_category="limited"))
    manifest = {"config.json": hashlib.sha256(b"config").hexdigest(),
                "model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    version = ModelVersion(ai_model=ai_model, version=f"v{ModelVersion.objects.count() + 1}", source="path",
                           server_path="/nonexistent/zoo", architecture_family="dual_encoder",
                           model_details=card_text or "A tiny CLIP-like dual encoder trained on synthetic shapes.",
                           limitations=card_text or "Trained on synthetic data only.")
    version.set_manifest(manifest)
    version.save()
    case = AuditCase.objects.create(model_version=version, title=title, scope=card_text or "Full probe plan",
                                    created_by=users["priya"])
    case.reviewers.set([users["rita"], users["ravi"]])
    for index, kind in enumerate(kinds):
        add_evidence(case, kind, seed=index, figures_per_evidence=figures_per_evidence)
    _set_state(case, "in_review", submitted_by=users["priya"])
    if signoffs:
        add_signoff(case, users["rita"], "approve", comment or "Evidence is complete; shortcut finding accepted.")
        add_signoff(case, users["ravi"], "approve", comment or "Agree; see limitations.")
    return case


def _set_state(case: AuditCase, state: str, submitted_by=None) -> None:
    # Fixtures jump straight to a state; the real path is governance.workflow (tested elsewhere).
    case._workflow_transition = True
    case.state = state
    case.review_round = 1
    case.submitted_by = submitted_by
    case.submitted_at = T0
    case.state_changed_at = T0 + dt.timedelta(hours=1)
    case.save()
    case._workflow_transition = False


def add_evidence(case: AuditCase, kind: str, *, seed: int, figures_per_evidence: int = 1) -> Evidence:
    metrics, findings, summary = metrics_for(kind, seed)
    run = ProbeRun.objects.create(case=case, kind=kind, params={"seed": seed, "images": 64}, dataset="zoo/shapes",
                                  status=ProbeRun.Status.RUNNING, device="cpu", code_version="abc1234",
                                  dataset_hash=hashlib.sha256(b"zoo").hexdigest(), seed=seed,
                                  model_manifest_hash=case.model_version.manifest_hash,
                                  library_versions={"torch": "2.13.0"},
                                  started_at=T0 + dt.timedelta(minutes=seed), finished_at=T0 + dt.timedelta(minutes=seed, seconds=42))
    evidence = Evidence.objects.create(run=run, kind=kind, metrics=metrics, summary=summary, findings=findings)
    for n in range(figures_per_evidence):
        EvidenceArtifact.from_bytes(evidence, f"{kind}-grid-{n}.png", heatmap_grid_png(seed * 100 + n), "image/png")
    EvidenceArtifact.from_bytes(evidence, "values.npy", np.arange(4, dtype=np.float32).tobytes(), "application/octet-stream")
    run.status = ProbeRun.Status.SUCCEEDED
    run.save()
    return evidence


def add_signoff(case: AuditCase, reviewer, decision: str, comment: str) -> Signoff:
    return Signoff.objects.create(case=case, reviewer=reviewer, decision=decision, comment=comment,
                                  digest=hashlib.sha256(f"{case.pk}-{reviewer.pk}".encode()).hexdigest(),
                                  review_round=case.review_round)


def now() -> dt.datetime:
    return timezone.now()

"""Audit cases with evidence, artifacts and sign-offs for the report tests and benchmark.

Evidence rows are built directly, shaped like the probes' output (``workers/probes``): metrics
JSON, findings, PNG figures stored through Django's storage with their SHA-256. Tests drive the
case through the real workflow with the shared actors of ``tests/conftest.py`` (:func:`populate`);
the benchmark builds one without the workflow (:func:`make_standalone_case`).
"""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
from django.contrib.auth import get_user_model

from governance import audit_log
from governance.evidence import content_digest, log_recorded
from governance.models import (
    AIModel,
    AuditCase,
    Evidence,
    EvidenceArtifact,
    ModelVersion,
    Organisation,
    ProbeRun,
    Signoff,
)
from governance.reports import figures
from tests.actors import TEST_KIND, create_user

ALL_KINDS = ("grounding", "sanity", "tcav", "shortcut", "robustness", "token_attribution", "attention", "intervention")
T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


def heatmap_grid_png(seed: int, size: int = 12) -> bytes:
    """A small stored "heatmap grid" figure, as a probe would store it."""
    rng = np.random.default_rng(seed)
    return figures.heatmap(f"heatmap grid {seed}", rng.random((size, size)))


def probe_grid_png(seed: int, rows: int = 2) -> bytes:
    """An example grid drawn and stored as the grounding probe stores it (``workers.probes.figures``
    through ``governance.evidence.figure_png``): page-sized, with the probe's description inside."""
    from PIL import Image

    from governance.evidence import figure_png
    from workers.probes import figures as probe_figures

    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(rows)]
    maps = {m: [rng.random((8, 8)) for _ in range(rows)] for m in ("chefer", "gradcam", "rollout")}
    (page,) = probe_figures.heatmap_grid_pages(images, maps, boxes=[[(8, 8, 40, 40)]] * rows,
                                               row_titles=[f'"a red circle" (score 0.{k}5)' for k in range(rows)],
                                               rows="one example each, headed by its prompt and the model's score")
    return figure_png(page)


def metrics_for(kind: str, seed: int) -> tuple[dict, list[dict], str]:
    rng = np.random.default_rng(seed)
    r = lambda: round(float(rng.random()), 4)  # noqa: E731
    xs = [i / 10 for i in range(11)]
    if kind == "grounding":  # shaped like workers.probes.grounding_suite
        methods = [{"method": m, "pointing_game": r(), "energy_pointing_game": r(), "deletion_auc": r(),
                    "insertion_auc": r(), "random_pointing_game": 0.25, "random_deletion_auc": 0.4,
                    "random_insertion_auc": 0.4} for m in ("chefer", "gradcam", "rollout", "occlusion")]
        return ({"methods": methods, "n": 64, "steps": 16, "baseline": "mean",
                 "curves": {f"{m} deletion": {"x": xs, "y": sorted((r() for _ in xs), reverse=True)}
                            for m in ("chefer", "gradcam")},
                 "method_disagreement": {"mean_rank_correlation": r()}},
                [{"severity": "medium", "title": "Rollout is barely better than random on deletion",
                  "detail": "deletion AUC close to the random baseline"}],
                "Chefer relevance is the most faithful method.")
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
    if kind == "shortcut":  # shaped like workers.probes.shortcut: a TCAV report embedded under "tcav"
        tcav_rows = [{"concept": "watermark", "layer": layer, "tcav_score": 0.93, "tcav_score_std": 0.03,
                      "p_value": 0.0004, "p_adjusted": 0.001, "significant": True, "random_score": 0.5,
                      "cav_accuracy": 0.97} for layer in (2, 4)]
        return ({"target": "red circle", "concept": "watermark", "flagged": True, "tcav": tcav_rows,
                 "thresholds": {"alpha": 0.05, "min_effect": 0.1},
                 "shortcut": "corner watermark", "accuracy_with": 0.97, "accuracy_without": 0.61, "gap": 0.36},
                [{"severity": "high", "title": "Shortcut: corner watermark", "detail": "accuracy drops by 36 points"}],
                "The model relies on a corner watermark.")
    if kind == "robustness":  # shaped like workers.probes.robustness
        by_severity = dict(zip(("1", "3", "5"), sorted((r() for _ in range(3)), reverse=True), strict=True))
        return ({"n": 48, "clean_accuracy": 0.91, "mean_corruption_accuracy_by_severity": by_severity,
                 "accuracy_falls_monotonically": True, "explanation_stability": {"mean_ssim": r()},
                 "probes": [{"family": "corruption", "probe": p, "severity": sv, "accuracy": r()}
                            for p in ("gaussian_noise", "blur") for sv in (1, 3, 5)]},
                [{"severity": "low", "title": "Typographic attack lowers accuracy", "detail": ""}], "Mostly robust.")
    return ({"summary_value": r(), "per_layer": [r() for _ in range(8)]}, [], f"{kind} statistics recorded.")


def populate(case: AuditCase, *, submitter, reviewers, admin, kinds=ALL_KINDS, figures_per_evidence: int = 1,
             comment: str | None = None, approve: bool = True, probe_figures: bool = False) -> AuditCase:
    """Walk a draft ``case`` through the real workflow: reviewers assigned, submitted, one succeeded run
    with evidence per kind, evidence ready, and (``approve``) each reviewer's approval. ``probe_figures``:
    the evidence's figures are example grids as the probes draw them (see :func:`add_evidence`)."""
    from governance import workflow

    workflow.assign_reviewers(case, reviewers, by=admin)
    workflow.submit(case, by=submitter)
    workflow.start_runs(case)
    for index, kind in enumerate(kinds):
        add_evidence(case, kind, seed=index, figures_per_evidence=figures_per_evidence, probe_figures=probe_figures)
    workflow.mark_evidence_ready(case)
    if approve:
        from governance import acceptance

        for reviewer in reviewers:
            # Open high/medium findings need a reason each (the approval path refuses otherwise).
            reasons = {f["key"]: f"{reviewer.get_username()}: accepted for this synthetic scope ({f['title']})."
                       for f in acceptance.open_findings(case)}
            workflow.sign_off(case, reviewer, "approve", comment or f"{reviewer.get_username()}: evidence complete.",
                              acknowledgements=reasons)
    case.refresh_from_db()
    return case


def make_standalone_case(*, kinds=ALL_KINDS, figures_per_evidence: int = 1, title: str = "Benchmark audit"
                         ) -> AuditCase:
    """A case built without the workflow (for benchmarks and demos outside pytest)."""
    User = get_user_model()
    submitter = User.objects.get_or_create(username="bench-submitter", defaults={"first_name": "Priya"})[0]
    reviewers = [User.objects.get_or_create(username=f"bench-reviewer-{i}", defaults={"first_name": name})[0]
                 for i, name in enumerate(("Rina", "Ravi"))]
    org, _ = Organisation.objects.get_or_create(name="Bench Vision", slug="bench")
    ai_model, _ = AIModel.objects.get_or_create(
        organisation=org, name="bench-clip", defaults=dict(
            provider_name="Bench Vision GmbH", provider_contact="compliance@bench.example",
            intended_purpose="Retrieve product photos from text queries in a web shop.", risk_category="limited"))
    version = ModelVersion(ai_model=ai_model, version=f"v{ModelVersion.objects.count() + 1}", source="hub",
                           hub_id="bench/clip", hub_revision="c" * 40, architecture_family="dual_encoder",
                           model_details="A tiny CLIP-like dual encoder trained on synthetic shapes.",
                           limitations="Trained on synthetic data only.")
    version.set_manifest({"config.json": "1" * 64, "model.safetensors": "2" * 64})
    version.save()
    case = AuditCase.objects.create(model_version=version, title=title, scope="Full probe plan", created_by=submitter)
    case.reviewers.set(reviewers)
    for index, kind in enumerate(kinds):
        add_evidence(case, kind, seed=index, figures_per_evidence=figures_per_evidence)
    case._workflow_transition = True  # benchmarks skip the workflow (tested in test_workflow.py)
    case.state, case.review_round, case.submitted_by = "in_review", 1, submitter
    case.submitted_at = case.state_changed_at = T0
    case.save()
    for reviewer in reviewers:
        signoff = Signoff.objects.create(case=case, reviewer=reviewer, decision="approve", comment="Evidence complete.",
                                         digest=hashlib.sha256(reviewer.username.encode()).hexdigest(), review_round=1)
        audit_log.record(reviewer, "signoff.created", signoff, {"content_digest": content_digest(signoff)})
    return case


def add_evidence(case: AuditCase, kind: str, *, seed: int, figures_per_evidence: int = 1,
                 probe_figures: bool = False) -> Evidence:
    """One succeeded run of ``kind`` with its evidence: metrics shaped like the probe's, and
    ``figures_per_evidence`` figures, small stand-ins or (``probe_figures``) page-sized example grids
    as the probes store them."""
    metrics, findings, summary = metrics_for(kind, seed)
    run = ProbeRun.objects.create(case=case, kind=kind, params={"seed": seed, "images": 64}, dataset="zoo/shapes",
                                  status=ProbeRun.Status.RUNNING, device="cpu", code_version="abc1234",
                                  dataset_hash=hashlib.sha256(b"zoo").hexdigest(), seed=seed,
                                  model_manifest_hash=case.model_version.manifest_hash,
                                  library_versions={"torch": "2.13.0"},
                                  started_at=T0 + dt.timedelta(minutes=seed),
                                  finished_at=T0 + dt.timedelta(minutes=seed, seconds=42))
    evidence = Evidence.objects.create(run=run, kind=kind, metrics=metrics, summary=summary, findings=findings)
    for n in range(figures_per_evidence):
        if probe_figures:
            EvidenceArtifact.from_bytes(evidence, f"{kind}-examples-{n}.png", probe_grid_png(seed * 100 + n),
                                        "image/png")
        else:
            EvidenceArtifact.from_bytes(evidence, f"{kind}-grid-{n}.png", heatmap_grid_png(seed * 100 + n),
                                        "image/png")
    EvidenceArtifact.from_bytes(evidence, "values.npy", np.arange(4, dtype=np.float32).tobytes(),
                                "application/octet-stream")
    run.status = ProbeRun.Status.SUCCEEDED
    run.save()
    log_recorded(evidence)  # as governance.evidence.record_result does: bound to the log by its digest
    return evidence


def acme_case(kinds, *, approve=True, comment=None, card=None, probe_figures=False):
    """Acme's CLIP 1.0 case with its actors (created here, for module-scoped fixtures that cannot use the
    function-scoped ones of ``tests/conftest.py``), evidence of ``kinds`` and the sign-offs."""
    acme = Organisation.objects.create(name="Acme Vision", slug="acme")
    alice = create_user("alice", "submitter", acme)
    rita, rob = create_user("rita", "reviewer"), create_user("rob", "reviewer")
    ada = create_user("ada", "admin", is_staff=True)
    model = AIModel.objects.create(organisation=acme, name="Acme CLIP", provider_name="Acme Vision GmbH",
                                   provider_contact="ai@acme.example", risk_category="limited",
                                   intended_purpose=card or "Zero-shot product photo tagging for an online shop.")
    version = ModelVersion(ai_model=model, version="1.0", source="hub", hub_id="acme/clip-tiny",
                           hub_revision="a" * 40, architecture_family="dual_encoder",
                           model_details=card or "A tiny CLIP.", intended_uses="Tagging product photos.",
                           limitations=card or "Synthetic training data.")
    version.set_manifest({"config.json": "1" * 64, "model.safetensors": "2" * 64})
    version.save()
    case = AuditCase.objects.create(model_version=version, title="Acme CLIP 1.0 audit", scope="Full plan.",
                                    probe_plan=[{"kind": TEST_KIND, "params": {}}], created_by=alice)
    populate(case, submitter=alice, reviewers=[rita, rob], admin=ada, kinds=kinds, approve=approve, comment=comment,
             probe_figures=probe_figures)
    return case, {"alice": alice, "rita": rita, "rob": rob, "ada": ada}

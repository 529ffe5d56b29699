"""The data model: validation, constraints, and records that can never be silently changed."""

from __future__ import annotations

import hashlib

import pytest
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError

from governance import workflow
from governance.models import (
    AIModel,
    Evidence,
    EvidenceArtifact,
    ImmutableError,
    ModelVersion,
    ProbeRun,
    Report,
    Signoff,
    manifest_hash,
    validate_probe_plan,
)
from tests.actors import finish_run_with_evidence


def test_it_requires_an_annex_iii_area_exactly_for_high_risk_systems(acme, alice):
    model = AIModel(organisation=acme, name="Acme hiring screener", provider_name="Acme", provider_contact="a@x",
                    intended_purpose="Screen CVs with photos.", risk_category=AIModel.RiskCategory.HIGH_RISK)
    with pytest.raises(ValidationError, match="needs its high-risk area"):
        model.full_clean()
    model.annex_iii_area = AIModel.AnnexIIIArea.EMPLOYMENT
    model.full_clean()
    model.save()
    with pytest.raises(IntegrityError), transaction.atomic():
        AIModel.objects.filter(pk=model.pk).update(risk_category=AIModel.RiskCategory.MINIMAL)


def test_it_fingerprints_a_manifest_independently_of_key_order():
    a = {"config.json": "1" * 64, "model.safetensors": "2" * 64}
    b = {"model.safetensors": "2" * 64, "config.json": "1" * 64}
    assert manifest_hash(a) == manifest_hash(b)
    assert manifest_hash(a) != manifest_hash({**a, "config.json": "3" * 64})
    with pytest.raises(ValueError, match="expected a hex SHA-256"):
        manifest_hash({"config.json": "not-a-hash"})


def test_it_needs_a_complete_artifact_source(acme_model):
    version = ModelVersion(ai_model=acme_model, version="2", source=ModelVersion.Source.HUB, hub_id="acme/clip")
    with pytest.raises(ValidationError, match="pinned revision"):
        version.full_clean()
    version.hub_revision = "main"
    with pytest.raises(ValidationError, match="40-character commit hash"):
        version.full_clean()


def test_it_refuses_server_paths_outside_the_model_roots(acme_model, settings, tmp_path):
    settings.LOUPE_MODEL_ROOTS = [str(tmp_path / "models")]
    (tmp_path / "models" / "clip").mkdir(parents=True)
    inside = ModelVersion(ai_model=acme_model, version="p1", source=ModelVersion.Source.PATH,
                          server_path=str(tmp_path / "models" / "clip"))
    inside.full_clean()
    escape = ModelVersion(ai_model=acme_model, version="p2", source=ModelVersion.Source.PATH,
                          server_path=str(tmp_path / "models" / ".." / "secrets"))
    with pytest.raises(ValidationError, match="not below an allowed model root"):
        escape.full_clean()


def test_it_names_each_bad_item_of_a_probe_plan(test_probe_kind):
    validate_probe_plan([{"kind": test_probe_kind, "params": {"k": 1}, "dataset": None}])
    with pytest.raises(ValidationError) as excinfo:
        validate_probe_plan([
            {"kind": test_probe_kind},
            {"kind": "warp.drive"},
            {"kind": test_probe_kind, "params": [1, 2]},
            {"kind": test_probe_kind, "dataset": ""},
            {"kind": test_probe_kind, "params": {"x": float("nan")}},
            {"kind": test_probe_kind, "priority": "high"},
            "grounding",
        ])
    messages = excinfo.value.messages
    assert messages[0].startswith("probe_plan[1].kind: unknown probe kind 'warp.drive'; known: ")
    assert test_probe_kind in messages[0]
    assert messages[1] == "probe_plan[2].params: expected an object, got list"
    assert messages[2].startswith("probe_plan[3].dataset:")
    assert messages[3].startswith("probe_plan[4].params: not plain JSON")
    assert messages[4] == "probe_plan[5]: unknown keys ['priority']; allowed: kind, params, dataset"
    assert messages[5].startswith("probe_plan[6]: expected an object")
    with pytest.raises(ValidationError, match="must be a JSON list"):
        validate_probe_plan({"kind": test_probe_kind})


def test_it_stores_artifacts_with_their_sha256(case_with_evidence):
    evidence = Evidence.objects.get(run__case=case_with_evidence)
    artifact = evidence.artifacts.get()
    content = b"image,score\n1,0.8\n"
    assert artifact.sha256 == hashlib.sha256(content).hexdigest() and artifact.size == len(content)
    with artifact.file.open("rb") as handle:
        assert handle.read() == content
    with pytest.raises(ValueError, match="plain file name"):
        EvidenceArtifact.from_bytes(evidence, "../../etc/passwd", b"x", "text/plain")


def test_it_freezes_evidence_once_its_run_finished(case_with_evidence):
    evidence = Evidence.objects.get(run__case=case_with_evidence)
    evidence.summary = "Nothing to see here."
    with pytest.raises(ImmutableError):
        evidence.save()
    with pytest.raises(ImmutableError):
        evidence.delete()
    with pytest.raises(ImmutableError):
        Evidence.objects.filter(pk=evidence.pk).update(summary="changed")
    with pytest.raises(ImmutableError):
        Evidence.objects.filter(pk=evidence.pk).delete()
    with pytest.raises(ImmutableError, match="no artifact can be added"):
        EvidenceArtifact.from_bytes(evidence, "late.png", b"png", "image/png")
    artifact = evidence.artifacts.get()
    with pytest.raises(ImmutableError):
        artifact.save()
    with pytest.raises(ImmutableError):
        EvidenceArtifact.objects.all().delete()
    evidence.refresh_from_db()
    assert evidence.summary == "All good."


def test_it_freezes_a_finished_run_so_its_evidence_cannot_be_reopened(case_with_evidence):
    run = ProbeRun.objects.get(case=case_with_evidence)
    run.status = ProbeRun.Status.RUNNING
    with pytest.raises(ImmutableError, match="finished"):
        run.save()
    with pytest.raises(ImmutableError):
        ProbeRun.objects.filter(pk=run.pk).update(status=ProbeRun.Status.RUNNING)
    with pytest.raises(ImmutableError):
        run.delete()
    with pytest.raises(ValueError, match="through governance.workflow"):
        type(case_with_evidence).objects.filter(pk=case_with_evidence.pk).update(state="approved")


def test_it_lets_a_running_probe_complete_its_evidence(draft_case, alice):
    workflow.submit(draft_case, by=alice)
    run = ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.RUNNING)
    evidence = Evidence.objects.create(run=run, kind="test.echo", metrics={"a": 1})
    evidence.metrics = {"a": 1, "b": 2}
    evidence.save()  # still running: may be completed
    with pytest.raises(IntegrityError), transaction.atomic():
        Evidence.objects.create(run=run, kind="test.echo")  # one set of evidence per run


def test_it_refuses_evidence_with_malformed_findings_or_nan_metrics(draft_case, alice):
    run = ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.RUNNING)
    with pytest.raises(ValidationError, match=r"findings\[0\].severity"):
        Evidence.objects.create(run=run, kind="test.echo", findings=[{"severity": "catastrophic", "title": "x"}])
    with pytest.raises(ValueError):
        Evidence.objects.create(run=run, kind="test.echo", metrics={"auc": float("nan")})


def test_it_keeps_sign_offs_append_only(case_with_evidence, rita):
    signoff = workflow.sign_off(case_with_evidence, rita, "approve", "ok")
    signoff.decision = Signoff.Decision.REJECT
    with pytest.raises(ImmutableError):
        signoff.save()
    with pytest.raises(ImmutableError):
        signoff.delete()
    with pytest.raises(ImmutableError):
        Signoff.objects.filter(pk=signoff.pk).update(decision="reject")
    with pytest.raises(ImmutableError):
        Signoff.objects.filter(pk=signoff.pk).delete()
    assert Signoff.objects.get(pk=signoff.pk).decision == "approve"


def _report(case, author, version, supersedes=None):
    report = Report(case=case, version=version, sha256="c" * 64, manifest={"v": version}, author=author,
                    supersedes=supersedes)
    report.pdf.save("report.pdf", ContentFile(b"%PDF-1.7 test"), save=False)
    report.save()
    return report


def test_it_versions_reports_and_never_alters_an_issued_one(case_with_evidence, rita):
    v1 = _report(case_with_evidence, rita, 1)
    v2 = _report(case_with_evidence, rita, 2, supersedes=v1)
    assert v1.superseded_by == v2
    with pytest.raises(ValidationError, match="must name the version it supersedes"):
        _report(case_with_evidence, rita, 3)
    with pytest.raises(ValidationError, match="supersedes the previous version"):
        _report(case_with_evidence, rita, 3, supersedes=v1)
    v1.sha256 = "d" * 64
    with pytest.raises(ImmutableError):
        v1.save()
    with pytest.raises(ImmutableError):
        Report.objects.filter(case=case_with_evidence).update(sha256="d" * 64)
    with pytest.raises(ImmutableError):
        v2.delete()


def test_it_protects_a_case_with_records_from_deletion(case_with_evidence):
    with pytest.raises(ProtectedError):
        case_with_evidence.delete()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL triggers exist on PostgreSQL only")
def test_it_refuses_raw_sql_changes_to_issued_records_on_postgresql(case_with_evidence, rita):
    workflow.sign_off(case_with_evidence, rita, "approve")
    evidence = Evidence.objects.get(run__case=case_with_evidence)
    statements = [
        ("UPDATE governance_signoff SET decision = 'reject'", []),
        ("DELETE FROM governance_signoff", []),
        ("UPDATE governance_evidence SET summary = 'changed' WHERE id = %s", [evidence.pk]),
        ("DELETE FROM governance_evidenceartifact", []),
        ("UPDATE governance_proberun SET status = 'running' WHERE id = %s", [evidence.run_id]),
    ]
    for sql, params in statements:
        with pytest.raises(IntegrityError, match="immutable|finished"), transaction.atomic(), \
                connection.cursor() as cursor:
            cursor.execute(sql, params)
    evidence.refresh_from_db()
    assert evidence.summary == "All good."


def test_it_keeps_progress_between_zero_and_one(draft_case):
    with pytest.raises(IntegrityError), transaction.atomic():
        ProbeRun.objects.create(case=draft_case, kind="test.echo", progress=1.5)


def test_it_gives_each_run_a_unique_idempotency_key(draft_case):
    first = ProbeRun.objects.create(case=draft_case, kind="test.echo", idempotency_key="case-1:probe-0:round-1")
    assert len(ProbeRun.objects.create(case=draft_case, kind="test.echo").idempotency_key) == 32
    with pytest.raises(IntegrityError), transaction.atomic():
        ProbeRun.objects.create(case=draft_case, kind="test.echo", idempotency_key=first.idempotency_key)


def test_it_reports_the_most_severe_finding(draft_case):
    run = ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.RUNNING)
    evidence = Evidence.objects.create(run=run, kind="test.echo", findings=[
        {"severity": "low", "title": "a"}, {"severity": "high", "title": "Watermark shortcut"},
        {"severity": "info", "title": "c"}])
    assert evidence.max_severity == "high"
    assert finish_run_with_evidence(draft_case)[1].max_severity == "low"


def test_it_freezes_a_model_version_while_it_is_under_audit(draft_case, alice, rita):
    version = ModelVersion.objects.get(pk=draft_case.model_version_id)
    version.limitations = "Edited while still a draft."
    version.save()  # nothing is under audit yet

    workflow.submit(draft_case, by=alice)
    version = ModelVersion.objects.get(pk=version.pk)
    version.set_manifest({"config.json": "9" * 64})
    with pytest.raises(ImmutableError, match=f"under audit in case #{draft_case.pk}; manifest, manifest_hash"):
        version.save()
    version = ModelVersion.objects.get(pk=version.pk)
    version.limitations = "Quietly softened."
    with pytest.raises(ImmutableError, match="limitations cannot change"):
        version.save()
    version = ModelVersion.objects.get(pk=version.pk)
    version.architecture_detail = "clip (config)"
    version.save()  # detection details are not what reviewers sign


def test_it_accepts_the_first_manifest_of_a_version_under_audit(draft_case, alice):
    version = ModelVersion.objects.get(pk=draft_case.model_version_id)
    ModelVersion.objects.filter(pk=version.pk).update(manifest={}, manifest_hash="")
    workflow.submit(draft_case, by=alice)
    version = ModelVersion.objects.get(pk=version.pk)
    version.set_manifest({"config.json": "9" * 64})
    version.save()  # a worker computing the manifest after upload


def test_it_makes_approvals_stale_when_the_declared_purpose_changes(case_with_evidence, rita, rob):
    workflow.sign_off(case_with_evidence, rita, "approve")
    AIModel.objects.filter(pk=case_with_evidence.model_version.ai_model_id).update(
        intended_purpose="Screening job applicants.")
    workflow.sign_off(case_with_evidence, rob, "approve")
    assert workflow.review_status(case_with_evidence).stale_approvals == ["rita"]


@pytest.mark.parametrize("family", ["dual_encoder", "generative_fusion"])
def test_every_default_plan_is_valid_and_names_only_datasets_that_exist(family):
    """The plans the portal offers (and a case gets without a plan) validate, and each dataset they
    name resolves: a template naming a split the zoo lacks fails every run it starts."""
    from governance import references
    from governance.models import validate_probe_plan
    from governance.registration import DEFAULT_PLANS

    plan = DEFAULT_PLANS[family]
    validate_probe_plan(plan)
    for item in plan:
        if item.get("dataset"):
            assert references.resolve_dataset(item["dataset"]), item

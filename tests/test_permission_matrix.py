"""Every endpoint x every role, with the status code each one must get. Read the table as the
access policy: a change to who may do what shows up here as a one-cell diff.

Columns (the cast from ``tests/conftest.py``):

    anon     not signed in
    mallory  submitter at Globex (another provider)
    alice    submitter at Acme (owns everything below)
    rita     reviewer assigned to Acme's case under review
    ruth     reviewer not assigned to anything (least privilege: sees nothing of Acme)
    audrey   auditor (read-only, everything)
    ada      admin

Objects a user may not see answer 404 (never 403, which would confirm they exist); actions their
role does not allow answer 403 before any lookup. Each request runs in a savepoint that is rolled
back, so every cell starts from the same world.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import transaction
from rest_framework.test import APIClient

from tests.actors import finish_run_with_evidence
from tests.model_archives import tiny_model_zip

ROLES = ("anon", "mallory", "alice", "rita", "ruth", "audrey", "ada")


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str  # formatted with the world's ids
    expected: tuple[int, ...]  # one status per role, in ROLES order
    body: Callable[[dict], Any] | None = None
    multipart: bool = False


def _model_body(w):
    return {"organisation": w["acme"], "name": "Another model", "provider_name": "Acme",
            "provider_contact": "ai@acme.example", "intended_purpose": "Tagging.", "risk_category": "minimal"}


def _upload_body(w):
    archive = io.BytesIO(w["zip"])
    archive.name = "model.zip"
    return {"ai_model": w["model"], "version": "uploaded-2", "archive": archive}


def _document_body(w):
    document = io.BytesIO(b"%PDF-1.4\n% declaration\n")
    document.name = "declaration.pdf"
    return {"model_version": w["version"], "doc_type": "declaration", "file": document}


def _case_body(w):
    return {"model_version": w["version"], "title": "Another audit", "probe_plan": [{"kind": w["kind"]}]}


READ = (401, 404, 200, 200, 404, 200, 200)  # an object of Acme's case under review
ACME_ONLY = (401, 404, 200, 404, 404, 200, 200)  # an Acme object no assigned reviewer needs
LIST = (401, 200, 200, 200, 200, 200, 200)
NO_METHOD = (401, 405, 405, 405, 405, 405, 405)
WRITE_OWN = (401, 404, 200, 403, 403, 403, 200)
CREATE_OWN = (401, 400, 201, 403, 403, 403, 201)

TABLE = [
    # Inventory
    Row("list organisations", "get", "/api/organisations/", LIST),
    Row("read Acme", "get", "/api/organisations/{acme}/", READ),
    Row("list models", "get", "/api/models/", LIST),
    Row("read Acme's model", "get", "/api/models/{model}/", READ),
    Row("register a model for Acme", "post", "/api/models/", CREATE_OWN, _model_body),
    Row("edit Acme's model", "patch", "/api/models/{model}/", WRITE_OWN,
        lambda w: {"provider_contact": "ml@acme.example"}),
    Row("delete Acme's model", "delete", "/api/models/{model}/", NO_METHOD),
    Row("list versions", "get", "/api/versions/", LIST),
    Row("read the version under review", "get", "/api/versions/{version}/", READ),
    Row("read an uploaded version", "get", "/api/versions/{uploaded}/", ACME_ONLY),
    Row("register a hub version", "post", "/api/versions/", CREATE_OWN,
        lambda w: {"ai_model": w["model"], "version": "hub-2", "source": "hub", "hub_id": "acme/clip",
                   "hub_revision": "c" * 40}),
    Row("upload a version", "post", "/api/versions/upload/", CREATE_OWN, _upload_body, multipart=True),
    Row("edit a model card", "patch", "/api/versions/{uploaded}/", WRITE_OWN, lambda w: {"limitations": "Small."}),
    Row("edit the card of a version under audit", "patch", "/api/versions/{version}/",
        (401, 404, 409, 403, 403, 403, 409), lambda w: {"limitations": "Small."}),
    Row("recompute a manifest", "post", "/api/versions/{uploaded}/manifest/", (401, 404, 202, 403, 403, 403, 202)),
    Row("manifest of a hub-only version", "post", "/api/versions/{version}/manifest/",
        (401, 404, 409, 403, 403, 403, 409)),
    Row("download an uploaded archive", "get", "/api/versions/{uploaded}/archive/", ACME_ONLY),
    Row("export a model card", "get", "/api/versions/{version}/model-card/", READ),
    Row("import a model card", "put", "/api/versions/{uploaded}/model-card/", WRITE_OWN,
        lambda w: {"card": "# Card\n\n## Caveats\n\nNone.\n"}),
    Row("list provider documents", "get", "/api/documents/", LIST),
    Row("read a document of the version under review", "get", "/api/documents/{document}/", READ),
    Row("download a document of the version under review", "get", "/api/documents/{document}/download/", READ),
    Row("attach a provider document", "post", "/api/documents/", CREATE_OWN, _document_body, multipart=True),
    Row("change a provider document", "patch", "/api/documents/{document}/", NO_METHOD, lambda w: {"title": "x"}),
    # Cases and workflow
    Row("list cases", "get", "/api/cases/", LIST),
    Row("read the case under review", "get", "/api/cases/{case}/", READ),
    Row("read a draft case", "get", "/api/cases/{draft}/", ACME_ONLY),
    Row("open a case", "post", "/api/cases/", CREATE_OWN, _case_body),
    Row("edit a draft case", "patch", "/api/cases/{draft}/", WRITE_OWN, lambda w: {"scope": "Bias only."}),
    Row("edit a case under review", "patch", "/api/cases/{case}/", (401, 404, 403, 403, 403, 403, 403),
        lambda w: {"scope": "Changed under review."}),
    Row("submit a draft", "post", "/api/cases/{draft}/submit/", WRITE_OWN),
    Row("start a submitted case", "post", "/api/cases/{submitted}/start/", (401, 404, 202, 403, 403, 403, 202)),
    Row("assign reviewers", "post", "/api/cases/{draft}/reviewers/", (401, 403, 403, 403, 403, 403, 200),
        lambda w: {"reviewers": [w["rita"], w["rob"]]}),
    Row("approve the case under review", "post", "/api/cases/{case}/signoff/", (401, 404, 403, 201, 404, 403, 403),
        lambda w: {"decision": "approve", "comment": "ok"}),
    Row("read the criteria of the case under review", "get", "/api/cases/{case}/criteria/", READ),
    Row("change a criterion", "post", "/api/cases/{case}/criteria/", (401, 404, 403, 403, 404, 403, 200),
        lambda w: {"kind": "grounding", "metric": "deletion_auc", "severity": "high", "reason": "High stakes."}),
    Row("request a report", "post", "/api/cases/{case}/reports/", (401, 403, 403, 201, 404, 403, 201)),
    Row("read the comments of the case under review", "get", "/api/cases/{case}/comments/", READ),
    Row("comment on a finding", "post", "/api/cases/{case}/comments/", (401, 404, 201, 201, 404, 403, 201),
        lambda w: {"finding": w["finding"], "body": "Is this in every image?"}),
    Row("resolve a comment", "post", "/api/cases/{case}/comments/{comment}/resolve/",
        (401, 404, 403, 200, 404, 403, 200)),
    Row("delete a case", "delete", "/api/cases/{draft}/", NO_METHOD),
    # Read-only records
    Row("list runs", "get", "/api/runs/", LIST),
    Row("read a run", "get", "/api/runs/{run}/", READ),
    Row("create a run", "post", "/api/runs/", NO_METHOD, lambda w: {}),
    Row("list evidence", "get", "/api/evidence/", LIST),
    Row("read evidence", "get", "/api/evidence/{evidence}/", READ),
    Row("create evidence", "post", "/api/evidence/", NO_METHOD, lambda w: {}),
    Row("change evidence", "patch", "/api/evidence/{evidence}/", NO_METHOD, lambda w: {"summary": "nicer"}),
    Row("list artifacts", "get", "/api/artifacts/", LIST),
    Row("read an artifact", "get", "/api/artifacts/{artifact}/", READ),
    Row("download an artifact", "get", "/api/artifacts/{artifact}/download/", READ),
    Row("list sign-offs", "get", "/api/signoffs/", LIST),
    Row("read a sign-off", "get", "/api/signoffs/{signoff}/", READ),
    Row("create a sign-off directly", "post", "/api/signoffs/", NO_METHOD, lambda w: {}),
    Row("delete a sign-off", "delete", "/api/signoffs/{signoff}/", NO_METHOD),
    Row("list reports", "get", "/api/reports/", LIST),
    Row("read a report", "get", "/api/reports/{report}/", READ),
    Row("download a report", "get", "/api/reports/{report}/download/", READ),
    Row("change a report", "put", "/api/reports/{report}/", NO_METHOD, lambda w: {}),
    Row("list audit events", "get", "/api/audit-events/", LIST),
    Row("read an audit event of the case", "get", "/api/audit-events/{event}/", READ),
    Row("delete an audit event", "delete", "/api/audit-events/{event}/", NO_METHOD),
    # Webhooks: an organisation's own
    Row("list webhooks", "get", "/api/webhooks/", LIST),
    Row("read Acme's webhook", "get", "/api/webhooks/{webhook}/", ACME_ONLY),
    Row("register a webhook for Acme", "post", "/api/webhooks/", CREATE_OWN,
        lambda w: {"organisation": w["acme"], "url": "https://93.184.215.14/loupe"}),
    Row("read the deliveries of Acme's webhook", "get", "/api/webhooks/{webhook}/deliveries/",
        (401, 404, 200, 403, 403, 200, 200)),
    Row("remove Acme's webhook", "delete", "/api/webhooks/{webhook}/", (401, 404, 204, 403, 403, 403, 204)),
    # Documentation is public: the schema describes the API, not anyone's data.
    Row("OpenAPI schema", "get", "/api/schema/", (200,) * 7),
    Row("Swagger UI", "get", "/api/docs/", (200,) * 7),
]


@pytest.fixture
def world(case_with_evidence, acme, acme_model, acme_version, alice, mallory, rita, rob, ruth, audrey, ada,
          test_probe_kind, tmp_path, django_capture_on_commit_callbacks):
    from governance import workflow
    from governance.models import AuditCase, AuditEvent, Evidence, Report
    from governance.reports.manifest import build_manifest

    case = case_with_evidence
    evidence = Evidence.objects.get(run__case=case)
    # rob signs one evidence item: the case enters review; the sign-off is a record to read.
    signoff = workflow.sign_off(case, rob, "approve", evidence=evidence)
    draft = AuditCase.objects.create(model_version=acme_version, title="Second audit", created_by=alice,
                                     probe_plan=[{"kind": test_probe_kind}])
    submitted = AuditCase.objects.create(model_version=acme_version, title="Third audit", created_by=alice,
                                         probe_plan=[{"kind": test_probe_kind}])
    workflow.submit(submitted, by=alice)
    # A stored report row without rendering a PDF for every cell (rendering is tested in test_api).
    report = Report(case=case, version=1, sha256="d" * 64, manifest=build_manifest(case, version=1), author=rita)
    report.pdf.save("report-v1.pdf", ContentFile(b"%PDF-1.7\n% matrix fixture\n"), save=False)
    report.save()
    client = APIClient()
    client.force_authenticate(alice)
    zip_data = tiny_model_zip(tmp_path)
    archive = io.BytesIO(zip_data)
    archive.name = "model.zip"
    with django_capture_on_commit_callbacks(execute=True):
        uploaded = client.post("/api/versions/upload/", {"ai_model": acme_model.pk, "version": "uploaded-1",
                                                         "archive": archive}, format="multipart")
    assert uploaded.status_code == 201, uploaded.content
    _ = finish_run_with_evidence  # the case's run and evidence come from case_with_evidence
    from governance import provider_documents

    document = provider_documents.attach(acme_version, doc_type="risk_management", title="Risk file",
                                         filename="risk.pdf", stream=io.BytesIO(b"%PDF-1.4\n% risk\n"), by=alice)
    from governance import comments
    from governance.models import WebhookEndpoint

    finding = f"evidence-{evidence.pk}/0"
    comment = comments.add_comment(case, rita, finding, "Why only red objects?")
    webhook = WebhookEndpoint.objects.create(organisation=acme, url="https://93.184.215.14/hook", secret="s" * 32)
    return {
        "finding": finding, "comment": comment.pk, "webhook": webhook.pk,
        "users": {"anon": None, "mallory": mallory, "alice": alice, "rita": rita, "ruth": ruth, "audrey": audrey,
                  "ada": ada},
        "acme": acme.pk, "model": acme_model.pk, "version": acme_version.pk, "uploaded": uploaded.json()["id"],
        "case": case.pk, "draft": draft.pk, "submitted": submitted.pk, "run": evidence.run_id,
        "evidence": evidence.pk, "artifact": evidence.artifacts.get().pk, "signoff": signoff.pk, "report": report.pk,
        "event": AuditEvent.objects.filter(case=case).latest("seq").pk, "kind": test_probe_kind, "zip": zip_data,
        "rita": rita.pk, "rob": rob.pk, "document": document.pk,
    }


def request_as(user, row: Row, world: dict) -> int:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    path = row.path.format(**world)
    body = row.body(world) if row.body else None
    with transaction.atomic():
        response = getattr(client, row.method)(path, body, format="multipart" if row.multipart else "json")
        transaction.set_rollback(True)  # every cell starts from the same world
    return response.status_code


SECTIONS = {
    "inventory": [r for r in TABLE if r.path.startswith(("/api/organisations", "/api/models", "/api/versions",
                                                         "/api/documents"))],
    "cases": [r for r in TABLE if r.path.startswith("/api/cases")],
    "records": [r for r in TABLE if r.path.startswith(("/api/runs", "/api/evidence", "/api/artifacts",
                                                       "/api/signoffs", "/api/reports", "/api/audit-events"))],
    "docs": [r for r in TABLE if r.path.startswith(("/api/schema", "/api/docs"))],
    "notifications": [r for r in TABLE if r.path.startswith("/api/webhooks")],
}


def test_it_covers_every_route_of_the_api():
    """A new endpoint must get a row here: compare the table with the router's URL patterns."""
    from governance.api.urls import router

    covered = {row.path.split("{")[0].rstrip("/").split("/")[2] for row in TABLE}
    registered = {prefix for prefix, _viewset, _basename in router.registry}
    assert registered <= covered, f"endpoints without a permission row: {sorted(registered - covered)}"
    assert sum(len(rows) for rows in SECTIONS.values()) == len(TABLE)


@pytest.mark.django_db
@pytest.mark.parametrize("section", list(SECTIONS))
@pytest.mark.slow
def test_it_enforces_the_permission_matrix(section: str, world):
    """One world per section (building it is the slow part); every cell is checked and every wrong
    cell reported together, as ``row: {role: (got, expected)}``."""
    wrong = {}
    for row in SECTIONS[section]:
        assert len(row.expected) == len(ROLES), row.name
        got = tuple(request_as(world["users"][role], row, world) for role in ROLES)
        cells = {role: (g, e) for role, g, e in zip(ROLES, got, row.expected, strict=True) if g != e}
        if cells:
            wrong[row.name] = cells
    assert wrong == {}

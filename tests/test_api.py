"""The REST API as alice (Acme's submitter), mallory (Globex), the reviewers rita and rob, audrey (auditor)
and ada (admin) use it. Every refusal is checked for its status, its JSON error code and for what it
left behind (nothing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from governance.models import AIModel, AuditCase, AuditEvent, ModelVersion
from tests.actors import client_for
from tests.model_archives import model_members, tiny_model_targz, tiny_model_zip, write_tiny_hf_model, zip_bytes

pytestmark = pytest.mark.django_db


def upload(client: APIClient, ai_model: AIModel, version: str, data: bytes, name: str = "model.zip"):
    archive = io.BytesIO(data)
    archive.name = name
    return client.post("/api/versions/upload/", {"ai_model": ai_model.pk, "version": version, "archive": archive},
                       format="multipart")


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- inventory ---------------------------------------------------------------------------------


def test_it_registers_a_model_for_the_submitters_own_organisation(alice, acme):
    response = client_for(alice).post("/api/models/", {
        "name": "Acme SigLIP", "provider_name": "Acme Vision GmbH", "provider_contact": "ai@acme.example",
        "intended_purpose": "Search product photos by text.", "risk_category": "limited"}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["organisation"] == acme.pk
    event = AuditEvent.objects.get(action="ai_model.created")
    assert (event.actor, event.organisation_id) == (alice, acme.pk)


def test_it_does_not_let_a_submitter_register_for_another_organisation(mallory, acme):
    response = client_for(mallory).post("/api/models/", {
        "organisation": acme.pk, "name": "Not mine", "provider_name": "x", "provider_contact": "x@example.org",
        "intended_purpose": "x", "risk_category": "minimal"}, format="json")
    # Acme is invisible to mallory: "does not exist", not "forbidden".
    assert response.status_code == 400
    assert response.json()["error"] == "invalid" and "organisation" in response.json()["fields"]
    assert not AIModel.objects.filter(name="Not mine").exists()


def test_it_explains_a_high_risk_model_without_its_annex_iii_area(alice):
    response = client_for(alice).post("/api/models/", {
        "name": "Hiring screener", "provider_name": "Acme", "provider_contact": "ai@acme.example",
        "intended_purpose": "Rank CVs with photos.", "risk_category": "high_risk"}, format="json")
    assert response.status_code == 400
    assert "high-risk area" in response.json()["detail"]


@pytest.mark.parametrize("body", ['{"name": ', "[1, 2", "not json at all"])
def test_it_answers_malformed_json_with_a_clear_400(alice, body):
    response = client_for(alice).post("/api/models/", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "parse_error"
    assert "JSON parse error" in response.json()["detail"]


def test_it_authenticates_with_a_token_from_the_token_endpoint(alice):
    anonymous = APIClient()
    assert anonymous.get("/api/models/").status_code == 401
    response = anonymous.post("/api/auth/token/", {"username": "alice", "password": "alice-pw-1234"}, format="json")
    assert response.status_code == 200
    token = response.json()["token"]
    assert token == Token.objects.get(user=alice).key
    anonymous.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert anonymous.get("/api/models/").status_code == 200
    assert APIClient().post("/api/auth/token/", {"username": "alice", "password": "wrong"}).status_code == 400


def test_it_refuses_a_user_without_a_role(make_user):
    nobody = make_user("nobody")
    response = client_for(nobody).get("/api/cases/")
    assert response.status_code == 403
    assert "no Loupe role" in response.json()["detail"]


# --- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [tiny_model_zip, tiny_model_targz])
def test_it_uploads_an_archive_and_a_worker_computes_its_manifest(alice, acme_model, tmp_path, pack,
                                                                  django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = upload(client_for(alice), acme_model, "2.0", pack(tmp_path, prefix="tiny/"),
                          name="tiny.zip" if pack is tiny_model_zip else "tiny.tar.gz")
    assert response.status_code == 201, response.json()
    assert len(callbacks) == 1  # compute_manifest, enqueued on commit (run in-process here)
    version = ModelVersion.objects.get(pk=response.json()["id"])
    assert version.source == "archive"
    assert sorted(version.manifest) == ["README.md", "config.json", "model.safetensors"]
    assert version.architecture_family == "dual_encoder"
    assert len(version.manifest_hash) == 64
    actions = list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))
    # The archive's README.md is imported as the model card in the same transaction as the upload.
    assert actions[-3:] == ["model_version.uploaded", "model_version.card_imported",
                            "model_version.manifest_computed"]
    # The archive is downloadable by whoever can see the version.
    download = client_for(alice).get(f"/api/versions/{version.pk}/archive/")
    assert download.status_code == 200 and b"".join(download.streaming_content).startswith((b"PK", b"\x1f\x8b"))


@pytest.mark.parametrize(("members_change", "code", "status"), [
    ({"../../escape.txt": b"x"}, "path_traversal", 400),
    ({"big.safetensors": bytes(3_000_000)}, "unpacked_too_large", 413),
])
def test_it_refuses_a_bad_archive_and_leaves_nothing_behind(alice, acme_model, tmp_path, settings, members_change,
                                                            code, status):
    settings.LOUPE_MAX_UNPACKED_BYTES = 1_000_000
    members = {**model_members(write_tiny_hf_model(tmp_path / "m")), **members_change}
    files_before, events_before = stored_files(), AuditEvent.objects.count()
    response = upload(client_for(alice), acme_model, "9.9", zip_bytes(members))
    assert response.status_code == status
    body = response.json()
    assert body["error"] == code and body["detail"]
    assert not ModelVersion.objects.filter(version="9.9").exists()
    assert AuditEvent.objects.count() == events_before
    assert stored_files() == files_before


def test_it_refuses_an_upload_that_is_not_an_archive(alice, acme_model):
    response = upload(client_for(alice), acme_model, "1.1", b"<html>not an archive</html>", name="model.zip")
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_archive"


def test_it_refuses_an_archive_over_the_size_limit(alice, acme_model, tmp_path, settings):
    data = tiny_model_zip(tmp_path)
    settings.LOUPE_MAX_ARCHIVE_BYTES = len(data) - 1
    response = upload(client_for(alice), acme_model, "1.2", data)
    assert response.status_code == 413
    assert response.json()["error"] == "archive_too_large"


def test_it_refuses_an_oversized_request_before_reading_it(alice, acme_model, settings):
    settings.LOUPE_MAX_ARCHIVE_BYTES = 10
    response = client_for(alice).generic("POST", "/api/versions/upload/", b"x" * (2 * 1024 * 1024),
                                         content_type="multipart/form-data; boundary=none")
    assert response.status_code == 413
    assert response.json()["error"] == "archive_too_large"


def test_it_cleans_up_when_the_database_refuses_the_version(alice, acme_model, tmp_path, monkeypatch):
    """A failure after the files were moved into place (here: the audit log) rolls back the row and
    removes the archive and the unpacked directory."""
    from governance.api import views

    def broken_record(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(views.audit_log, "record", broken_record)
    files_before = stored_files()
    dirs_before = set(Path(settings.MEDIA_ROOT).rglob("*.unpacked"))
    client = client_for(alice)
    client.raise_request_exception = True
    with pytest.raises(RuntimeError):
        upload(client, acme_model, "3.0", tiny_model_zip(tmp_path))
    assert not ModelVersion.objects.filter(version="3.0").exists()
    assert stored_files() == files_before
    assert set(Path(settings.MEDIA_ROOT).rglob("*.unpacked")) == dirs_before


def test_it_lets_only_admins_register_server_paths(alice, ada, acme_model, tmp_path, settings,
                                                   django_capture_on_commit_callbacks):
    settings.LOUPE_MODEL_ROOTS = [str(tmp_path)]
    directory = write_tiny_hf_model(tmp_path / "tiny-clip")
    body = {"ai_model": acme_model.pk, "version": "path-1", "source": "path", "server_path": str(directory)}
    refused = client_for(alice).post("/api/versions/", body, format="json")
    assert refused.status_code == 403 and "admins" in refused.json()["detail"]
    with django_capture_on_commit_callbacks(execute=True):
        created = client_for(ada).post("/api/versions/", body, format="json")
    assert created.status_code == 201, created.json()
    assert ModelVersion.objects.get(pk=created.json()["id"]).architecture_family == "dual_encoder"
    outside = {**body, "version": "path-2", "server_path": "/etc"}
    response = client_for(ada).post("/api/versions/", outside, format="json")
    assert response.status_code == 400 and "not below an allowed model root" in response.json()["detail"]


# --- cases and workflow ------------------------------------------------------------------------


def test_it_refuses_an_invalid_probe_plan_naming_the_item(alice, acme_version, test_probe_kind):
    response = client_for(alice).post("/api/cases/", {
        "model_version": acme_version.pk, "title": "Bad plan",
        "probe_plan": [{"kind": test_probe_kind}, {"kind": "no.such.probe"}]}, format="json")
    assert response.status_code == 400
    assert "probe_plan[1].kind: unknown probe kind 'no.such.probe'" in response.json()["detail"]
    assert not AuditCase.objects.filter(title="Bad plan").exists()


def test_it_keeps_submitters_from_choosing_reviewers_or_lowering_the_bar(alice, rita, acme_version, test_probe_kind):
    response = client_for(alice).post("/api/cases/", {
        "model_version": acme_version.pk, "title": "Self-reviewed", "probe_plan": [{"kind": test_probe_kind}],
        "reviewers": [rita.pk], "required_approvals": 1}, format="json")
    assert response.status_code == 400
    assert set(response.json()["fields"]) == {"reviewers", "required_approvals"}


def test_it_submits_a_case_once_and_explains_an_illegal_transition(alice, draft_case):
    client = client_for(alice)
    first = client.post(f"/api/cases/{draft_case.pk}/submit/")
    assert first.status_code == 200 and first.json()["state"] == "submitted"
    second = client.post(f"/api/cases/{draft_case.pk}/submit/")
    assert second.status_code == 409
    body = second.json()
    assert body["error"] == "illegal_transition"
    assert (body["from_state"], body["to_state"]) == ("submitted", "submitted")
    assert "running" in body["allowed"]


def test_it_refuses_edits_once_a_case_is_submitted(alice, draft_case):
    client = client_for(alice)
    client.post(f"/api/cases/{draft_case.pk}/submit/")
    response = client.patch(f"/api/cases/{draft_case.pk}/", {"title": "Changed afterwards"}, format="json")
    assert response.status_code == 403
    draft_case.refresh_from_db()
    assert draft_case.title != "Changed afterwards"


def test_it_starts_a_submitted_case(alice, acme_version, test_probe_kind, django_capture_on_commit_callbacks):
    client = client_for(alice)
    case = client.post("/api/cases/", {"model_version": acme_version.pk, "title": "Start me",
                                       "probe_plan": [{"kind": test_probe_kind, "params": {}}]}, format="json").json()
    assert client.post(f"/api/cases/{case['id']}/start/").status_code == 409  # a draft is submitted first
    client.post(f"/api/cases/{case['id']}/submit/")
    with django_capture_on_commit_callbacks(execute=False) as dispatched:
        response = client.post(f"/api/cases/{case['id']}/start/")
    assert response.status_code == 202, response.json()
    assert response.json()["state"] == "running"
    assert len(dispatched) == 1  # the work is sent to the broker only after the commit


def test_it_signs_off_with_segregation_of_duties(case_with_evidence, alice, rita, rob, ada):
    url = f"/api/cases/{case_with_evidence.pk}/signoff/"
    own = client_for(alice).post(url, {"decision": "approve"}, format="json")
    assert own.status_code == 403
    assert own.json()["error"] == "not_allowed" and "segregation of duties" in own.json()["detail"]
    admin = client_for(ada).post(url, {"decision": "approve"}, format="json")
    assert admin.status_code == 403 and "only reviewers assigned" in admin.json()["detail"]
    needs_reason = client_for(rita).post(url, {"decision": "reject"}, format="json")
    assert needs_reason.status_code == 400 and "needs a comment" in needs_reason.json()["detail"]

    first = client_for(rita).post(url, {"decision": "approve", "comment": "grounding is faithful"}, format="json")
    assert first.status_code == 201
    twice = client_for(rita).post(url, {"decision": "approve"}, format="json")
    assert twice.status_code == 400 and "a decision counts once" in twice.json()["detail"]
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == "in_review"  # one reviewer counts once
    assert client_for(rob).post(url, {"decision": "approve"}, format="json").status_code == 201
    case = client_for(alice).get(f"/api/cases/{case_with_evidence.pk}/").json()
    assert (case["state"], case["approvals"]) == ("approved", 2)
    late = client_for(rob).post(url, {"decision": "approve"}, format="json")
    assert late.status_code == 409 and late.json()["error"] == "illegal_transition"


def test_it_keeps_evidence_signoffs_and_audit_events_read_only(case_with_evidence, ada):
    client = client_for(ada)
    evidence_id = client.get("/api/evidence/").json()["results"][0]["id"]
    assert client.post("/api/evidence/", {}, format="json").status_code == 405
    assert client.patch(f"/api/evidence/{evidence_id}/", {"summary": "better"}, format="json").status_code == 405
    assert client.delete(f"/api/evidence/{evidence_id}/").status_code == 405
    assert client.post("/api/signoffs/", {}, format="json").status_code == 405
    event_id = client.get("/api/audit-events/").json()["results"][0]["id"]
    assert client.delete(f"/api/audit-events/{event_id}/").status_code == 405


def test_it_paginates_filters_and_orders(alice, acme_version, test_probe_kind):
    client = client_for(alice)
    for i in range(3):
        client.post("/api/cases/", {"model_version": acme_version.pk, "title": f"case {i}",
                                    "probe_plan": [{"kind": test_probe_kind}]}, format="json")
    page = client.get("/api/cases/?page_size=2&ordering=created_at").json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"]
    assert [c["title"] for c in page["results"]] == ["case 0", "case 1"]
    assert client.get("/api/cases/?state=submitted").json()["count"] == 0
    assert client.get("/api/cases/?state=not-a-state").status_code == 400
    assert client.get(f"/api/cases/?ai_model={acme_version.ai_model_id}").json()["count"] == 3
    assert client.get(f"/api/evidence/?case={page['results'][0]['id']}").status_code == 200
    # ids beyond any database's range are a clear 400, not a server error (found by test_schema)
    for query in ("cases/?ai_model=-1063310791633622388160103186432", "evidence/?case=99999999999999999999",
                  "cases/?ai_model=1.5", "cases/?model_version=-1063310791633622388160103186432"):
        assert client.get(f"/api/{query}").status_code == 400, query


@pytest.mark.slow
def test_it_issues_and_serves_a_report(case_with_evidence, rita, alice, mallory):
    response = client_for(rita).post(f"/api/cases/{case_with_evidence.pk}/reports/")
    assert response.status_code == 201, response.content[:500]
    report = response.json()
    assert report["version"] == 1 and len(report["sha256"]) == 64
    download = client_for(alice).get(f"/api/reports/{report['id']}/download/")
    assert download.status_code == 200 and download["Content-Type"] == "application/pdf"
    pdf = b"".join(download.streaming_content)
    assert pdf.startswith(b"%PDF")
    import hashlib

    assert hashlib.sha256(pdf).hexdigest() == report["sha256"] == download["X-Content-SHA256"]
    assert client_for(mallory).get(f"/api/reports/{report['id']}/download/").status_code == 404


def test_it_refuses_a_report_before_there_is_evidence(draft_case, ada):
    response = client_for(ada).post(f"/api/cases/{draft_case.pk}/reports/")
    assert response.status_code == 409 and response.json()["error"] == "no_evidence_yet"


def test_it_serves_swagger_ui_without_a_cdn(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger-ui" in html
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert "/api/cases/{id}/signoff/" in json.loads(schema.content)["paths"]


# --- model cards -------------------------------------------------------------------------------


def test_it_imports_the_model_card_from_the_archive_and_exports_it(alice, acme_model, tmp_path):
    directory = write_tiny_hf_model(tmp_path / "carded")
    (directory / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage: en\n---\n# Acme CLIP\n\n## Limitations\n\nSynthetic shapes only.\n")
    response = upload(client_for(alice), acme_model, "4.0", zip_bytes(model_members(directory)))
    assert response.status_code == 201, response.json()
    assert response.json()["limitations"] == "Synthetic shapes only."
    assert response.json()["card_metadata"]["license"] == "apache-2.0"
    card = client_for(alice).get(f"/api/versions/{response.json()['id']}/model-card/")
    assert card.status_code == 200 and card["Content-Type"].startswith("text/markdown")
    text = card.content.decode()
    assert text.startswith("---\n") and "license: apache-2.0" in text and "Synthetic shapes only." in text


def test_it_refuses_a_malformed_model_card_with_a_reason(alice, acme_model, tmp_path):
    response = upload(client_for(alice), acme_model, "5.0", tiny_model_zip(tmp_path))
    version_id = response.json()["id"]
    bad = client_for(alice).put(f"/api/versions/{version_id}/model-card/", {"card": "---\n: [unclosed\n---\n# x\n"},
                                format="json")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_model_card"
    good = client_for(alice).put(f"/api/versions/{version_id}/model-card/",
                                 {"card": "# Card\n\n## Caveats\n\nNone known.\n"}, format="json")
    assert good.status_code == 200 and good.json()["caveats"] == "None known."

"""A case from registration to approval, through the API, with the audit log checked at the end.

alice (Acme's submitter) registers a model, uploads its archive and opens a case; a worker computes
the model's manifest; ada (admin) assigns rita and rob; alice submits. The probes' outcome is put in
place as the pipeline would; alice tries to approve her own case and is refused; rita and rob
approve; the audit log verifies. Then someone with database access edits a sign-off's log row
behind Loupe's back, and verification names that row.

Locally this runs on SQLite with tasks executed in-process when each request commits. With
``LOUPE_REAL_STACK=1`` it runs on PostgreSQL, and the manifest is computed by a real
``celery worker`` process that reads the committed rows through Redis (see ``tests/realstack.py``).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from rest_framework.test import APIClient

from governance import workflow
from governance.models import AuditCase, AuditEvent, ModelVersion, Signoff
from tests.actors import finish_run_with_evidence
from tests.model_archives import tiny_model_targz
from tests.realstack import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def verify_audit_log(real_stack) -> tuple[int, str]:
    """``manage.py verify_audit_log``: as a separate process against the test database on the real
    stack (the exit code an operator sees); in-process on the embedded default, whose SQLite test
    database lives in this process's memory."""
    if real_stack is not None:
        done = subprocess.run([sys.executable, "manage.py", "verify_audit_log"], cwd=REPO_ROOT, env=real_stack.env,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit_log", stdout=out, stderr=err)
    except CommandError as exc:
        return 1, out.getvalue() + err.getvalue() + str(exc)
    return 0, out.getvalue() + err.getvalue()


@pytest.mark.django_db(transaction=True)
def test_it_takes_a_case_from_upload_to_approval_and_detects_tampering(
        celery_worker, real_stack, acme, alice, ada, rita, rob, test_probe_kind, tmp_path):
    # 1. alice registers the model and uploads its archive.
    created = api(alice).post("/api/models/", {
        "name": "Acme CLIP", "provider_name": "Acme Vision GmbH", "provider_contact": "ai@acme.example",
        "intended_purpose": "Zero-shot tagging of product photos.", "risk_category": "limited"}, format="json")
    assert created.status_code == 201, created.json()
    archive = io.BytesIO(tiny_model_targz(tmp_path, prefix="acme-clip/"))
    archive.name = "acme-clip.tar.gz"
    uploaded = api(alice).post("/api/versions/upload/", {"ai_model": created.json()["id"], "version": "1.0",
                                                         "archive": archive}, format="multipart")
    assert uploaded.status_code == 201, uploaded.json()
    version_id = uploaded.json()["id"]

    # 2. A worker computes the manifest after the upload committed (API -> broker -> worker -> database).
    def manifest_done():
        return api(alice).get(f"/api/versions/{version_id}/").json()["manifest_hash"]

    manifest_hash = wait_until(manifest_done, timeout=90, message=lambda: "the manifest task" + (
        f"; worker log:\n{celery_worker.log_tail()}" if celery_worker else ""))
    version = ModelVersion.objects.get(pk=version_id)
    assert version.manifest_hash == manifest_hash
    assert set(version.manifest) == {"README.md", "config.json", "model.safetensors"}
    assert version.architecture_family == "dual_encoder"
    manifest_event = AuditEvent.objects.get(action="model_version.manifest_computed", object_id=str(version_id))
    assert manifest_event.actor_label == "system"
    if celery_worker is not None:  # it really was the worker process, not this one
        assert "workers.tasks.compute_manifest" in celery_worker.log_tail(200)

    # 3. alice opens a case; ada assigns two independent reviewers; alice submits.
    case = api(alice).post("/api/cases/", {"model_version": version_id, "title": "Acme CLIP 1.0 audit",
                                           "scope": "Grounding.", "probe_plan": [{"kind": test_probe_kind}]},
                           format="json")
    assert case.status_code == 201, case.json()
    case_id = case.json()["id"]
    assigned = api(ada).post(f"/api/cases/{case_id}/reviewers/", {"reviewers": [rita.pk, rob.pk]}, format="json")
    assert assigned.status_code == 200, assigned.json()
    submitted = api(alice).post(f"/api/cases/{case_id}/submit/")
    assert submitted.json()["state"] == "submitted"

    # 4. The probes' outcome, as the pipeline records it (the pipeline has its own tests).
    audit_case = AuditCase.objects.get(pk=case_id)
    workflow.start_runs(audit_case)
    finish_run_with_evidence(audit_case, kind=test_probe_kind)
    workflow.mark_evidence_ready(audit_case)

    # 5. alice may not approve her own case; rita and rob may, and one approval counts once.
    signoff_url = f"/api/cases/{case_id}/signoff/"
    own = api(alice).post(signoff_url, {"decision": "approve", "comment": "looks fine to me"}, format="json")
    assert own.status_code == 403
    assert own.json()["error"] == "not_allowed"
    assert "segregation of duties" in own.json()["detail"] and "alice" in own.json()["detail"]
    assert not Signoff.objects.filter(reviewer=alice).exists()
    first = api(rita).post(signoff_url, {"decision": "approve", "comment": "Evidence is complete."}, format="json")
    assert first.status_code == 201, first.json()
    assert api(alice).get(f"/api/cases/{case_id}/").json()["state"] == "in_review"
    second = api(rob).post(signoff_url, {"decision": "approve"}, format="json")
    assert second.status_code == 201, second.json()
    final = api(alice).get(f"/api/cases/{case_id}/").json()
    assert (final["state"], final["approvals"]) == ("approved", 2)

    # 6. The audit log verifies.
    code, output = verify_audit_log(real_stack)
    assert code == 0, output
    assert "audit log OK" in output

    # 7. Someone with database access turns rita's approval into a rejection in the log: detected, named.
    event = AuditEvent.objects.get(action="signoff.created", actor=rita)
    forged = event.payload.replace('"decision":"approve"', '"decision":"reject"')
    assert forged != event.payload
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # past the immutability trigger, as a superuser could
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE governance_auditevent SET payload = %s WHERE id = %s", [forged, event.pk])
    code, output = verify_audit_log(real_stack)
    assert code != 0
    assert f"seq {event.seq} (id {event.pk}): modified" in output, output

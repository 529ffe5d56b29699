"""The export bundle: what a provider hands to a notified body, with the case's visibility.

Actors from ``tests/conftest.py``: alice (Acme submitter), mallory (Globex submitter), rita and rob
(assigned reviewers), ruth (unassigned reviewer), audrey (auditor), ada (admin).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from governance import audit_log
from governance.reports import generate_report

pytestmark = pytest.mark.slow


@pytest.fixture
def media(settings, tmp_path):
    """Evidence and report files for this test only (requested before the case is built)."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.LOUPE_SIGNING_KEY = ""


@pytest.fixture
def exported_case(media, case_with_evidence, ada):
    """Acme's case with evidence (conftest) and report v1 issued."""
    from governance.models import ProbeRun

    run = ProbeRun.objects.filter(case=case_with_evidence).first()
    assert run.evidence.artifacts.exists()
    report = generate_report(case_with_evidence, author=ada)
    return case_with_evidence, report


def _zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


def test_it_exports_report_manifest_artifacts_card_and_audit_log(exported_case, tmp_path):
    case, report = exported_case
    output = tmp_path / "bundle.zip"
    call_command("export_case", str(case.pk), "--output", str(output), stdout=io.StringIO())
    bundle = _zip(output.read_bytes())
    names = set(bundle.namelist())
    pdf_name = f"report/loupe-case-{case.pk}-report-v1.pdf"
    assert {pdf_name, "manifest.json", "model-card/README.md", "audit-log.json", "README.txt", "SHA256SUMS"} <= names
    assert hashlib.sha256(bundle.read(pdf_name)).hexdigest() == report.sha256
    assert json.loads(bundle.read("manifest.json")) == report.manifest
    artifacts = [n for n in names if n.startswith("evidence/")]
    stored = [a for e in report.manifest["evidence"] for a in e["artifacts"]]
    assert len(artifacts) == len(stored) >= 1
    for entry in stored:
        path = next(n for n in artifacts if n.endswith("/" + entry["name"]))
        assert hashlib.sha256(bundle.read(path)).hexdigest() == entry["sha256"]
    card = bundle.read("model-card/README.md").decode()
    assert card.startswith("---\n") and "# Model Card for Acme CLIP 1.0" in card
    log = json.loads(bundle.read("audit-log.json"))
    actions = [row["action"] for row in log["rows"]]
    assert "report.issued" in actions and len(actions) >= 4  # reviewers assigned, submitted, ..., issued
    for row in log["rows"]:
        assert audit_log.row_hash_of(row) == row["row_hash"]
    assert log["rows_with_bad_hashes"] == []
    for line in bundle.read("SHA256SUMS").decode().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256(bundle.read(name)).hexdigest() == digest
    # The same case state exports the same bytes.
    call_command("export_case", str(case.pk), "--output", str(tmp_path / "again.zip"), stdout=io.StringIO())
    assert (tmp_path / "again.zip").read_bytes() == output.read_bytes()


def test_it_serves_the_bundle_with_the_case_visibility(exported_case, alice, mallory, rita, ruth, audrey, ada):
    case, _ = exported_case
    url = f"/api/cases/{case.pk}/export"
    client = APIClient()
    assert client.get(url).status_code in (401, 403)
    expected = {alice: 200, rita: 200, audrey: 200, ada: 200, mallory: 404, ruth: 404}
    for user, status in expected.items():
        client.force_authenticate(user)
        response = client.get(url)
        assert response.status_code == status, (user.username, response.status_code)
        if status == 200:
            assert response["Content-Type"] == "application/zip"
            assert f"loupe-case-{case.pk}-export.zip" in response["Content-Disposition"]
            assert "manifest.json" in _zip(response.content).namelist()
    client.force_authenticate(alice)
    assert client.get("/api/cases/999999/export").status_code == 404


def test_it_exports_a_case_without_a_report_and_says_so(media, case_with_evidence):
    from governance.reports import export_case_zip

    bundle = _zip(export_case_zip(case_with_evidence))
    assert "manifest-unreported.json" in bundle.namelist()
    assert not any(n.startswith("report/") for n in bundle.namelist())
    assert "No report has been issued" in bundle.read("README.txt").decode()

"""Reports as an auditor reads them: every AI Act section, real figures, stable bytes, versions.

Actors from ``tests/conftest.py``: alice submits Acme's case, rita and rob review it, ada assigns.
The full report is rendered once per module (inside a transaction that is rolled back) because a
render takes seconds; tests then read that PDF.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess

import pytest
from django.db import transaction
from django.test import override_settings
from pypdf import PdfReader

from governance.models import ImmutableError, Report
from governance.reports import generate_report, render_case
from governance.reports.context import SECTIONS
from governance.reports.manifest import ATTACHMENT_NAME, extract_from_pdf, manifest_sha256
from tests.report_fixtures import ALL_KINDS, acme_case

# Every test touches the database; the mark also makes pytest-django create the test database
# before the module-scoped fixtures below use it (without it they would hit the real one).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture(scope="module")
def full_report(django_db_setup, django_db_blocker, tmp_path_factory, test_probe_kind):
    """The demo case (every probe kind, two approvals) rendered twice; the database is rolled back."""
    media = tmp_path_factory.mktemp("media")
    with django_db_blocker.unblock(), override_settings(MEDIA_ROOT=str(media)), transaction.atomic():
        case, _ = acme_case(ALL_KINDS)
        first, manifest = render_case(case, version=1)
        second, _ = render_case(case, version=1)
        transaction.set_rollback(True)
    return {"first": first, "second": second, "manifest": manifest}


def _pages_text(pdf: bytes) -> list[str]:
    return [page.extract_text() or "" for page in PdfReader(io.BytesIO(pdf)).pages]


def test_it_renders_every_section_labelled_with_its_requirement(full_report):
    text = re.sub(r"\s+", " ", " ".join(_pages_text(full_report["first"].pdf)))
    for section in SECTIONS:
        assert section.title.split(":")[0] in text, section.title
        assert section.requirement in text, section.requirement
    manifest = full_report["manifest"]
    assert manifest_sha256(manifest) in text.replace(" ", "") or manifest_sha256(manifest)[:32] in text
    for phrase in ("Acme CLIP", "Acme Vision GmbH", "APPROVED", "Watermark concept drives", "Page 3 of",
                   "Run #", "Glossary"):
        assert phrase in text, phrase
    assert full_report["first"].pages >= 15
    assert full_report["first"].refused_urls == []


def test_it_embeds_every_stored_figure_and_summary_figures(full_report):
    reader = PdfReader(io.BytesIO(full_report["first"].pdf))
    images = 0  # image XObjects drawn on the pages (counted, not decoded)
    for page in reader.pages:
        xobjects = (page.get("/Resources") or {}).get("/XObject") or {}
        images += sum(1 for ref in xobjects.values() if ref.get_object().get("/Subtype") == "/Image")
    stored_pngs = sum(1 for e in full_report["manifest"]["evidence"] for a in e["artifacts"]
                      if a["content_type"] == "image/png")
    assert stored_pngs == len(ALL_KINDS)
    # stored grids + TCAV bars + curves (grounding, robustness) + per-method bars (grounding)
    assert images >= stored_pngs + 4
    text = " ".join(_pages_text(full_report["first"].pdf))
    assert "Figure 1." in text and f"Figure {stored_pngs + 4}." in text


def test_it_renders_pages_that_are_not_blank(full_report, tmp_path):
    assert shutil.which("pdftoppm"), "pdftoppm (poppler-utils) is required to rasterise report pages"
    from PIL import Image, ImageStat

    path = tmp_path / "report.pdf"
    path.write_bytes(full_report["first"].pdf)
    subprocess.run(["pdftoppm", "-r", "30", "-gray", "-png", str(path), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == full_report["first"].pages
    for page in pages:
        image = Image.open(page).convert("L")
        inked = sum(image.histogram()[:200]) / (image.width * image.height)
        assert inked > 0.005, f"{page.name} is blank ({inked:.4f} of pixels inked)"
        assert ImageStat.Stat(image).stddev[0] > 5


def test_it_renders_the_same_case_state_to_identical_bytes(full_report):
    first, second = full_report["first"].pdf, full_report["second"].pdf
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    info = PdfReader(io.BytesIO(first)).metadata
    as_of = full_report["manifest"]["as_of"][:19].replace("-", "").replace("T", "").replace(":", "")
    assert info["/CreationDate"].startswith(f"D:{as_of}")


def test_it_is_pdfa3b_with_the_manifest_embedded(full_report):
    pdf = full_report["first"].pdf
    reader = PdfReader(io.BytesIO(pdf))
    xmp = reader.trailer["/Root"]["/Metadata"].get_object().get_data().decode()
    assert 'pdfaid:part="3"' in xmp and 'pdfaid:conformance="B"' in xmp
    assert list(reader.attachments) == [ATTACHMENT_NAME]
    assert extract_from_pdf(pdf) == full_report["manifest"]
    assert reader.trailer["/Root"]["/AF"]  # PDF/A-3 associated file


def test_it_issues_immutable_versions_with_a_change_log_and_names_what_is_missing(db, settings, tmp_path,
                                                                                  test_probe_kind):
    settings.MEDIA_ROOT = str(tmp_path)
    settings.LOUPE_SIGNING_KEY = ""  # unsigned here; signing has its own tests
    case, actors = acme_case(("grounding",), approve=False)
    v1 = generate_report(case, author=actors["ada"])
    v1_bytes = v1.pdf.open("rb").read()
    assert (v1.version, v1.supersedes, v1.changelog[0]["change"]) == (1, None, "first_version")
    assert hashlib.sha256(v1_bytes).hexdigest() == v1.sha256

    # Only grounding was probed: every other kind says so in words instead of vanishing.
    text = re.sub(r"\s+", " ", " ".join(_pages_text(v1_bytes)))
    for missing in ("concept tests (tcav)", "shortcut detection", "robustness probes", "causal interventions"):
        assert f"No {missing} evidence was recorded for this case" in text
    assert "AWAITING REVIEW" in text and "No reviewer has signed off" in text

    from governance import workflow
    from governance.models import AuditEvent

    workflow.sign_off(case, actors["rita"], "request_changes", "Please add the TCAV probe.")
    v2 = generate_report(case, author=actors["ada"])
    assert v2.version == 2 and v2.supersedes == v1
    changes = {c["change"] for c in v2.changelog}
    assert {"signoff_added", "state_changed"} <= changes
    assert v2.manifest["report"]["version"] == 2
    assert AuditEvent.objects.filter(action="report.issued", case=case).count() == 2

    # v1 is untouched, and can be altered through no ORM path.
    v1.refresh_from_db()
    assert v1.pdf.open("rb").read() == v1_bytes
    v1.changelog = []
    with pytest.raises(ImmutableError):
        v1.save()
    with pytest.raises(ImmutableError):
        Report.objects.filter(pk=v1.pk).update(sha256="0" * 64)
    with pytest.raises(ImmutableError):
        v1.delete()
    with pytest.raises(ImmutableError):
        Report.objects.filter(pk=v1.pk).delete()
    assert Report.objects.get(pk=v1.pk).sha256 == v1.sha256


def test_it_records_replaced_and_added_evidence_in_the_change_log():
    from governance.reports.versions import changelog

    def manifest(evidence, signoffs=()):
        return {"case": {"state": "in_review"}, "model": {"manifest_hash": "m"}, "model_card": {}, "model_info": {},
                "runs": [{"id": run, "params": {"p": kind}, "dataset": "d"} for (_, run, kind, _) in evidence],
                "evidence": [{"id": e, "run_id": run, "kind": kind, "digest": d} for (e, run, kind, d) in evidence],
                "signoffs": list(signoffs)}

    before = manifest([(1, 10, "grounding", "a"), (2, 11, "tcav", "b")])
    after = manifest([(3, 12, "grounding", "c"), (2, 11, "tcav", "b"), (4, 13, "robustness", "d")],
                     [{"id": 7, "reviewer": {"name": "Rita"}, "decision": "approve"}])
    changes = {(c["change"], c.get("evidence") or c.get("signoff")) for c in changelog(before, after)}
    assert changes == {("evidence_replaced", 3), ("evidence_added", 4), ("signoff_added", 7)}
    assert changelog(after, after)[0]["change"] == "no_change"

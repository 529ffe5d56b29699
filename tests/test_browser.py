"""The reviewer workspace in a real browser: headless Chromium (Debian's package, installed by
``.ci/run``) driven by Playwright against pytest-django's ``live_server``.

rita logs in to the admin, opens Acme's case, sees the heatmaps load, signs the case off, generates
a report and downloads it. A screenshot of the review page is saved to
``test-artifacts/review-page.png`` (gitignored; CI keeps it as an artifact).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.urls import reverse

from tests.review_fixtures import admit, make_review_case

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.mark.django_db(transaction=True)
def test_it_lets_a_reviewer_review_sign_off_and_download_a_report_in_a_browser(
        live_server, browser_page, draft_case, alice, ada, rita, rob, tmp_path):
    from governance.models import AuditCase, Report, Signoff

    admit(rita)
    case, evidence = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    page = browser_page

    # Log in through the admin's own form.
    page.goto(live_server.url + reverse("admin:login"))
    page.fill("#id_username", "rita")
    page.fill("#id_password", "rita-pw-1234")
    page.click("input[type=submit]")
    page.wait_for_url(live_server.url + reverse("admin:index"))

    # Open the case from the case list.
    page.goto(live_server.url + reverse("admin:governance_auditcase_changelist"))
    page.click("text=Review workspace")
    page.wait_for_url(f"**/auditcase/{case.pk}/review/")
    assert "Acme CLIP 1.0 grounding audit" in page.inner_text("h1")

    # The heatmaps are real, decoded images served through the permission-checked view.
    heatmaps = page.locator("img.heatmap")
    assert heatmaps.count() == 2
    for i in range(heatmaps.count()):
        heatmaps.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete", arg=heatmaps.nth(i).element_handle())
        assert heatmaps.nth(i).evaluate("img => img.naturalWidth") > 0
    assert "Shortcut on watermark" in page.inner_text("#evidence")

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "review-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 20_000

    # Sign off the whole case.
    form = page.locator("#case-signoff")
    form.locator("input[value=approve]").check()
    form.locator("textarea[name=comment]").fill("Grounding evidence is sound; the watermark finding is documented.")
    form.locator("button[type=submit]").click()
    page.click("#confirm-button")  # the confirmation step shows the digest being signed
    page.wait_for_selector("text=Recorded your 'Approve' on case")
    assert Signoff.objects.filter(case=case, reviewer=rita, decision="approve", evidence=None).count() == 1
    assert AuditCase.objects.get(pk=case.pk).state == AuditCase.State.IN_REVIEW

    # Generate a report and download it.
    page.click("#generate-report")
    page.wait_for_selector("a.report-download", timeout=60_000)
    with page.expect_download() as download_info:
        page.click("a.report-download")
    download = download_info.value
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    assert download.suggested_filename == f"loupe-case-{case.pk}-report-v1.pdf"
    assert target.read_bytes().startswith(b"%PDF")
    assert Report.objects.get(case=case).sha256 == hashlib.sha256(target.read_bytes()).hexdigest()

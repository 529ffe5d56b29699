"""The reviewer and provider flows in Debian's chromium (Playwright), with the axe-core check on every
page a reviewer or provider works on and screenshots in ``test-artifacts/``.

Reviewer (rita, 1440x900): log in -> landing -> review queue -> workspace -> heatmap viewer ->
sign-off with its confirmation. Provider (alice): log in -> portal -> upload a version -> open a
case from a plan template -> start the runs and watch them finish live -> a reviewer requests
changes -> answer and resubmit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from django.urls import reverse

from tests.accessibility import assert_accessible
from tests.review_fixtures import admit, make_review_case, make_second_version

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LOUPE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}


@pytest.fixture
def page(tmp_path, monkeypatch):
    """A fresh Chromium profile and page at 1440x900. Fails (never skips) without Chromium."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            accept_downloads=True, viewport=VIEWPORT, bypass_csp=True)
        context.set_default_timeout(30_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture
def axe_report():
    report: dict[str, list[dict]] = {}
    yield report
    ARTIFACTS.mkdir(exist_ok=True)
    existing = ARTIFACTS / "axe-report.json"
    merged = json.loads(existing.read_text()) if existing.exists() else {}
    merged.update(report)
    existing.write_text(json.dumps(merged, indent=2) + "\n")


def shot(page, name: str, *, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def log_in(page, base: str, username: str) -> None:
    page.goto(base + reverse("login"))
    page.fill("#id_username", username)
    page.fill("#id_password", f"{username}-pw-1234")
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


def switch_user(page, base: str, username: str) -> None:
    """Log out by dropping the cookies, then log in as ``username``. The page is left first: its
    status poll, still running, would fetch the login page without a session and set a CSRF cookie
    of its own after the login form's, and the form would then be refused."""
    page.goto("about:blank")
    page.context.clear_cookies()
    log_in(page, base, username)


@pytest.mark.django_db(transaction=True)
def test_a_reviewer_goes_from_the_queue_to_a_confirmed_sign_off(live_server, page, axe_report, draft_case,
                                                                alice, ada, rita, rob):
    from governance.models import AuditCase, Signoff

    admit(rita)
    case, evidence = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    base = live_server.url
    log_in(page, base, "rita")
    page.click("#go-queue")
    page.wait_for_url("**/auditcase/queue/")
    assert "Loupe" in page.inner_text("#site-name")
    row = page.locator(f"#awaiting-me #queue-case-{case.pk}")
    assert "high" in row.inner_text() and "Limited" in row.inner_text()
    shot(page, "reviewer-1-queue.png")
    assert_accessible(page, "queue", axe_report)

    row.locator("a.open-workspace").click()
    page.wait_for_url(f"**/auditcase/{case.pk}/review/")
    # The first screen (1440x900) holds the verdict and the findings, before any scrolling.
    decision = page.locator("#decision")
    assert decision.bounding_box()["y"] < VIEWPORT["height"]
    assert page.locator("#verdict").is_visible() and "Awaiting sign-off" in page.inner_text("#verdict")
    first_finding = page.locator("#decision-findings li").first
    assert "Shortcut on watermark" in first_finding.inner_text()
    assert first_finding.bounding_box()["y"] < VIEWPORT["height"]
    shot(page, "reviewer-2-workspace-first-screen.png")
    shot(page, "reviewer-2-workspace-full.png", full_page=True)
    assert_accessible(page, "workspace", axe_report)

    # A finding links to its evidence.
    first_finding.locator("a").click()
    assert page.evaluate("location.hash") == f"#evidence-{evidence.pk}"

    # Heatmap viewer: the figure, its description, zoom, the other figure one click away.
    heatmap = page.locator("img.heatmap").first
    alt = heatmap.get_attribute("alt")
    assert "grounding probe" in alt and not alt.endswith(".png")
    heatmap.click()
    page.wait_for_url("**/view/")
    image = page.locator("#viewer-image")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    fitted = image.bounding_box()["width"]
    page.click("[data-zoom=in]")
    assert image.bounding_box()["width"] > fitted * 1.2
    assert "Zoom" in page.inner_text("#zoom-level")
    page.click("[data-zoom=fit]")
    assert page.locator(".colour-bar-gradient").is_visible() and page.locator(".box-legend").is_visible()
    shot(page, "reviewer-3-viewer.png")
    assert_accessible(page, "viewer", axe_report)
    toggles = page.locator(".method-toggle a")
    assert toggles.count() == 2
    toggles.nth(1).click()
    page.wait_for_url("**/view/")
    page.click("text=Back to the workspace")
    page.wait_for_url(f"**/auditcase/{case.pk}/review/**")

    # Sign-off: nothing preselected; the field error shows at the field; then confirm the digest.
    form = page.locator("#case-signoff")
    assert form.locator("input[type=radio]:checked").count() == 0
    form.locator("input[value=reject]").check()
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#comment-error")
    assert "needs a comment" in page.inner_text("#comment-error")
    assert Signoff.objects.count() == 0
    form = page.locator("#case-signoff")
    form.locator("input[value=approve]").check()
    form.locator("#case-comment").fill("Grounding evidence is sound; the watermark finding is documented.")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#confirm-signoff")
    from governance import workflow

    assert page.inner_text("#signed-digest") == workflow.case_digest(AuditCase.objects.get(pk=case.pk))
    assert Signoff.objects.count() == 0
    shot(page, "reviewer-4-confirm.png")
    assert_accessible(page, "confirm", axe_report)
    page.click("#confirm-button")
    page.wait_for_selector("text=Recorded your 'Approve' on case")
    assert Signoff.objects.filter(case=case, reviewer=rita, decision="approve").count() == 1

    # The same approval again is refused with a clear message.
    form = page.locator("#case-signoff")
    form.locator("input[value=approve]").check()
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#confirm-button")
    page.click("#confirm-button")
    page.wait_for_selector("#review-error")
    assert "a decision counts once" in page.inner_text("#review-error")
    assert Signoff.objects.filter(case=case, reviewer=rita).count() == 1
    shot(page, "reviewer-5-duplicate-refused.png")


@pytest.mark.django_db(transaction=True)
def test_a_provider_uploads_opens_a_case_watches_runs_and_resubmits(live_server, page, axe_report, tmp_path,
                                                                    acme_model, alice, ada, rita, rob):
    from governance import workflow
    from governance.models import AuditCase, ModelVersion
    from tests.model_archives import model_members, zip_bytes
    from tests.tiny_models import save_tiny_clip
    from workers import local

    local.enable()  # what governance.wsgi does for `make serve`
    try:
        base = live_server.url
        log_in(page, base, "alice")
        page.click("#go-portal")
        page.wait_for_url("**/portal/")
        assert_accessible(page, "portal-home", axe_report)

        archive = tmp_path / "acme-clip-2.zip"
        archive.write_bytes(zip_bytes(model_members(save_tiny_clip(tmp_path / "acme-clip-2"))))
        upload = page.locator(f"#upload-{acme_model.pk}")
        upload.locator("input[name=version]").fill("2.0")
        upload.locator("input[name=archive]").set_input_files(str(archive))
        with page.expect_navigation():
            upload.locator("button[type=submit]").click()
        version = ModelVersion.objects.get(ai_model=acme_model, version="2.0")
        assert "Version 2.0" in page.inner_text(f"#upload-{acme_model.pk} >> xpath=..")

        # A refusal from the API is shown at the field: the same label again.
        upload = page.locator(f"#upload-{acme_model.pk}")
        upload.locator("input[name=version]").fill("2.0")
        upload.locator("input[name=archive]").set_input_files(str(archive))
        upload.locator("button[type=submit]").click()
        page.wait_for_selector(f"#version-{acme_model.pk}-error")
        assert "taken" in page.inner_text(f"#version-{acme_model.pk}-error")

        page.select_option("#case-version", str(version.pk))
        page.fill("#case-title", "Acme CLIP 2.0 quick audit")
        page.select_option("#case-plan", "quick")
        with page.expect_navigation():
            page.click("#open-case button[type=submit]")
        case = AuditCase.objects.get(title="Acme CLIP 2.0 quick audit")
        workflow.assign_reviewers(case, [rita, rob], by=ada)
        page.click("text=Submit for probing")
        page.wait_for_selector("text=Start probe runs")
        page.click("text=Start probe runs")
        page.wait_for_selector("#run-live")
        shot(page, "provider-1-runs-live.png")
        assert_accessible(page, "portal-case-running", axe_report)
        # The page follows the runs and reloads itself when they are done.
        page.wait_for_function("!document.getElementById('case-state').textContent.includes('Running')",
                               timeout=150_000)
        page.wait_for_selector("#findings-title")
        case.refresh_from_db()
        assert case.state == AuditCase.State.EVIDENCE_READY

        workflow.sign_off(case, rita, "request_changes", "Add the robustness probe and explain the colour bias.")
        page.reload()
        assert "explain the colour bias" in page.inner_text("#change-requests")
        page.fill("#answer", "Robustness added to the next plan; the colour bias comes from the shop's photos.")
        shot(page, "provider-2-change-request.png", full_page=True)
        assert_accessible(page, "portal-case-changes", axe_report)
        page.click("text=Resubmit with my answer")
        page.wait_for_selector("text=Resubmitted with your answer")
        case.refresh_from_db()
        assert case.state == AuditCase.State.SUBMITTED
    finally:
        local.disable()
        local.wait_idle(120)


@pytest.mark.django_db(transaction=True)
def test_comment_threads_and_version_comparison(live_server, page, axe_report, draft_case, acme_model, alice, ada,
                                                rita, rob, test_probe_kind):
    """Rob asks in a finding's thread, alice answers in the portal, rob sees the answer beside the
    finding and compares the two versions of the model he reviews; each page passes axe."""
    from governance.models import FindingComment

    admit(alice, ada, rita, rob)
    case, evidence = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    second = make_second_version(acme_model, test_probe_kind, alice=alice, ada=ada, reviewers=[rob, rita])
    base = live_server.url
    log_in(page, base, "rob")
    page.goto(base + reverse("admin:governance_auditcase_review", args=[case.pk]))
    thread = page.locator(f"#evidence-{evidence.pk} .thread").first
    thread.locator("summary").click()
    thread.locator("textarea").fill("Is the logo in every training image?")
    with page.expect_navigation():
        thread.locator("button[type=submit]").click()
    assert FindingComment.objects.filter(author=rob).count() == 1

    switch_user(page, base, "alice")
    page.goto(base + reverse("portal:case", args=[case.pk]))
    portal_thread = page.locator(f"#evidence-{evidence.pk} .thread").first
    assert "logo in every training image" in portal_thread.inner_text()
    portal_thread.locator("textarea").fill("Only in the shop's own photos; retrained without it in 2.0.")
    assert_accessible(page, "portal-case-thread", axe_report)
    with page.expect_navigation():
        portal_thread.locator("button[type=submit]").click()

    switch_user(page, base, "rob")
    page.goto(base + reverse("admin:governance_auditcase_review", args=[case.pk]))
    assert "retrained without it" in page.locator(f"#evidence-{evidence.pk} .thread").first.inner_text()
    shot(page, "reviewer-4-thread.png", full_page=True)
    assert_accessible(page, "workspace-thread", axe_report)
    page.click("#compare-versions")
    page.select_option("#with", str(second.pk))
    with page.expect_navigation():
        page.click("#choose-version button[type=submit]")
    assert "2 fields changed" in page.inner_text("#card")
    shot(page, "reviewer-5-compare.png", full_page=True)
    assert_accessible(page, "compare-versions", axe_report)

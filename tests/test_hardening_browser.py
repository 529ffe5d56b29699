"""Attack 9 (issue #20): every response carries a Content-Security-Policy, and the admin, the review
workspace and Swagger UI still work under it in a real browser (no violation reported)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.review_fixtures import admit, make_review_case

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.mark.parametrize("url", ["/admin/login/", "/api/docs/", "/api/schema/", "/api/models/", "/healthz",
                                 "/api/no-such-thing/"])
def test_every_response_has_a_content_security_policy(url):
    response = Client().get(url)
    policy = response.get("Content-Security-Policy", "")
    assert "default-src 'self'" in policy, (url, response.status_code, policy)
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy


def _watch_violations(page) -> list[str]:
    seen: list[str] = []
    page.on("console",
            lambda msg: seen.append(f"{page.url}: {msg.text}") if "Content Security Policy" in msg.text else None)
    page.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                         "console.error('Content Security Policy violation: ' + e.violatedDirective + ' ' "
                         "+ e.blockedURI));")
    return seen


@pytest.mark.django_db(transaction=True)
def test_admin_review_workspace_and_swagger_work_under_the_policy(live_server, browser_page, draft_case, alice,
                                                                   ada, rita, rob):
    admit(rita)
    case, _evidence = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    page = browser_page
    violations = _watch_violations(page)

    page.goto(live_server.url + reverse("admin:login"))
    page.fill("#id_username", "rita")
    page.fill("#id_password", "rita-pw-1234")
    page.click("input[type=submit]")
    page.wait_for_url(live_server.url + reverse("admin:index"))

    page.goto(live_server.url + reverse("admin:governance_auditcase_changelist"))
    page.click("text=Review workspace")
    page.wait_for_url(f"**/auditcase/{case.pk}/review/")
    heatmaps = page.locator("img.heatmap")
    assert heatmaps.count() == 2
    for i in range(heatmaps.count()):
        heatmaps.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete", arg=heatmaps.nth(i).element_handle())
        assert heatmaps.nth(i).evaluate("img => img.naturalWidth") > 0

    # Swagger UI renders the schema's operations (its scripts and styles come from our own files).
    page.goto(live_server.url + "/api/docs/")
    page.wait_for_selector(".opblock-tag", timeout=30_000)
    assert page.locator(".opblock").count() > 10
    assert violations == [], violations

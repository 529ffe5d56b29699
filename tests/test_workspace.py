"""The reviewer's first screen, the queue, the figure viewer, the landing page and the provider
portal, through Django's test client (the browser flows are in ``test_browser_flows.py``)."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from governance import workflow
from governance.models import AuditCase, Signoff
from tests.review_fixtures import admit, make_review_case

S = AuditCase.State


@pytest.fixture
def review_case(draft_case, alice, ada, rita, rob, ruth, mallory):
    admit(ada, rita, rob, ruth)
    case, _ = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    return case


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def page_of(client, case) -> str:
    response = client.get(reverse("admin:governance_auditcase_review", args=[case.pk]))
    assert response.status_code == 200
    return response.content.decode()


def test_the_workspace_puts_the_decision_first_the_evidence_next_and_the_sign_off_last(review_case, rita):
    page = page_of(client_for(rita), review_case)
    positions = [page.index(f'id="{anchor}"') for anchor in ("decision", "evidence", "signoff")]
    assert positions == sorted(positions)
    decision = page[positions[0]:positions[1]]
    assert "Awaiting sign-off: 0 of 2 approvals" in decision
    # findings by severity, the high one first, each linked to its evidence
    titles = re.findall(r'<a href="#evidence-\d+">([^<]+)</a>', decision)
    assert titles[:3] == ["Shortcut on watermark", "Slight colour bias", "Sanity checks passed"]
    assert "Not tested" in decision
    # nothing preselected: no checked radio, every select starts with an empty choice
    form = page[page.index('id="case-signoff"'):]
    assert " checked" not in form[:form.index("</form>")]
    for select in re.findall(r'<select name="decision"[^>]*>(.*?)</select>', page, re.S):
        assert select.startswith('<option value="">')
    # metrics carry a human label, a meaning and the criterion
    assert "Pointing game" in page and "inside the named object" in page and "higher is better" in page
    # figures describe themselves and open in the viewer
    assert 'alt="heatmap-grid.png"' not in page
    assert reverse("admin:governance_auditcase_review_viewer", args=[review_case.pk, 1]).rsplit("/", 3)[0] in page


def test_sign_off_shows_the_digest_then_records_only_on_confirmation(review_case, rita):
    client = client_for(rita)
    signoff_url = reverse("admin:governance_auditcase_review_signoff", args=[review_case.pk])
    confirm = client.post(signoff_url, {"decision": "approve", "comment": "Sound."})
    assert confirm.status_code == 200
    digest = workflow.case_digest(review_case)
    assert digest in confirm.content.decode()
    assert not Signoff.objects.filter(case=review_case).exists()
    stale = client.post(signoff_url, {"decision": "approve", "comment": "Sound.", "digest": "0" * 64})
    assert stale.status_code == 409 and "nothing was recorded" in stale.content.decode()
    done = client.post(signoff_url, {"decision": "approve", "comment": "Sound.", "digest": digest})
    assert done.status_code == 302
    assert Signoff.objects.get(case=review_case).digest == digest
    again = client.post(signoff_url, {"decision": "approve", "comment": "Again.", "digest": digest})
    assert again.status_code == 400 and "a decision counts once" in again.content.decode()


def test_sign_off_errors_are_shown_at_the_field(review_case, rita):
    response = client_for(rita).post(reverse("admin:governance_auditcase_review_signoff", args=[review_case.pk]),
                                     {"decision": "reject", "comment": ""})
    assert response.status_code == 400
    page = response.content.decode()
    assert 'id="comment-error"' in page and "needs a comment saying why" in page
    assert 'aria-invalid="true" aria-describedby="comment-error"' in page
    missing = client_for(rita).post(reverse("admin:governance_auditcase_review_signoff", args=[review_case.pk]), {})
    assert missing.status_code == 400 and 'id="decision-error"' in missing.content.decode()


def test_the_queue_lists_what_awaits_my_sign_off_with_severity_and_risk(review_case, rita, ruth, ada):
    queue = reverse("admin:governance_auditcase_queue")
    page = client_for(rita).get(queue).content.decode()
    mine = page[page.index('id="awaiting-me"'):page.index('id="all-cases"')]
    assert f'id="queue-case-{review_case.pk}"' in mine
    assert "sev-high" in mine and "Open workspace" in mine
    assert reverse("admin:governance_auditcase_review", args=[review_case.pk]) in mine
    assert review_case.model_version.ai_model.get_risk_category_display() in mine
    # ruth is not assigned: the case is not hers to see at all
    assert f"queue-case-{review_case.pk}" not in client_for(ruth).get(queue).content.decode()
    # the admin sees it, but not as awaiting their sign-off
    admin_page = client_for(ada).get(queue).content.decode()
    assert f'id="queue-case-{review_case.pk}"' in admin_page[admin_page.index('id="all-cases"'):]


def test_the_viewer_shows_one_figure_with_scale_legend_toggle_and_description(review_case, rita, mallory):
    evidence = review_case.runs.get().evidence
    grid = evidence.artifacts.get(name="heatmap-grid.png")
    viewer = reverse("admin:governance_auditcase_review_viewer", args=[review_case.pk, grid.pk])
    page = client_for(rita).get(viewer).content.decode()
    assert "colour-bar-gradient" in page and "green box" in page
    assert 'data-zoom="in"' in page and "admin-review/viewer.js" in page
    other = evidence.artifacts.get(name="heatmap-chefer-0.png")
    assert reverse("admin:governance_auditcase_review_viewer", args=[review_case.pk, other.pk]) in page
    alt = re.search(r'<img id="viewer-image"[^>]*alt="([^"]+)"', page).group(1)
    assert "grounding probe" in alt and alt != grid.name
    assert "<script>" not in page.split("</head>")[1]  # no inline script (CSP)
    csv = evidence.artifacts.get(name="scores.csv")
    assert client_for(rita).get(reverse("admin:governance_auditcase_review_viewer",
                                        args=[review_case.pk, csv.pk])).status_code == 404
    mallory.is_staff = True
    mallory.save()
    assert client_for(mallory).get(viewer).status_code == 404


@pytest.mark.django_db
def test_the_landing_page_and_the_admin_say_loupe(client, rita):
    landing = client.get("/")
    assert landing.status_code == 200 and "Loupe audits vision-language models" in landing.content.decode()
    admit(rita)
    admin_page = client_for(rita).get(reverse("admin:index")).content.decode()
    assert "Django administration" not in admin_page and "Loupe" in admin_page
    assert reverse("admin:governance_auditcase_queue") in client_for(rita).get("/").content.decode()


def test_the_portal_shows_a_provider_their_case_and_nobody_else_s(review_case, alice, mallory):
    home = client_for(alice).get(reverse("portal:home"))
    assert home.status_code == 200 and review_case.title in home.content.decode()
    assert review_case.title not in client_for(mallory).get(reverse("portal:home")).content.decode()
    assert client_for(mallory).get(reverse("portal:case", args=[review_case.pk])).status_code == 404
    page = client_for(alice).get(reverse("portal:case", args=[review_case.pk])).content.decode()
    assert "Shortcut on watermark" in page


def test_a_provider_answers_a_change_request_and_resubmits(review_case, alice, rita):
    client = client_for(rita)
    url = reverse("admin:governance_auditcase_review_signoff", args=[review_case.pk])
    client.post(url, {"decision": "request_changes", "comment": "Explain the watermark.",
                      "digest": workflow.case_digest(review_case)})
    review_case.refresh_from_db()
    assert review_case.state == S.CHANGES_REQUESTED
    provider = client_for(alice)
    page = provider.get(reverse("portal:case", args=[review_case.pk])).content.decode()
    assert "Explain the watermark." in page and "Resubmit with my answer" in page
    transition = reverse("portal:case_transition", args=[review_case.pk])
    refused = provider.post(transition, {"to": S.SUBMITTED, "answer": ""})
    assert refused.status_code == 400
    assert provider.post(transition, {"to": S.SUBMITTED, "answer": "The logo was removed from the data."}
                         ).status_code == 302
    review_case.refresh_from_db()
    assert review_case.state == S.SUBMITTED
    from governance.models import AuditEvent

    event = AuditEvent.objects.filter(case=review_case, action="case.submitted").latest("seq")
    assert "The logo was removed" in str(event.data)
    # rita may not drive the provider's case
    assert client_for(rita).post(transition, {"to": S.DRAFT}).status_code in (403, 404)


def test_runs_still_going_are_not_called_partial_evidence(draft_case, alice, ada):
    """A provider who just started the runs sees them running, not a "partial evidence" warning."""
    workflow.submit(draft_case, alice)
    workflow.start_runs(draft_case)
    page = client_for(alice).get(reverse("portal:case", args=[draft_case.pk])).content.decode()
    assert "Running probes" in page and "Partial evidence" not in page
    admin_page = page_of(client_for(ada), draft_case)
    assert "No decision possible yet" in admin_page and "Partial evidence" not in admin_page

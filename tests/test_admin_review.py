"""The reviewer workspace in the admin (governance/admin_review.py), through Django's test client.

Actors (conftest.py): alice submitted Acme's case, rita and rob review it, ruth reviews nothing,
mallory is at Globex, audrey audits (reads everything, changes nothing), ada administers.
Every one of them has staff status here, so the admin's door is open and Loupe's own rules decide.
"""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from governance import audit_log
from governance.models import AuditCase, Report, Signoff
from tests.review_fixtures import HOSTILE, admit, make_review_case

S = AuditCase.State
ACTORS = ("anonymous", "mallory", "alice", "rita", "ruth", "audrey", "ada")


@pytest.fixture
def review_case(draft_case, alice, ada, rita, rob, ruth, mallory, audrey):
    admit(alice, ada, rita, rob, ruth, mallory, audrey)
    case, _ = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    return case


@pytest.fixture
def evidence(review_case):
    return review_case.runs.get().evidence


@pytest.fixture
def as_(request):
    def client_for(name: str) -> Client:
        client = Client()
        if name != "anonymous":
            client.force_login(request.getfixturevalue(name))
        return client
    return client_for


def sign(client, case, data: dict):
    """The workspace's two steps: the form shows what is signed, the confirmation records it."""
    first = client.post(url("_signoff", case), data)
    found = re.search(rb'name="digest" value="([0-9a-f]{64})"', first.content)
    if first.status_code != 200 or not found:
        return first
    return client.post(url("_signoff", case), {**data, "digest": found.group(1).decode()})


def url(name: str, case, *args) -> str:
    return reverse(f"admin:governance_auditcase_review{name}", args=[case.pk, *args])


def assert_login_redirect(response) -> None:
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------

PAGE = {"anonymous": 302, "mallory": 404, "alice": 200, "rita": 200, "ruth": 404, "audrey": 200, "ada": 200}


@pytest.mark.parametrize("actor", ACTORS)
def test_it_shows_the_review_page_to_exactly_who_may_see_the_case(review_case, as_, actor):
    response = as_(actor).get(url("", review_case))
    if actor == "anonymous":
        assert_login_redirect(response)
        return
    assert response.status_code == PAGE[actor]
    if response.status_code == 200:
        assert "Acme CLIP 1.0 grounding audit" in response.content.decode()


def test_it_shows_the_model_card_runs_evidence_findings_and_audit_log(review_case, evidence, as_):
    html = as_("rita").get(url("", review_case)).content.decode()
    for text in ("Acme CLIP", "Zero-shot product photo tagging", "Limited risk", "A tiny CLIP.",  # model card
                 f'id="run-{evidence.run.pk}"', "Succeeded", "100%",  # runs
                 "pointing_game", "0.81", "gradcam", "insertion_auc",  # metric tables
                 "Shortcut on watermark", "sev-high", "Slight colour bias",  # findings
                 "scores.csv", "case.evidence_ready", "every row's hashes check"):  # files, audit log
        assert text in html, text
    # Findings are listed most severe first.
    assert html.index("Shortcut on watermark") < html.index("Slight colour bias") < html.index("Sanity checks passed")
    # Heatmaps are <img> elements served by the permission-checked view, never raw media URLs.
    for artifact in evidence.artifacts.filter(content_type="image/png"):
        assert f'src="{url("_artifact", review_case, artifact.pk)}"' in html
    assert "/media/" not in html


def test_it_offers_forms_only_to_those_who_may_act(review_case, as_):
    rita = as_("rita").get(url("", review_case)).content.decode()
    assert url("_signoff", review_case) in rita and url("_report", review_case) in rita
    assert 'value="in_review"' in rita  # rita may open the review (workflow.available_transitions)

    alice = as_("alice").get(url("", review_case)).content.decode()
    assert url("_signoff", review_case) not in alice and url("_report", review_case) not in alice
    assert "Segregation of duties: alice created or submitted case" in alice

    audrey = as_("audrey").get(url("", review_case)).content.decode()
    for action in ("_signoff", "_report", "_transition"):
        assert url(action, review_case) not in audrey
    assert "read-only access" in audrey


def test_it_reports_run_progress_as_json_for_the_poller(draft_case, alice, ada, rita, rob, mallory, as_):
    from governance import workflow
    from governance.models import ProbeRun

    admit(rita, mallory)
    workflow.assign_reviewers(draft_case, [rita, rob], by=ada)
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case)
    ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.RUNNING, progress=0.25,
                            phase="image 2 of 8")
    ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.QUEUED)

    status = as_("rita").get(url("_status", draft_case)).json()
    assert status["state"] == "running" and status["active"] is True
    assert [(r["status"], r["percent"], r["phase"]) for r in status["runs"]] == [
        ("running", 25, "image 2 of 8"), ("queued", 0, "")]
    assert status["percent"] == 12
    page = as_("rita").get(url("", draft_case)).content.decode()
    assert 'data-active="1"' in page and "admin-review/review.js" in page
    assert as_("mallory").get(url("_status", draft_case)).status_code == 404


# --------------------------------------------------------------------------------------------------
# Actions: the API's rules, through the workflow
# --------------------------------------------------------------------------------------------------

SIGNOFF = {"anonymous": 302, "mallory": 404, "alice": 403, "rita": 302, "ruth": 404, "audrey": 403, "ada": 403}
REFUSAL = {"alice": "segregation of duties: alice created or submitted case",
           "audrey": "Auditors have read-only access",
           "ada": "only reviewers assigned to case"}


@pytest.mark.parametrize("actor", ACTORS)
def test_it_takes_a_case_sign_off_only_from_an_assigned_independent_reviewer(review_case, as_, actor):
    response = sign(as_(actor), review_case, {"decision": "approve", "comment": "Looks sound."})
    if actor == "anonymous":
        assert_login_redirect(response)
    else:
        assert response.status_code == SIGNOFF[actor]
    made = list(Signoff.objects.filter(case=review_case).values_list("reviewer__username", "decision"))
    if actor == "rita":
        assert response["Location"] == url("", review_case)
        assert made == [("rita", "approve")]
        review_case.refresh_from_db()
        assert review_case.state == S.IN_REVIEW  # one approval of two
    else:
        assert made == []
    if actor in REFUSAL:
        assert REFUSAL[actor] in response.content.decode()  # the refusal is shown on the page


def test_it_signs_off_one_evidence_item_and_records_its_digest(review_case, evidence, as_):
    from governance import workflow

    response = sign(as_("rita"), review_case, {"decision": "request_changes", "evidence": evidence.pk,
                                                              "comment": "Explain the watermark finding."})
    assert response.status_code == 302
    signoff = Signoff.objects.get(case=review_case)
    assert (signoff.evidence_id, signoff.decision, signoff.digest) == (
        evidence.pk, "request_changes", workflow.evidence_digest(evidence))
    review_case.refresh_from_db()
    assert review_case.state == S.IN_REVIEW  # an item sign-off never moves the case
    page = as_("rita").get(url("", review_case)).content.decode()
    assert "rita: request_changes on evidence #" in page and "Explain the watermark finding." in page


def test_it_approves_the_case_after_two_distinct_reviewers(review_case, as_, rob):
    admit(rob)
    rob_client = Client()
    rob_client.force_login(rob)
    assert sign(as_("rita"), review_case, {"decision": "approve"}).status_code == 302
    repeated = sign(as_("rita"), review_case, {"decision": "approve"})
    assert repeated.status_code == 400 and "a decision counts once" in repeated.content.decode()
    review_case.refresh_from_db()
    assert review_case.state == S.IN_REVIEW  # rita counts once
    assert sign(rob_client, review_case, {"decision": "approve"}).status_code == 302
    review_case.refresh_from_db()
    assert review_case.state == S.APPROVED


@pytest.mark.parametrize(("data", "status", "message"), [
    ({"decision": "reject"}, 400, "needs a comment"),
    ({"decision": "bless"}, 400, "unknown decision"),
    ({"decision": "approve", "evidence": "999999"}, 400, "is not part of case"),
    ({"decision": "approve", "evidence": "1; DROP"}, 400, "must be an evidence id"),
])
def test_it_refuses_bad_sign_offs_with_a_clear_message(review_case, as_, data, status, message):
    response = sign(as_("rita"), review_case, data)
    assert response.status_code == status
    assert message in response.content.decode()
    assert not Signoff.objects.filter(case=review_case).exists()


def test_it_rejects_the_case_with_a_comment(review_case, as_):
    response = sign(as_("rita"), review_case, {"decision": "reject", "comment": "Shortcut."})
    assert response.status_code == 302
    review_case.refresh_from_db()
    assert review_case.state == S.REJECTED
    page = as_("rita").get(url("", review_case)).content.decode()
    assert url("_signoff", review_case) not in page  # decided: no more sign-offs offered


TRANSITION = {"anonymous": 302, "mallory": 404, "alice": 403, "rita": 302, "ruth": 404, "audrey": 403, "ada": 302}


@pytest.mark.parametrize("actor", ACTORS)
def test_it_moves_the_case_only_as_the_workflow_allows(review_case, as_, actor):
    response = as_(actor).post(url("_transition", review_case), {"to": "in_review"})
    if actor == "anonymous":
        assert_login_redirect(response)
    else:
        assert response.status_code == TRANSITION[actor]
    review_case.refresh_from_db()
    assert review_case.state == (S.IN_REVIEW if actor in ("rita", "ada") else S.EVIDENCE_READY)


def test_it_refuses_an_illegal_transition_with_409(review_case, as_):
    response = as_("ada").post(url("_transition", review_case), {"to": "approved"})
    assert response.status_code == 409
    assert "cannot move from &#x27;evidence_ready&#x27; to &#x27;approved&#x27;" in response.content.decode()
    response = as_("ada").post(url("_transition", review_case), {"to": "nonsense"})
    assert response.status_code == 409 and "is not a case state" in response.content.decode()


REPORT_REFUSED = {"anonymous": 302, "mallory": 404, "alice": 403, "ruth": 404, "audrey": 403}


@pytest.mark.parametrize("actor", REPORT_REFUSED)
def test_it_refuses_report_generation_to_everyone_but_reviewers_and_admins(review_case, as_, actor):
    response = as_(actor).post(url("_report", review_case))
    if actor == "anonymous":
        assert_login_redirect(response)
    else:
        assert response.status_code == REPORT_REFUSED[actor]
    assert not Report.objects.filter(case=review_case).exists()


@pytest.mark.slow
def test_it_issues_a_report_and_serves_every_version_to_who_may_see_the_case(review_case, as_):
    # One rendering only: WeasyPrint takes seconds on the CI's two cores (ada's right to issue one is
    # the same role check as rita's; the browser test issues another).
    rita = as_("rita")
    response = rita.post(url("_report", review_case))
    assert response.status_code == 302
    report = Report.objects.get(case=review_case)
    assert report.version == 1 and report.author.username == "rita"
    page = rita.get(url("", review_case)).content.decode()
    assert "Issued report v1" in page and url("_report_download", review_case, report.pk) in page
    for actor, expected in {"rita": 200, "audrey": 200, "alice": 200, "ada": 200, "mallory": 404, "ruth": 404}.items():
        download = as_(actor).get(url("_report_download", review_case, report.pk))
        assert download.status_code == expected, actor
        if expected == 200:
            assert download["Content-Type"] == "application/pdf"
            assert b"".join(download.streaming_content).startswith(b"%PDF")


@pytest.mark.slow
def test_a_report_form_sent_twice_issues_one_version(review_case, as_):
    """A double click on "Generate report" (or the browser resending the form) repeats the page's
    request key; the second post answers with the version the first one issued."""
    rita = as_("rita")
    key = re.search(r'name="request_key" value="([0-9a-f]{32})"', rita.get(url("", review_case)).content.decode())
    assert key is not None
    first = rita.post(url("_report", review_case), {"request_key": key.group(1)}, follow=True)
    second = rita.post(url("_report", review_case), {"request_key": key.group(1)}, follow=True)
    assert first.status_code == second.status_code == 200
    assert list(Report.objects.filter(case=review_case).values_list("version", flat=True)) == [1]
    assert "already issued for this request" in second.content.decode()


def test_a_report_form_with_a_forged_request_key_is_refused(review_case, as_):
    response = as_("rita").post(url("_report", review_case), {"request_key": "../../other-case"})
    assert response.status_code == 400 and "request_key" in response.content.decode()
    assert not Report.objects.filter(case=review_case).exists()


def test_it_refuses_a_report_before_there_is_evidence(draft_case, ada, as_):
    admit(ada)
    response = as_("ada").post(url("_report", draft_case))
    assert response.status_code == 409 and "needs the evidence first" in response.content.decode()


ARTIFACT = {"anonymous": 302, "mallory": 404, "alice": 200, "rita": 200, "ruth": 404, "audrey": 200, "ada": 200}


@pytest.mark.parametrize("actor", ACTORS)
def test_it_serves_heatmaps_only_through_the_permission_checked_view(review_case, evidence, as_, actor):
    png = evidence.artifacts.get(name="heatmap-grid.png")
    response = as_(actor).get(url("_artifact", review_case, png.pk))
    if actor == "anonymous":
        assert_login_redirect(response)
        return
    assert response.status_code == ARTIFACT[actor]
    if response.status_code == 200:
        assert response["Content-Type"] == "image/png"
        assert "attachment" not in response.get("Content-Disposition", "")
        assert b"".join(response.streaming_content).startswith(b"\x89PNG")
        assert response["X-Content-SHA256"] == png.sha256
        assert "sandbox" in response["Content-Security-Policy"]


def test_it_serves_non_image_artifacts_as_downloads(review_case, evidence, as_):
    csv = evidence.artifacts.get(name="scores.csv")
    response = as_("audrey").get(url("_artifact", review_case, csv.pk))
    assert response.status_code == 200 and response["Content-Disposition"].startswith("attachment")
    assert response["Content-Type"] == "application/octet-stream"


def test_it_does_not_serve_another_cases_artifact_under_this_case(review_case, evidence, globex_case, as_):
    png = evidence.artifacts.get(name="heatmap-grid.png")
    assert as_("ada").get(url("_artifact", globex_case, png.pk)).status_code == 404


# --------------------------------------------------------------------------------------------------
# CSRF, escaping, GET-only and POST-only
# --------------------------------------------------------------------------------------------------


def test_it_refuses_a_post_without_a_csrf_token(review_case, rita):
    client = Client(enforce_csrf_checks=True)
    client.force_login(rita)
    response = sign(client, review_case, {"decision": "approve"})
    assert response.status_code == 403
    assert not Signoff.objects.filter(case=review_case).exists()
    page = client.get(url("", review_case)).content.decode()
    assert page.count('name="csrfmiddlewaretoken"') >= 4  # transitions, case sign-off, item sign-off, report


def test_it_refuses_get_on_actions_and_post_on_reads(review_case, as_):
    assert as_("rita").get(url("_signoff", review_case)).status_code == 405
    assert as_("rita").post(url("", review_case)).status_code == 405


def test_it_escapes_every_piece_of_user_text(draft_case, alice, ada, rita, rob, as_):
    from governance.models import AIModel

    admit(rita)
    AIModel.objects.filter(pk=draft_case.model_version.ai_model_id).update(intended_purpose=HOSTILE)
    draft_case.title = HOSTILE
    draft_case.scope = HOSTILE
    draft_case.save()
    case, evidence = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob, summary=HOSTILE)
    sign(as_("rita"), case, {"decision": "request_changes", "comment": HOSTILE, "evidence": evidence.pk})
    html = as_("rita").get(url("", case)).content.decode()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") >= 4  # title, purpose, scope, summary, comment


def test_it_records_actions_in_the_audit_log_it_shows(review_case, as_):
    sign(as_("rita"), review_case, {"decision": "approve"})
    actions = [row["action"] for row in audit_log.excerpt(review_case)]
    assert actions[-2:] == ["case.in_review", "signoff.created"]
    page = as_("audrey").get(url("", review_case)).content.decode()
    assert "signoff.created" in page and "rita" in page


def test_it_links_the_workspace_from_the_case_list_and_change_page(review_case, as_):
    changelist = as_("ada").get(reverse("admin:governance_auditcase_changelist")).content.decode()
    assert url("", review_case) in changelist
    change = as_("rita").get(reverse("admin:governance_auditcase_change", args=[review_case.pk])).content.decode()
    assert url("", review_case) in change


def test_it_enqueues_render_report_for_a_worker_when_a_broker_is_configured(review_case, as_, monkeypatch):
    from governance import pipeline
    from workers import tasks

    sent = []
    monkeypatch.setattr(pipeline, "broker_is_eager", lambda: False)
    monkeypatch.setattr(pipeline, "check_broker", lambda timeout=3.0: None)
    monkeypatch.setattr(tasks, "enqueue_on_commit", lambda task, *args: sent.append((task.name, args)))
    rita = as_("rita")
    response = rita.post(url("_report", review_case))
    assert response.status_code == 302
    rita_pk = review_case.reviewers.get(username="rita").pk
    assert [(name, args[:2]) for name, args in sent] == [("workers.tasks.render_report", (review_case.pk, rita_pk))]
    assert sent[0][1][2].startswith(f"workspace:{rita_pk}:")  # the request's key: a redelivery issues no second version
    assert not Report.objects.filter(case=review_case).exists()  # the worker issues it
    assert "rendered by a worker" in rita.get(url("", review_case)).content.decode()


def test_it_says_so_when_the_broker_is_down(review_case, as_, monkeypatch):
    from governance import pipeline

    def down(timeout=3.0):
        raise pipeline.BrokerUnavailable("the task broker is unreachable, so no probe can be queued")

    monkeypatch.setattr(pipeline, "broker_is_eager", lambda: False)
    monkeypatch.setattr(pipeline, "check_broker", down)
    response = as_("rita").post(url("_report", review_case))
    assert response.status_code == 503 and "the task broker is unreachable" in response.content.decode()


def test_it_starts_runs_through_the_pipeline(draft_case, alice, as_, monkeypatch):
    from governance import pipeline, workflow

    admit(alice)
    workflow.submit(draft_case, by=alice)
    page = as_("alice").get(url("", draft_case)).content.decode()
    assert 'value="running"' in page and 'value="draft"' in page  # start or withdraw: alice owns the case
    started = []
    monkeypatch.setattr(pipeline, "start_case", lambda case_id, by=None: started.append((case_id, by.username)) or [7])
    response = as_("alice").post(url("_transition", draft_case), {"to": "running"})
    assert response.status_code == 302 and started == [(draft_case.pk, "alice")]


def test_the_figure_viewer_describes_a_figure_in_the_words_its_probe_stored_with_it():
    import io
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from governance.admin_review import describe_figure
    from governance.evidence import figure_png
    from workers.probes import figures

    grid = figures.heatmap_grid([Image.new("RGB", (32, 32))], {"chefer": [np.eye(4)]}, row_titles=["a red square"])
    png = figure_png(grid)
    evidence = SimpleNamespace(kind="grounding", run_id=7)

    def stored(name: str, data: bytes):
        return SimpleNamespace(name=name, file=SimpleNamespace(open=lambda mode: io.BytesIO(data)))

    text = describe_figure(stored("examples_2.png", png), evidence)
    assert text.startswith("grounding probe, run #7: Example explanations. Rows: one example each, headed by its "
                           "prompt. Columns: the image in colour, then chefer")
    # a figure stored without a description is still described by its name
    assert "one row per image" in describe_figure(stored("examples.png", b"\x89PNG not really"), evidence)

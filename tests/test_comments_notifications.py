"""Comment threads on findings, e-mail notifications and signed webhooks (issue 25), through the API,
the review workspace, the provider portal, ``mail.outbox`` and a local HTTP server that receives
the webhooks and checks their signatures as a receiver would.

Actors (conftest.py): alice submitted Acme's case, rita and rob review it, ruth reviews nothing,
mallory is at Globex, audrey audits, ada administers.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core import mail
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from rest_framework.test import APIClient

from governance import acceptance, audit_log, comments, workflow
from governance.models import AuditCase, FindingComment, ImmutableError, WebhookDelivery
from governance.notifications import SIGNATURE_HEADER, verify_signature
from tests.actors import finish_run_with_evidence
from tests.review_fixtures import HOSTILE, admit, make_review_case, make_second_version

S = AuditCase.State


@pytest.fixture
def review_case(draft_case, alice, ada, rita, rob, ruth, mallory, audrey):
    admit(alice, ada, rita, rob, ruth, mallory, audrey)
    case, _ = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    return case


@pytest.fixture
def finding(review_case) -> str:
    """The key of the evidence's second finding ("Shortcut on watermark", high)."""
    return f"evidence-{review_case.runs.get().evidence.pk}/1"


@pytest.fixture
def api(request):
    def client_for(name: str) -> APIClient:
        client = APIClient()
        client.force_authenticate(request.getfixturevalue(name))
        return client
    return client_for


def comments_url(case: AuditCase) -> str:
    return f"/api/cases/{case.pk}/comments/"


# --------------------------------------------------------------------------------------------------
# Comment threads
# --------------------------------------------------------------------------------------------------


def test_reviewer_asks_and_provider_answers_in_one_thread(review_case, finding, api):
    asked = api("rita").post(comments_url(review_case), {"finding": finding, "body": "Is the logo in every image?"},
                             format="json")
    assert asked.status_code == 201, asked.content
    answered = api("alice").post(comments_url(review_case), {"finding": finding, "body": "Only in the test split.",
                                                             "reply_to": asked.data["id"]}, format="json")
    assert answered.status_code == 201, answered.content
    listed = api("rob").get(comments_url(review_case), {"finding": finding})
    assert [(c["author"], c["body"], c["reply_to"]) for c in listed.data] == [
        ("rita", "Is the logo in every image?", None), ("alice", "Only in the test split.", asked.data["id"])]
    assert api("audrey").get(comments_url(review_case)).status_code == 200
    actions = [e.action for e in review_case.audit_events.order_by("seq")]
    assert actions.count("comment.created") == 2
    assert audit_log.verify_excerpt(audit_log.excerpt(review_case)) == []


def test_other_organisations_and_unassigned_reviewers_get_404(review_case, finding, api):
    for name in ("mallory", "ruth"):
        assert api(name).get(comments_url(review_case)).status_code == 404
        assert api(name).post(comments_url(review_case), {"finding": finding, "body": "x"},
                              format="json").status_code == 404
    assert not FindingComment.objects.exists()


def test_auditors_read_only_and_unknown_findings_refused(review_case, finding, api):
    refused = api("audrey").post(comments_url(review_case), {"finding": finding, "body": "x"}, format="json")
    assert refused.status_code == 403
    unknown = api("rita").post(comments_url(review_case), {"finding": "evidence-999/0", "body": "x"}, format="json")
    assert unknown.status_code == 400
    assert "no finding" in unknown.json()["detail"]
    assert api("rita").post(comments_url(review_case), {"finding": finding, "body": "   "},
                            format="json").status_code == 400
    assert not FindingComment.objects.exists()


def test_comments_are_append_only_and_resolved_once(review_case, finding, api):
    created = api("rita").post(comments_url(review_case), {"finding": finding, "body": "Explain."}, format="json")
    comment = FindingComment.objects.get(pk=created.data["id"])
    comment.body = "Rewritten history"
    with pytest.raises(ImmutableError):
        comment.save()
    with pytest.raises(ImmutableError):
        FindingComment.objects.get(pk=comment.pk).delete()
    resolve = f"{comments_url(review_case)}{comment.pk}/resolve/"
    assert api("alice").post(resolve).status_code == 403  # the provider answers; the reviewer decides
    done = api("rob").post(resolve)
    assert done.status_code == 200 and done.data["resolved_by"] == "rob" and done.data["resolved_at"]
    assert api("rita").post(resolve).status_code == 409
    assert FindingComment.objects.get(pk=comment.pk).body == "Explain."
    assert review_case.audit_events.filter(action="comment.resolved").count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL triggers exist on PostgreSQL only")
def test_raw_sql_cannot_rewrite_or_delete_comments_on_postgresql(review_case, finding, rita, rob):
    comment = comments.add_comment(review_case, rita, finding, "Explain.")
    for sql in ("UPDATE governance_findingcomment SET body = 'rewritten'", "DELETE FROM governance_findingcomment"):
        with pytest.raises(IntegrityError, match="immutable"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    comments.resolve(comment, rob)  # the one change the trigger lets through
    with pytest.raises(IntegrityError, match="immutable"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE governance_findingcomment SET resolved_at = now(), resolved_by_id = %s", [rita.pk])
    comment.refresh_from_db()
    assert (comment.body, comment.resolved_by) == ("Explain.", rob)


def test_workspace_shows_the_thread_beside_its_finding_escaped(review_case, finding, api, client, rita):
    api("alice").post(comments_url(review_case), {"finding": finding, "body": HOSTILE}, format="json")
    client.force_login(rita)
    page = client.get(reverse("admin:governance_auditcase_review", args=[review_case.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert "<script>alert" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    article = html.index(f'id="evidence-{review_case.runs.get().evidence.pk}"')
    watermark = html.index("Shortcut on watermark", article)
    assert watermark < html.index("&lt;script&gt;alert", article) < html.index("Slight colour bias", article)
    posted = client.post(reverse("admin:governance_auditcase_review_comment", args=[review_case.pk]),
                         {"finding": finding, "body": "Thanks, noted."})
    assert posted.status_code == 302
    assert FindingComment.objects.filter(author=rita, body="Thanks, noted.").exists()


def test_provider_answers_in_the_portal(review_case, finding, client, alice, mallory):
    client.force_login(alice)
    url = reverse("portal:case_comment", args=[review_case.pk])
    answered = client.post(url, {"finding": finding, "body": "Retrained without the logo."})
    assert answered.status_code == 302
    page = client.get(reverse("portal:case", args=[review_case.pk])).content.decode()
    assert "Retrained without the logo." in page and 'name="finding"' in page
    client.force_login(mallory)
    assert client.post(url, {"finding": finding, "body": "peek"}).status_code == 404
    assert FindingComment.objects.count() == 1


# --------------------------------------------------------------------------------------------------
# E-mail
# --------------------------------------------------------------------------------------------------


def test_state_changes_mail_the_submitter_and_reviewers(draft_case, alice, ada, rita, rob,
                                                       django_capture_on_commit_callbacks):
    workflow.assign_reviewers(draft_case, [rita, rob], by=ada)
    with django_capture_on_commit_callbacks(execute=True):
        workflow.submit(draft_case, by=alice)
    sent = mail.outbox[-1]
    assert "submitted for probing" in sent.subject and f"Case #{draft_case.pk}" in sent.subject
    assert sorted(sent.to) == ["rita@example.org", "rob@example.org"]  # not alice: she acted
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        workflow.withdraw(draft_case, by=alice)  # back to draft: not an announced event
    assert mail.outbox == []
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case)
    finish_run_with_evidence(draft_case)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        workflow.mark_evidence_ready(draft_case)  # by the system: everyone concerned hears of it
    (sent,) = mail.outbox
    assert "evidence ready for review" in sent.subject and "by system" in sent.body
    assert sorted(sent.to) == ["alice@example.org", "rita@example.org", "rob@example.org"]


def test_changes_requested_and_comments_are_mailed(review_case, finding, rita, api,
                                                   django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        workflow.sign_off(review_case, rita, "request_changes", "Retrain without the logo.")
    assert [m.subject.rsplit(": ", 1)[1] for m in mail.outbox] == ["changes requested"]
    assert sorted(mail.outbox[0].to) == ["alice@example.org", "rob@example.org"]
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        api("alice").post(comments_url(review_case), {"finding": finding, "body": "Done\nSubject: injected"},
                          format="json")
    (sent,) = mail.outbox
    assert "new comment" in sent.subject and "\n" not in sent.subject
    assert "Shortcut on watermark" in sent.body and "Done\nSubject: injected" in sent.body
    assert sorted(sent.to) == ["rita@example.org", "rob@example.org"]


def test_a_rolled_back_change_announces_nothing(review_case, finding, rita, acme,
                                                django_capture_on_commit_callbacks):
    from governance.models import WebhookEndpoint

    WebhookEndpoint.objects.create(organisation=acme, url="https://93.184.215.14/hook", secret="s" * 32)
    with django_capture_on_commit_callbacks(execute=True) as callbacks, pytest.raises(RuntimeError), \
            transaction.atomic():
        comments.add_comment(review_case, rita, finding, "Draft")
        raise RuntimeError("the surrounding change failed")
    assert callbacks == [] and mail.outbox == []
    assert not FindingComment.objects.exists() and not WebhookDelivery.objects.exists()


# --------------------------------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------------------------------


class Receiver:
    """A local HTTP server that records what it receives and answers with ``status``."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append({"headers": dict(self.headers), "body": body})
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def test_private_webhook_urls_are_refused_by_default(alice, api, settings):
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = False
    for url in ("http://127.0.0.1:8080/hook", "http://10.1.2.3/hook", "http://[::1]/hook",
                "http://169.254.169.254/latest/meta-data", "ftp://example.org/hook"):
        answer = api("alice").post("/api/webhooks/", {"url": url}, format="json")
        assert answer.status_code == 400, url
        assert "url" in answer.json()["fields"], answer.json()


def test_signed_webhook_is_delivered_on_approval(review_case, alice, rita, rob, api, receiver, settings,
                                                 django_capture_on_commit_callbacks):
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = True
    created = api("alice").post("/api/webhooks/", {"url": receiver.url, "events": ["case.approved"]}, format="json")
    assert created.status_code == 201, created.content
    secret = created.data["secret"]
    assert "secret" not in api("alice").get(f"/api/webhooks/{created.data['id']}/").data
    assert api("mallory").get(f"/api/webhooks/{created.data['id']}/").status_code == 404
    acks = {f["key"]: "accepted for the pilot" for f in acceptance.open_findings(review_case)}
    with django_capture_on_commit_callbacks(execute=True):
        for reviewer in (rita, rob):
            workflow.sign_off(review_case, reviewer, "approve", "", acknowledgements=acks or None)
    review_case.refresh_from_db()
    assert review_case.state == S.APPROVED
    (hit,) = receiver.received  # only the subscribed event
    headers = {k.lower(): v for k, v in hit["headers"].items()}
    assert verify_signature(secret, headers[SIGNATURE_HEADER.lower()], hit["body"])
    assert not verify_signature("another-secret-of-enough-length", headers[SIGNATURE_HEADER.lower()], hit["body"])
    assert not verify_signature(secret, headers[SIGNATURE_HEADER.lower()], hit["body"] + b" ")
    payload = json.loads(hit["body"])
    assert payload["event"] == "case.approved" and payload["case"]["id"] == review_case.pk
    assert headers["x-loupe-event"] == "case.approved"
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("delivered", 1, 204)
    listed = api("alice").get(f"/api/webhooks/{created.data['id']}/deliveries/")
    assert [d["status"] for d in listed.data] == ["delivered"]


def test_failed_deliveries_are_retried_then_marked_failed(review_case, finding, api, receiver, settings,
                                                         django_capture_on_commit_callbacks):
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = True
    settings.LOUPE_WEBHOOK_MAX_ATTEMPTS = 3
    receiver.status = 500
    api("alice").post("/api/webhooks/", {"url": receiver.url}, format="json")
    with django_capture_on_commit_callbacks(execute=True):
        api("rita").post(comments_url(review_case), {"finding": finding, "body": "Why?"}, format="json")
    delivery = WebhookDelivery.objects.get()
    assert (delivery.event, delivery.status, delivery.attempts) == ("comment.created", "failed", 3)
    assert delivery.last_error == "HTTP 500" and len(receiver.received) == 3
    assert len({r["headers"]["X-Loupe-Delivery"] for r in receiver.received}) == 1


def test_delivery_rechecks_the_address_before_sending(review_case, finding, api, receiver, settings,
                                                      django_capture_on_commit_callbacks):
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = True
    settings.LOUPE_WEBHOOK_MAX_ATTEMPTS = 1
    api("alice").post("/api/webhooks/", {"url": receiver.url}, format="json")
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = False
    with django_capture_on_commit_callbacks(execute=True):
        api("rita").post(comments_url(review_case), {"finding": finding, "body": "Why?"}, format="json")
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "failed" and "non-public address" in delivery.last_error
    assert receiver.received == []


def test_delivery_connects_to_the_address_it_checked_not_to_a_second_answer(review_case, finding, api, receiver,
                                                                             settings, monkeypatch,
                                                                             django_capture_on_commit_callbacks):
    """DNS rebinding: the attacker's name server answers a public address to the two checks (when
    the webhook is created, and before the delivery) and the receiver's loopback address to any
    lookup after them."""
    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = False
    settings.LOUPE_WEBHOOK_MAX_ATTEMPTS = 1
    public = "93.184.215.14"
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    checks = {"n": 0}

    def rebinding_dns(host, *args, **kwargs):
        if host != "hooks.rebind.example":
            return real_getaddrinfo(host, *args, **kwargs)
        checks["n"] += 1
        address = public if checks["n"] <= 2 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    connected: list[tuple] = []

    def no_network(address, *args, **kwargs):
        connected.append(tuple(address))
        if address[0] != public:
            return real_create_connection(address, *args, **kwargs)
        raise ConnectionRefusedError("the public address refuses (there is no network in tests)")

    real_getaddrinfo, real_create_connection = socket.getaddrinfo, socket.create_connection
    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(socket, "create_connection", no_network)
    created = api("alice").post("/api/webhooks/", {"url": f"http://hooks.rebind.example:{port}/hook"}, format="json")
    assert created.status_code == 201, created.content
    with django_capture_on_commit_callbacks(execute=True):
        api("rita").post(comments_url(review_case), {"finding": finding, "body": "Why?"}, format="json")
    assert connected == [(public, port)]  # the checked address, never the loopback one
    assert receiver.received == []
    assert WebhookDelivery.objects.get().status == "failed"


def test_the_sweeper_sends_a_delivery_whose_task_was_lost(review_case, finding, api, receiver, settings,
                                                          django_capture_on_commit_callbacks):
    """The broker was down when the comment committed: the delivery stays pending until the sweeper,
    past the longest retry delay, sends it; a recent pending one (a retry still waiting) is left alone."""
    import datetime as dt

    from django.utils import timezone

    from workers import tasks

    settings.LOUPE_WEBHOOK_ALLOW_PRIVATE = True
    api("alice").post("/api/webhooks/", {"url": receiver.url}, format="json")
    with django_capture_on_commit_callbacks(execute=False):  # the task message is lost
        api("rita").post(comments_url(review_case), {"finding": finding, "body": "Why?"}, format="json")
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "pending" and receiver.received == []
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.recover_runs()["webhooks_resent"] == []  # too recent to be called lost
    assert receiver.received == []
    stale = timezone.now() - dt.timedelta(seconds=settings.LOUPE_WEBHOOK_RETRY_MAX_DELAY
                                          + settings.LOUPE_RUN_REDISPATCH_AFTER + 1)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(created_at=stale)
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.recover_runs()["webhooks_resent"] == [delivery.pk]
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 1) and len(receiver.received) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.recover_runs()["webhooks_resent"] == []  # delivered: never sent again
    assert len(receiver.received) == 1


# --------------------------------------------------------------------------------------------------
# Comparing model versions and report versions
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def second_version(review_case, acme_model, alice, ada, rob, ruth, test_probe_kind):
    """Version 2.0 of the same model with its own case (reviewed by rob and ruth, not rita)."""
    return make_second_version(acme_model, test_probe_kind, alice=alice, ada=ada, reviewers=[rob, ruth])


def test_two_versions_of_a_model_side_by_side(review_case, second_version, client, rob, rita):
    url = reverse("admin:governance_auditcase_review_compare", args=[review_case.pk])
    client.force_login(rob)
    listed = client.get(url).content.decode()
    assert f'value="{second_version.pk}"' in listed
    page = client.get(url, {"with": second_version.pk})
    html = page.content.decode()
    assert page.status_code == 200
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html  # 2.0's model details, escaped
    assert "2 fields changed" in html  # model details and limitations; intended uses are equal
    assert "0.81" in html and "0.8" in html and "-0.01" in html  # pointing game per version and the change
    watermark = html.index("Shortcut on watermark")
    row = html[watermark:html.index("</tr>", watermark)]
    assert "present (evidence" in row and row.endswith("absent</td>")  # fixed in 2.0
    client.force_login(rita)  # rita reviews only 1.0: 2.0 is not hers to see
    assert f'value="{second_version.pk}"' not in client.get(url).content.decode()
    assert client.get(url, {"with": second_version.pk}).status_code == 404


@pytest.mark.slow
def test_diff_between_report_versions(review_case, finding, rita, rob, alice, client, mallory,
                                      django_capture_on_commit_callbacks):
    import io
    import re

    from pypdf import PdfReader

    from governance.reports import generate_report

    generate_report(review_case, author=rita)
    workflow.sign_off(review_case, rob, "request_changes", "Retrain without the logo.")
    comments.add_comment(review_case, alice, finding, HOSTILE)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        second = generate_report(review_case, author=rita)
    (announced,) = mail.outbox
    assert "report issued" in announced.subject and second.sha256 in announced.body
    assert sorted(announced.to) == ["alice@example.org", "rob@example.org"]
    # The discussion is in the report, as text: the hostile comment is shown literally, never as markup.
    assert second.manifest["comments"][0]["body"] == HOSTILE
    text = re.sub(r"\s+", " ", " ".join(p.extract_text() or "" for p in PdfReader(io.BytesIO(second.pdf.read())).pages))
    assert "Discussion of the findings" in text and '<script>alert("x")</script>' in text
    url = reverse("admin:governance_auditcase_review_report_diff", args=[review_case.pk])
    client.force_login(rita)
    page = client.get(url)
    html = page.content.decode()
    assert page.status_code == 200 and "From v1 to v2" in html
    assert "signoff_added" in html and "rob (request changes)" in html
    assert "Case state changed from evidence_ready to changes_requested" in html
    assert "comment_added" in html and "&lt;script&gt;" not in html  # the change log names, never quotes
    assert client.get(url, {"from": 7}).status_code == 404
    review = client.get(reverse("admin:governance_auditcase_review", args=[review_case.pk])).content.decode()
    assert f"{url}?to=2" in review
    client.force_login(mallory)
    assert client.get(url).status_code == 404


@pytest.mark.slow
def test_the_embedded_default_writes_mail_to_files_without_a_mail_server(tmp_path):
    """No SMTP server on a newcomer's machine: with no LOUPE_EMAIL_HOST, mails land in var/mail/."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOUPE_EMAIL", "DJANGO_SETTINGS"))}
    env.update(LOUPE_VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="governance.settings")
    script = ("import django; django.setup(); from django.core.mail import send_mail; "
              "send_mail('Case #1 approved', 'body', None, ['alice@example.org'])")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "var" / "mail").iterdir()
    assert "Case #1 approved" in written.read_text() and "alice@example.org" in written.read_text()


def test_a_reviewer_starts_a_thread_on_a_criterion_finding_in_the_workspace(review_case, client, rita, ada):
    acceptance.set_criterion(review_case, kind="grounding", metric="pointing_game", by=ada, threshold=0.9,
                             comparator="at_least", severity="medium",
                             reason="The intended purpose needs precise maps.")
    criterion = next(f for f in acceptance.open_findings(review_case) if "Pointing" in f["title"])
    client.force_login(rita)
    page = client.get(reverse("admin:governance_auditcase_review", args=[review_case.pk])).content.decode()
    section = page[page.index('id="other-threads"'):]
    assert f'data-finding="{criterion["key"]}"' in section and 'name="body"' in section
    posted = client.post(reverse("admin:governance_auditcase_review_comment", args=[review_case.pk]),
                         {"finding": criterion["key"], "body": "Which images miss?"})
    assert posted.status_code == 302
    assert FindingComment.objects.get().finding == criterion["key"]

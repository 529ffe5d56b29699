"""Notifications on a case's events: e-mail to the people concerned and signed webhooks.

Events (:data:`EVENTS`): ``case.submitted``, ``case.evidence_ready``, ``case.changes_requested``,
``case.approved``, ``case.rejected`` (from :data:`governance.workflow.case_transitioned`),
``report.issued`` (:func:`governance.reports.generate_report`) and ``comment.created``
(:func:`governance.comments.add_comment`).

:func:`notify` is called inside the transaction that makes the change. Nothing leaves the process
before that transaction commits (``transaction.on_commit``): a rolled-back change announces nothing.

- **E-mail** through Django's mail backend (``EMAIL_BACKEND``), plain text, to the case's submitter
  and its assigned reviewers who have an address, except the person who acted.
- **Webhooks**: every active :class:`~governance.models.WebhookEndpoint` of the case's provider
  organisation that wants the event gets one :class:`~governance.models.WebhookDelivery` row (the
  exact JSON body), and the ``deliver_webhook`` task POSTs it with retries and records each attempt.

Signature (documented for receivers in docs/notifications.md)::

    X-Loupe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

Receivers recompute the HMAC over the timestamp, a dot and the raw body bytes, compare in constant
time, and refuse timestamps too far from their clock (replays).

Server-side request forgery: a webhook URL whose host resolves to a loopback, private, link-local,
multicast, reserved or unspecified address is refused, when it is registered and again before each
attempt (the name may resolve differently later), unless ``LOUPE_WEBHOOK_ALLOW_PRIVATE`` is set.
Redirects are not followed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from governance import workflow
from governance.models import AuditCase, WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

S = AuditCase.State
STATE_EVENTS: dict[str, str] = {S.SUBMITTED: "case.submitted", S.EVIDENCE_READY: "case.evidence_ready",
                S.CHANGES_REQUESTED: "case.changes_requested", S.APPROVED: "case.approved",
                S.REJECTED: "case.rejected"}
EVENTS = (*STATE_EVENTS.values(), "report.issued", "comment.created")
SIGNATURE_HEADER = "X-Loupe-Signature"

SUBJECTS = {
    "case.submitted": "submitted for probing",
    "case.evidence_ready": "evidence ready for review",
    "case.changes_requested": "changes requested",
    "case.approved": "approved",
    "case.rejected": "rejected",
    "report.issued": "report issued",
    "comment.created": "new comment on a finding",
}


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


def notify(event: str, case: AuditCase, actor: Any, data: dict[str, Any] | None = None) -> None:
    """Announce ``event`` on ``case`` once the current transaction commits (e-mail and webhooks)."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}; known: {', '.join(EVENTS)}")
    data = dict(data or {})
    actor_name = actor.get_username() if actor is not None else "system"
    recipients = recipients_of(case, actor)
    if recipients:
        subject, body = mail_text(event, case, actor_name, data)
        _send_on_commit("workers.tasks.send_notification_mail", subject, body, recipients)
    payload = {"event": event, "created_at": timezone.now().isoformat(), "actor": actor_name,
               "case": {"id": case.pk, "title": case.title, "state": case.state,
                        "organisation": case.model_version.ai_model.organisation.slug,
                        "model": str(case.model_version)},
               "data": data}
    for endpoint in WebhookEndpoint.objects.filter(organisation_id=case.model_version.ai_model.organisation_id,
                                                   is_active=True).order_by("pk"):
        if not endpoint.wants(event):
            continue
        delivery = WebhookDelivery(endpoint=endpoint, event=event, case=case)
        delivery.body = json.dumps({**payload, "delivery": delivery.delivery_id}, sort_keys=True,
                                   separators=(",", ":"), ensure_ascii=False)
        delivery.save()
        _send_on_commit("workers.tasks.deliver_webhook", delivery.pk)


def _send_on_commit(task_name: str, *args: Any) -> None:
    # A notification never fails the change it announces: a broker that is down loses the e-mail
    # (logged); a webhook delivery stays 'pending' in its endpoint's delivery list, where it shows.
    # Sent by name, as governance.pipeline does: workers.tasks imports this module, so no import back.
    # Executed in-process, the tasks must be registered first, as a worker does at start.
    def send() -> None:
        from workers.celery import app

        try:
            if app.conf.task_always_eager:
                app.loader.import_default_modules()
            app.signature(task_name, args=args).apply_async()
        except Exception:  # noqa: BLE001 - logged; the committed change stands
            logger.warning("notification task %s not sent", task_name, exc_info=True)

    transaction.on_commit(send)


def resend_stalled(now: dt.datetime | None = None) -> list[int]:
    """Send again the pending deliveries nobody is working on; part of the sweeper (Celery beat).

    A delivery whose task the broker never took (down at commit, or the message lost) would stay
    pending for ever. One is stalled when its last attempt, or its creation if it was never tried,
    lies further back than the longest retry delay plus the runs' re-dispatch grace: a retry that is
    merely waiting in the broker is never doubled. A duplicate is harmless anyway: the task re-reads
    the row and a delivered one is never sent again, and receivers dedupe on ``X-Loupe-Delivery``.
    """
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.LOUPE_WEBHOOK_RETRY_MAX_DELAY + settings.LOUPE_RUN_REDISPATCH_AFTER)
    stalled = (WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING)
               .filter(Q(last_attempt_at__lt=cutoff) | Q(last_attempt_at__isnull=True, created_at__lt=cutoff))
               .order_by("pk").values_list("pk", flat=True))
    resent = list(stalled)
    for delivery_id in resent:
        _send_on_commit("workers.tasks.deliver_webhook", delivery_id)
    return resent


def recipients_of(case: AuditCase, actor: Any) -> list[str]:
    """The case's submitter and creator and its assigned reviewers, with an address, not the actor."""
    User = get_user_model()
    people = {pk for pk in (case.submitted_by_id, case.created_by_id) if pk is not None}
    people |= set(case.reviewers.values_list("pk", flat=True))
    if actor is not None:
        people.discard(actor.pk)
    users = User.objects.filter(pk__in=people, is_active=True).exclude(email="").order_by("pk")
    return list(dict.fromkeys(u.email for u in users))


def _one_line(text: str) -> str:
    # Header values must not carry line breaks (a title with one would be a header injection).
    return " ".join(str(text).split())


def mail_text(event: str, case: AuditCase, actor_name: str, data: dict[str, Any]) -> tuple[str, str]:
    subject = _one_line(f"[Loupe] Case #{case.pk} {case.title}: {SUBJECTS[event]}")[:200]
    lines = [f"Case #{case.pk} \"{case.title}\" ({case.model_version}) by {case.model_version.ai_model.organisation}:",
             f"{SUBJECTS[event]}, by {actor_name}.", f"The case is now: {case.get_state_display()}."]
    if event == "comment.created":
        title = data.get("finding_title") or data.get("finding", "")
        lines += ["", f"On the finding: {title}", "", str(data.get("body", ""))]
    elif event == "report.issued":
        lines += [f"Report v{data.get('version')} (SHA-256 {data.get('sha256')})."]
    elif data.get("note"):
        lines += ["", f"Note: {data['note']}"]
    lines += ["", "You receive this because you submitted or review this case in Loupe."]
    return subject, "\n".join(lines)


@receiver(workflow.case_transitioned, dispatch_uid="loupe-notify-on-transition")
def on_transition(sender: Any, case: AuditCase, from_state: str, to_state: str, by: Any, **kwargs: Any) -> None:
    event = STATE_EVENTS.get(to_state)
    if event is not None:
        notify(event, case, by, {"from": from_state, "to": to_state})


# --------------------------------------------------------------------------------------------------
# Webhooks: addresses, signatures, delivery
# --------------------------------------------------------------------------------------------------


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


def check_url(url: str) -> str | None:
    """Refuse a webhook URL that is not http(s) or whose host resolves to a non-public address
    (unless ``LOUPE_WEBHOOK_ALLOW_PRIVATE``). Raises ``ValidationError``. Returns the checked
    address a delivery must connect to (``None`` where private addresses are allowed): resolving the
    name again to connect would let a DNS server answer a public address to the check and a private
    one to the connection (DNS rebinding)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("A webhook URL is an http:// or https:// URL with a host.")
    if parts.username or parts.password:
        raise ValidationError("A webhook URL carries no user name or password; the signature authenticates.")
    if getattr(settings, "LOUPE_WEBHOOK_ALLOW_PRIVATE", False):
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValidationError(f"The webhook host {parts.hostname!r} does not resolve.") from exc
    refused = sorted({str(info[4][0]) for info in infos if _refused_address(str(info[4][0]))})
    if refused:
        raise ValidationError(f"The webhook host {parts.hostname!r} resolves to a private, loopback or otherwise "
                              f"non-public address ({', '.join(refused)}); such URLs are refused.")
    if not infos:
        raise ValidationError(f"The webhook host {parts.hostname!r} does not resolve.")
    return str(infos[0][4][0])


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Loupe-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance: int = 300, now: float | None = None) -> bool:
    """What a receiver does (and what the tests do): parse the header, check the timestamp is within
    ``tolerance`` seconds and compare the HMAC in constant time."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None  # a redirect is an answer (3xx), never followed: it could point anywhere


def _pinned(connection: type[http.client.HTTPConnection], address: str) -> Any:
    """``connection`` that connects to ``address`` whatever its host name resolves to now; the name
    still goes into the Host header and, for HTTPS, into SNI and the certificate check."""

    class Pinned(connection):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = lambda where, *rest: socket.create_connection((address, where[1]), *rest)

    return Pinned


class _PinnedHTTP(urllib.request.HTTPHandler):
    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPConnection, self.address), req)


class _PinnedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPSConnection, self.address), req,
                            context=self._context)  # type: ignore[attr-defined]


def _opener(address: str | None) -> urllib.request.OpenerDirector:
    """Redirects never followed; connections to ``address`` where the check pinned one."""
    if address is None:
        return urllib.request.build_opener(_NoRedirect)
    return urllib.request.build_opener(_NoRedirect, _PinnedHTTP(address), _PinnedHTTPS(address))


def attempt(delivery: WebhookDelivery) -> bool:
    """POST ``delivery`` once and record the attempt. True when the receiver answered 2xx."""
    endpoint = delivery.endpoint
    body = delivery.body.encode("utf-8")
    now = timezone.now()
    status: int | None = None
    error = ""
    try:
        address = check_url(endpoint.url)
        request = urllib.request.Request(endpoint.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "Loupe-Webhook/1",
            "X-Loupe-Event": delivery.event, "X-Loupe-Delivery": delivery.delivery_id,
            SIGNATURE_HEADER: signature(endpoint.secret, int(time.time()), body)})
        with _opener(address).open(request, timeout=settings.LOUPE_WEBHOOK_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status, error = exc.code, f"HTTP {exc.code}"
    except ValidationError as exc:
        error = "; ".join(exc.messages)
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    ok = status is not None and 200 <= status < 300
    if status is not None and not ok and not error:
        error = f"HTTP {status}"
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        attempts=delivery.attempts + 1, last_attempt_at=now, response_status=status, last_error=error[:2000],
        status=WebhookDelivery.Status.DELIVERED if ok else delivery.status,
        delivered_at=now if ok else None)
    delivery.refresh_from_db()
    return ok


def give_up(delivery: WebhookDelivery) -> None:
    WebhookDelivery.objects.filter(pk=delivery.pk).update(status=WebhookDelivery.Status.FAILED)


def send_mail_now(subject: str, body: str, recipients: list[str]) -> int:
    return send_mail(subject, body, None, recipients)

"""Report requests with an idempotency key: one request, one report version.

Issuing a report is not idempotent by nature (each call issues version n+1), yet requests are
repeated: a client retries after a timeout, and the ``render_report`` task is delivered again when
its worker died after the commit but before the acknowledgement. So each request carries a key
(the API's ``Idempotency-Key`` header, or the task's id, which a redelivery keeps), and the
:class:`~governance.models.ReportRequest` row with that key is linked to the version it produced in
the transaction that issues it. A repeated request finds the link and gets the same version.

Rendering, signing and versioning stay in :mod:`governance.reports`; this module only wraps the call.
"""

from __future__ import annotations

from django.db import transaction

from governance import workflow
from governance.models import Report, ReportRequest

MAX_KEY_LENGTH = 200


class IdempotencyConflict(workflow.WorkflowError):
    """The key was already used for a request on another case."""


def issue(case_id: int, author, key: str) -> tuple[Report, bool]:
    """The report version requested under ``key``: issued now (``created`` true) or, for a repeated
    key, the version the first request issued. Raises :class:`IdempotencyConflict` for a key used on
    another case, ``ValueError`` for an empty or over-long key."""
    from governance.evidence import unbound_case_rows
    from governance.models import AuditCase
    from governance.reports import generate_report

    key = (key or "").strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"an idempotency key is 1 to {MAX_KEY_LENGTH} characters")
    existing = (ReportRequest.objects.filter(key=key, case_id=case_id, report__isnull=False)
                .select_related("report").first())
    if existing is not None and existing.report is not None:
        return existing.report, False
    case = AuditCase.objects.get(pk=case_id)
    if unbound_case_rows(case):
        # generate_report refuses such a case and logs the refusal in a transaction of its own; called
        # inside ours below, that log row would roll back with the refusal.
        generate_report(case, author=author)
    with transaction.atomic():
        # workflow.LOCK_ORDER: the case first. Two requests with one key serialise here, so the
        # second sees the first one's link instead of issuing another version.
        case = workflow.lock_case(case_id)
        request = ReportRequest.objects.filter(key=key).select_related("report").first()
        if request is not None:
            if request.case_id != case.pk:
                raise IdempotencyConflict(f"idempotency key {key!r} was used for a report of case #{request.case_id}")
            if request.report is not None:
                return request.report, False
        else:
            request = ReportRequest.objects.create(key=key, case=case, author=author)
        report = generate_report(case, author=author)
        request.report = report
        request.save(update_fields=["report"])
    return report, True

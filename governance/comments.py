"""Comment threads on a case's findings: reviewers ask, providers answer, everything is kept.

A thread is every :class:`~governance.models.FindingComment` of one case on one finding key:

- ``evidence-<id>/<n>``: the n-th finding (from 0) a probe recorded in evidence ``<id>`` (evidence
  of a finished run is immutable, so the position is stable);
- an acceptance-criterion finding's own key (:func:`governance.acceptance.findings`), the keys an
  approval acknowledges.

Comments are append-only (a correction is a new comment, optionally ``reply_to`` the one it
corrects); the only change is :func:`resolve`, once, with who and when. Both are written to the
audit log in the transaction that stores them and announced through :mod:`governance.notifications`.

Who may do what (visibility first: a case the user cannot see is a 404 before any of this):

- comment: the case's provider (submitters of its organisation), its assigned reviewers, admins;
  auditors read only;
- resolve: assigned reviewers and admins (the side that raised the question decides it is answered).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from governance import acceptance, access, audit_log, workflow
from governance.models import AuditCase, Evidence, FindingComment

MAX_BODY = 10_000
COMMENT_ROLES = frozenset({access.SUBMITTER, access.REVIEWER, access.ADMIN})
RESOLVE_ROLES = frozenset({access.REVIEWER, access.ADMIN})


def evidence_finding_key(evidence_id: int, index: int) -> str:
    return f"evidence-{evidence_id}/{index}"


def anchor(key: str) -> str:
    """An HTML id for a finding's thread (keys carry characters that ids and URLs mangle)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def case_findings(case: AuditCase) -> dict[str, dict[str, Any]]:
    """Every finding of ``case`` a thread may be about, by key: the probes' findings, then the
    acceptance criteria's."""
    found: dict[str, dict[str, Any]] = {}
    evidence = list(Evidence.objects.filter(run__case=case).order_by("pk"))
    for item in evidence:
        for index, finding in enumerate(item.findings or []):
            if isinstance(finding, dict):
                found[evidence_finding_key(item.pk, index)] = {
                    "severity": finding.get("severity", ""), "title": finding.get("title", ""),
                    "evidence": item.pk, "kind": item.kind, "source": "probe"}
    specs = [spec for spec, _ in acceptance.case_specs(case)]
    measured = [{"id": e.pk, "kind": e.kind, "metrics": e.metrics} for e in evidence]
    for finding in acceptance.findings(acceptance.evaluate(specs, measured)):
        found.setdefault(finding["key"], {"severity": finding["severity"], "title": finding["title"],
                                          "evidence": finding["evidence"], "kind": finding["kind"],
                                          "source": "criterion"})
    return found


def _require(user: Any, roles: frozenset[str], what: str) -> None:
    held = access.roles_of(user)
    if not held & roles:
        if held == {access.AUDITOR}:
            raise workflow.NotAllowed("Auditors have read-only access: they can read the threads, not add to them.")
        raise workflow.NotAllowed(f"{what} needs one of the roles {', '.join(sorted(roles))}.")


def _check_participant(case: AuditCase, user: Any) -> None:
    """The case's provider, its assigned reviewers and admins take part; others only read."""
    if access.is_admin(user):
        return
    if access.has_role(user, access.SUBMITTER) and \
            access.organisation_id_of(user) == case.model_version.ai_model.organisation_id:
        return
    if access.has_role(user, access.REVIEWER) and case.reviewers.filter(pk=user.pk).exists():
        return
    raise workflow.NotAllowed(f"only the provider, the assigned reviewers and admins take part in the threads of "
                              f"case #{case.pk}")


def add_comment(case: AuditCase, author: Any, finding: str, body: str,
                reply_to: FindingComment | None = None) -> FindingComment:
    """Append a comment to the thread on ``finding``; logged (``comment.created``) and announced."""
    from governance import notifications

    _require(author, COMMENT_ROLES, "Commenting")
    _check_participant(case, author)
    body = (body or "").strip()
    if not body:
        raise workflow.WorkflowError("a comment needs text")
    if len(body) > MAX_BODY:
        raise workflow.WorkflowError(f"a comment has at most {MAX_BODY} characters; this one has {len(body)}")
    if case.state == AuditCase.State.ARCHIVED:
        raise workflow.TransitionError(case, case.state, "commented", (),
                                       reason=f"case #{case.pk} is archived; its threads are closed")
    findings = case_findings(case)
    target = findings.get(finding)
    if target is None:
        raise workflow.WorkflowError(f"case #{case.pk} has no finding {finding!r}")
    if reply_to is not None and (reply_to.case_id != case.pk or reply_to.finding != finding):
        raise workflow.WorkflowError("a reply belongs to the same case and finding as the comment it answers")
    with transaction.atomic():
        comment = FindingComment.objects.create(
            case=case, finding=finding, evidence_id=target["evidence"], author=author, body=body, reply_to=reply_to)
        audit_log.record(author, "comment.created", comment, {
            "finding": finding, "body": body, "reply_to": reply_to.pk if reply_to else None})
        notifications.notify("comment.created", case, author, {
            "comment": comment.pk, "finding": finding, "finding_title": target["title"], "body": body})
    return comment


def resolve(comment: FindingComment, by: Any) -> FindingComment:
    """Mark ``comment`` resolved (once); logged as ``comment.resolved``."""
    _require(by, RESOLVE_ROLES, "Resolving a comment")
    case = comment.case
    _check_participant(case, by)
    with transaction.atomic():
        locked = FindingComment.objects.select_for_update().get(pk=comment.pk)
        if locked.is_resolved:
            raise workflow.TransitionError(case, "resolved", "resolved", (),
                                           reason=f"comment #{locked.pk} was already resolved by "
                                                  f"{locked.resolved_by} at {locked.resolved_at:%Y-%m-%d %H:%M}")
        locked.resolved_by = by
        locked.resolved_at = timezone.now()
        locked.save()
        audit_log.record(by, "comment.resolved", locked, {"finding": locked.finding})
    return locked


@dataclass
class Thread:
    key: str
    finding: dict[str, Any]
    comments: list[FindingComment] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return anchor(self.key)

    @property
    def open(self) -> int:
        return sum(1 for c in self.comments if not c.is_resolved)


def threads(case: AuditCase, user: Any) -> dict[str, Thread]:
    """The case's threads the user can see, by finding key, with the finding they are about (a key
    whose finding no longer exists keeps its thread, described as such)."""
    findings = case_findings(case)
    out: dict[str, Thread] = {}
    rows = (FindingComment.objects.visible_to(user).filter(case=case)
            .select_related("author", "resolved_by").order_by("created_at", "pk"))
    for comment in rows:
        thread = out.get(comment.finding)
        if thread is None:
            finding = findings.get(comment.finding) or {"severity": "", "title": f"finding {comment.finding}",
                                                        "evidence": comment.evidence_id, "kind": "",
                                                        "source": "gone"}
            thread = out[comment.finding] = Thread(comment.finding, finding)
        thread.comments.append(comment)
    return out


def can_comment(case: AuditCase, user: Any) -> bool:
    """Whether to show the comment form (display only; :func:`add_comment` decides)."""
    try:
        _require(user, COMMENT_ROLES, "Commenting")
        _check_participant(case, user)
    except workflow.NotAllowed:
        return False
    return case.state != AuditCase.State.ARCHIVED


def can_resolve(case: AuditCase, user: Any) -> bool:
    try:
        _require(user, RESOLVE_ROLES, "Resolving a comment")
        _check_participant(case, user)
    except workflow.NotAllowed:
        return False
    return True

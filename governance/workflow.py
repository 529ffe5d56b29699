"""The audit-case workflow: states, who may move a case, and the four-eyes sign-off.

States and transitions (``TRANSITIONS``)::

    draft ──submit──▶ submitted ──start runs──▶ running ──aggregate──▶ evidence_ready ──▶ in_review
      ▲                  │                        │                       │ (re-run)        │ sign-offs
      └──── withdraw ────┴──────── cancel ────────┘                       ▼                 ▼
                                                                        running      approved | rejected
    changes_requested ──resubmit──▶ submitted                                       | changes_requested
    draft, changes_requested, approved, rejected ──▶ archived (terminal)
    running ──(every run finished, no evidence)──▶ submitted

- ``in_review -> approved | rejected | changes_requested`` happen only through :func:`sign_off`.
- ``archived`` is terminal; drafts and changes-requested cases may be archived by their owner,
  decided cases (approved, rejected) by an admin only.
- Withdrawing/cancelling (``submitted|running -> draft``) marks the case's active runs cancelled in
  the same transaction; revoking their Celery tasks is for a ``case_transitioned`` receiver on commit.

Actors: *owner* (a submitter who belongs to the case's organisation), *reviewer* (assigned to the
case and free of conflicts), *admin*, *system* (``by=None``: workers and the pipeline). The API
must never pass ``by=None``.

Segregation of duties (:func:`conflict_of`): a user who created or submitted the case, created its
model or model version, or belongs to the provider organisation can neither be assigned as a
reviewer nor sign off. Only assigned reviewers sign off. One reviewer counts once: their *latest*
case-level decision in the current review round counts, and repeating one's own latest decision on
unchanged evidence is refused. A case is approved once the required number
of distinct eligible reviewers approve the evidence as it stands (their sign-off digest equals the
current :func:`case_digest`) and no objection is open; a case-level ``reject`` moves it to
``rejected`` and ``request_changes`` to ``changes_requested`` at once. Sign-offs on one evidence item
or report section never move the case, but an item whose latest decision by a reviewer is not
``approve`` is an open objection that blocks approval.

Every change locks the case row (``SELECT ... FOR UPDATE`` of that row only), checks, saves and writes
the audit log in one transaction, so concurrent sign-offs cannot both "complete" a case or skip a
check. Locks are always taken in :data:`LOCK_ORDER` (case, its runs, the audit chain head).

Public API (names are stable; the API, admin and tasks call these):

- ``transition(case, to_state, by, note="")``: the general, checked transition.
- ``submit(case, by)``, ``start_runs(case, by=None)``, ``mark_evidence_ready(case, by=None)``,
  ``rerun(case, by=None)``, ``start_review(case, by)``, ``withdraw(case, by)``, ``archive(case, by)``.
- ``sign_off(case, reviewer, decision, comment="", evidence=None, report_section="") -> Signoff``.
- ``assign_reviewers(case, reviewers, by)``; ``conflict_of(case, user) -> str | None``.
- ``allowed_targets(state)``, ``available_transitions(case, user)``: for buttons.
- ``review_status(case) -> ReviewStatus``: who approved, how many are needed, open objections.
- ``case_digest(case)``, ``evidence_digest(evidence)``: canonical SHA-256 of what a reviewer signs.
- Errors: ``WorkflowError`` (400), ``TransitionError`` (409, illegal from->to), ``NotAllowed``
  (403; a ``PermissionDenied``, so DRF answers 403 by itself).
- Signal ``case_transitioned(case, from_state, to_state, by)``, sent inside the transaction; use
  ``transaction.on_commit`` in receivers that enqueue work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from governance import acceptance, access, audit_log
from governance.canonical import digest
from governance.evidence import content_digest
from governance.models import AuditCase, AuditEvent, Evidence, ProbeRun, Signoff, validate_probe_plan

S = AuditCase.State
D = Signoff.Decision

OWNER, REVIEWER, ADMIN, SYSTEM = "owner", "reviewer", "admin", "system"
VIA_SIGNOFF = frozenset({"signoff"})

# from state -> {to state: actors who may trigger it}
TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    S.DRAFT: {S.SUBMITTED: frozenset({OWNER, ADMIN}), S.ARCHIVED: frozenset({OWNER, ADMIN})},
    S.SUBMITTED: {S.RUNNING: frozenset({OWNER, ADMIN, SYSTEM}), S.DRAFT: frozenset({OWNER, ADMIN})},
    # running -> submitted: every run finished without evidence; the owner may start them again.
    S.RUNNING: {S.EVIDENCE_READY: frozenset({ADMIN, SYSTEM}), S.DRAFT: frozenset({OWNER, ADMIN}),
                S.SUBMITTED: frozenset({SYSTEM})},
    S.EVIDENCE_READY: {S.IN_REVIEW: frozenset({REVIEWER, ADMIN, SYSTEM}), S.RUNNING: frozenset({ADMIN, SYSTEM})},
    S.IN_REVIEW: {S.APPROVED: VIA_SIGNOFF, S.REJECTED: VIA_SIGNOFF, S.CHANGES_REQUESTED: VIA_SIGNOFF},
    S.CHANGES_REQUESTED: {S.SUBMITTED: frozenset({OWNER, ADMIN}), S.ARCHIVED: frozenset({OWNER, ADMIN})},
    S.APPROVED: {S.ARCHIVED: frozenset({ADMIN})},
    S.REJECTED: {S.ARCHIVED: frozenset({ADMIN})},
    S.ARCHIVED: {},
}

case_transitioned = Signal()  # kwargs: case, from_state, to_state, by


class WorkflowError(Exception):
    """A workflow request that cannot be carried out (bad input or a precondition not met)."""


class TransitionError(WorkflowError):
    """An illegal state transition. Carries ``from_state``, ``to_state`` and the ``allowed`` targets."""

    def __init__(self, case: AuditCase, from_state: str, to_state: str, allowed: Iterable[str], reason: str = ""):
        self.case_id = case.pk
        self.from_state = from_state
        self.to_state = to_state
        self.allowed = tuple(allowed)
        allowed_text = ", ".join(self.allowed) or "none"
        message = reason or (f"case #{case.pk} cannot move from '{from_state}' to '{to_state}'; "
                             f"allowed from '{from_state}': {allowed_text}")
        super().__init__(message)


class NotAllowed(WorkflowError, PermissionDenied):
    """The actor may not do this (role, organisation, assignment or segregation of duties)."""


# --------------------------------------------------------------------------------------------------
# Digests: what a reviewer signs
# --------------------------------------------------------------------------------------------------


def evidence_digest(evidence: Evidence) -> str:
    """SHA-256 of an evidence item as stored: metrics, summary, findings, artifact hashes, provenance."""
    run = evidence.run
    return digest({
        "evidence": evidence.pk,
        "run": run.pk,
        "kind": evidence.kind,
        "metrics": evidence.metrics,
        "summary": evidence.summary,
        "findings": evidence.findings,
        "artifacts": sorted([a.name, a.sha256, a.size] for a in evidence.artifacts.all()),
        "provenance": {
            "params": run.params, "dataset": run.dataset, "model_manifest_hash": run.model_manifest_hash,
            "dataset_hash": run.dataset_hash, "code_version": run.code_version, "seed": run.seed,
            "device": run.device, "library_versions": run.library_versions,
        },
    })


def case_digest(case: AuditCase) -> str:
    """SHA-256 of the case as a reviewer judges it: the model's declared purpose and risk category, its
    model card and fingerprint, the plan and every run's outcome with its evidence digest. Any change
    to one of them changes the digest, so earlier approvals no longer count. Computed from the
    database, never from a possibly stale instance."""
    case = AuditCase.objects.select_related("model_version__ai_model").get(pk=case.pk)
    version = case.model_version
    runs = (ProbeRun.objects.filter(case_id=case.pk).order_by("pk")
            .select_related("evidence").prefetch_related("evidence__artifacts"))
    run_entries = []
    for run in runs:
        evidence = getattr(run, "evidence", None) if hasattr(run, "evidence") else None
        run_entries.append({"run": run.pk, "kind": run.kind, "status": run.status,
                            "evidence": evidence_digest(evidence) if evidence is not None else None})
    model = version.ai_model
    return digest({
        "case": case.pk,
        "model_version": version.pk,
        "model": {"intended_purpose": model.intended_purpose, "risk_category": model.risk_category,
                  "high_risk_area": model.annex_iii_area, "modality": model.modality},
        "model_card": {**version.card_dict(), "metadata": version.card_metadata},
        "model_manifest_hash": version.manifest_hash,
        "hub": [version.hub_id, version.hub_revision] if version.hub_id else None,
        "probe_plan": case.probe_plan,
        "required_approvals": case.required_approvals,
        "runs": run_entries,
    })


# --------------------------------------------------------------------------------------------------
# Actors
# --------------------------------------------------------------------------------------------------


def conflict_of(case: AuditCase, user) -> str | None:
    """Why ``user`` may not review ``case`` (segregation of duties), or ``None`` if they may."""
    if user is None:
        return None
    name = user.get_username()
    version = case.model_version
    if user.pk in {case.created_by_id, case.submitted_by_id}:
        return f"{name} created or submitted case #{case.pk} and cannot review it"
    if AuditEvent.objects.filter(case_id=case.pk, action="case.submitted", actor_id=user.pk).exists():
        return f"{name} submitted case #{case.pk} and cannot review it"
    if user.pk in {version.created_by_id, version.ai_model.created_by_id}:
        return f"{name} registered the model under audit and cannot review it"
    if access.organisation_id_of(user) == version.ai_model.organisation_id:
        return f"{name} belongs to the provider organisation and cannot review its case"
    return None


def _actor_kinds(case: AuditCase, user) -> set[str]:
    if user is None:
        return {SYSTEM}
    kinds = set()
    if access.is_admin(user):
        kinds.add(ADMIN)
    if access.has_role(user, access.SUBMITTER) and \
            access.organisation_id_of(user) == case.model_version.ai_model.organisation_id:
        kinds.add(OWNER)
    if access.has_role(user, access.REVIEWER) and case.reviewers.filter(pk=user.pk).exists() \
            and conflict_of(case, user) is None:
        kinds.add(REVIEWER)
    return kinds


def allowed_targets(state: str) -> tuple[str, ...]:
    """States reachable from ``state`` by any actor (including through sign-offs)."""
    return tuple(TRANSITIONS.get(state, {}))


def available_transitions(case: AuditCase, user) -> list[str]:
    """Targets ``user`` may trigger from the case's current state with :func:`transition`."""
    kinds = _actor_kinds(case, user)
    return [to for to, actors in TRANSITIONS.get(case.state, {}).items() if actors & kinds]


# --------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------


# Lock order, the same on every path that writes (workflow, pipeline, tasks, reports):
#   1. the case row (AuditCase, FOR UPDATE of that row only),
#   2. its probe-run rows (ProbeRun, by ascending pk),
#   3. the audit chain head (governance.audit_log.record, always last: every write ends with it).
# ``of=("self",)`` matters: with ``select_related`` PostgreSQL would otherwise also lock the joined
# ModelVersion and AIModel rows, serialising every action on every case of one model version and
# taking them in the opposite order to a case insert (chain head, then the version's key-share
# lock), which deadlocks. ``no_key=True`` (FOR NO KEY UPDATE) because nothing here changes a key:
# rows that merely *reference* the case (audit events, runs, sign-offs) check their foreign key
# with a KEY SHARE lock at commit, often while holding the chain head; a plain FOR UPDATE would
# make them wait for the case while its holder waits for the chain head.
LOCK_ORDER = ("case", "probe runs (by pk)", "audit chain head")


def lock_case(case_id: int) -> AuditCase:
    """``SELECT ... FOR NO KEY UPDATE OF`` the case row only (first in :data:`LOCK_ORDER`).
    Call inside ``transaction.atomic()``."""
    return (AuditCase.objects.select_for_update(of=("self",), no_key=True)
            .select_related("model_version__ai_model").get(pk=case_id))


def _lock(case: AuditCase) -> AuditCase:
    return lock_case(case.pk)


def _sync(source: AuditCase, target: AuditCase) -> None:
    for name in ("state", "review_round", "submitted_by_id", "submitted_at", "state_changed_at", "updated_at"):
        setattr(target, name, getattr(source, name))
    target._loaded_state = source.state


def _apply(locked: AuditCase, to_state: str, by, payload: dict) -> None:
    """Move a locked case to ``to_state`` with the state's side effects, and log it."""
    from_state = locked.state
    now = timezone.now()
    extra: dict = {}
    if to_state == S.SUBMITTED:
        if not locked.probe_plan:
            raise WorkflowError(f"case #{locked.pk} has an empty probe plan; plan at least one probe before submitting")
        try:
            validate_probe_plan(locked.probe_plan)
        except ValidationError as exc:
            raise WorkflowError(f"case #{locked.pk} has an invalid probe plan: {'; '.join(exc.messages)}") from exc
        locked.submitted_by_id = by.pk if by is not None else locked.submitted_by_id
        locked.submitted_at = now
    if to_state == S.IN_REVIEW:
        eligible = [u for u in locked.reviewers.all() if u.is_active and conflict_of(locked, u) is None]
        if len(eligible) < locked.required_approvals:
            raise WorkflowError(f"case #{locked.pk} needs {locked.required_approvals} eligible reviewers "
                                f"assigned before review; it has {len(eligible)}")
        locked.review_round += 1
        extra["review_round"] = locked.review_round
    if to_state == S.DRAFT:
        active = list(ProbeRun.objects.filter(case_id=locked.pk, status__in=ProbeRun.ACTIVE)
                      .values_list("pk", flat=True))
        ProbeRun.objects.filter(pk__in=active).update(status=ProbeRun.Status.CANCELLED, finished_at=now,
                                                      phase="cancelled with the case")
        extra["cancelled_runs"] = active
    locked.state = to_state
    locked.state_changed_at = now
    locked._workflow_transition = True
    try:
        locked.save()
    finally:
        locked._workflow_transition = False
    audit_log.record(by, f"case.{to_state}", locked, {"from": from_state, "to": to_state, **payload, **extra})
    case_transitioned.send(sender=AuditCase, case=locked, from_state=from_state, to_state=to_state, by=by)


def transition(case: AuditCase, to_state: str, by, note: str = "") -> AuditCase:
    """Move ``case`` to ``to_state`` on behalf of ``by`` (a user; ``None`` = the system).

    Raises :class:`TransitionError` for an illegal move (naming the allowed targets), :class:`NotAllowed`
    when ``by`` may not make it, :class:`WorkflowError` when a precondition fails (e.g. an empty plan).
    Updates ``case`` in place and returns it.
    """
    if to_state not in S.values:
        raise TransitionError(case, case.state, to_state, allowed_targets(case.state),
                              reason=f"'{to_state}' is not a case state; states: {', '.join(S.values)}")
    with transaction.atomic():
        locked = _lock(case)
        targets = TRANSITIONS.get(locked.state, {})
        if to_state not in targets:
            raise TransitionError(locked, locked.state, to_state, targets)
        actors = targets[to_state]
        if actors == VIA_SIGNOFF:
            raise TransitionError(locked, locked.state, to_state, targets,
                                  reason=f"case #{locked.pk} moves from '{locked.state}' to '{to_state}' only "
                                         "through reviewer sign-offs (workflow.sign_off)")
        kinds = _actor_kinds(locked, by)
        if not actors & kinds:
            who = by.get_username() if by is not None else "the system"
            raise NotAllowed(f"{who} may not move case #{locked.pk} from '{locked.state}' to '{to_state}' "
                             f"(allowed: {', '.join(sorted(actors))})")
        _apply(locked, to_state, by, {"note": note} if note else {})
    _sync(locked, case)
    return case


def submit(case: AuditCase, by) -> AuditCase:
    """Submit a draft (or resubmit a case with changes requested) for probing."""
    return transition(case, S.SUBMITTED, by)


def start_runs(case: AuditCase, by=None) -> AuditCase:
    """``submitted -> running`` (the pipeline creates and dispatches the runs)."""
    return transition(case, S.RUNNING, by)


def mark_evidence_ready(case: AuditCase, by=None) -> AuditCase:
    """``running -> evidence_ready`` once every run finished (the pipeline's aggregation step)."""
    return transition(case, S.EVIDENCE_READY, by)


def rerun(case: AuditCase, by=None) -> AuditCase:
    """``evidence_ready -> running`` to run failed probes again."""
    return transition(case, S.RUNNING, by)


def start_review(case: AuditCase, by) -> AuditCase:
    """``evidence_ready -> in_review`` (opens a new review round)."""
    return transition(case, S.IN_REVIEW, by)


def withdraw(case: AuditCase, by) -> AuditCase:
    """``submitted|running -> draft``: cancel; active runs are marked cancelled."""
    return transition(case, S.DRAFT, by)


def archive(case: AuditCase, by) -> AuditCase:
    return transition(case, S.ARCHIVED, by)


def assign_reviewers(case: AuditCase, reviewers: Iterable, by) -> AuditCase:
    """Set the case's reviewers (admins only). Each must hold the reviewer role and be free of conflicts."""
    reviewers = list(reviewers)
    if not access.is_admin(by):
        raise NotAllowed("only admins assign reviewers")
    with transaction.atomic():
        locked = _lock(case)
        if locked.state in (S.APPROVED, S.REJECTED, S.ARCHIVED):
            raise WorkflowError(f"case #{locked.pk} is {locked.state}; its reviewers can no longer change")
        for user in reviewers:
            if not user.is_active or not access.has_role(user, access.REVIEWER):
                raise WorkflowError(f"{user.get_username()} is not an active reviewer")
            conflict = conflict_of(locked, user)
            if conflict:
                raise NotAllowed(f"segregation of duties: {conflict}")
        before = sorted(locked.reviewers.values_list("username", flat=True))
        locked.reviewers.set(reviewers)
        audit_log.record(by, "case.reviewers_assigned", locked,
                         {"before": before, "after": sorted(u.get_username() for u in reviewers)})
    return case


# --------------------------------------------------------------------------------------------------
# Sign-off
# --------------------------------------------------------------------------------------------------


@dataclass
class ReviewStatus:
    """Where the current review round stands."""

    required: int
    approved_by: list[str] = field(default_factory=list)
    rejected_by: list[str] = field(default_factory=list)
    changes_requested_by: list[str] = field(default_factory=list)
    open_objections: list[str] = field(default_factory=list)
    stale_approvals: list[str] = field(default_factory=list)

    @property
    def is_approved(self) -> bool:
        return len(self.approved_by) >= self.required and not self.rejected_by and not self.open_objections \
            and not self.changes_requested_by


def review_status(case: AuditCase, current_digest: str | None = None) -> ReviewStatus:
    """Count the current round: latest decision per eligible reviewer, case level and per item."""
    current_digest = current_digest or case_digest(case)
    status = ReviewStatus(required=case.required_approvals)
    eligible = {u.pk: u for u in case.reviewers.all() if u.is_active and conflict_of(case, u) is None}
    latest_case: dict[int, Signoff] = {}
    latest_item: dict[tuple[int, str], Signoff] = {}
    for signoff in (Signoff.objects.filter(case_id=case.pk, review_round=case.review_round)
                    .order_by("created_at", "pk")):
        if signoff.reviewer_id not in eligible:
            continue
        if signoff.is_case_level:
            latest_case[signoff.reviewer_id] = signoff
        else:
            item = f"evidence #{signoff.evidence_id}" if signoff.evidence_id else f"section {signoff.report_section}"
            latest_item[(signoff.reviewer_id, item)] = signoff
    for reviewer_id, signoff in latest_case.items():
        name = eligible[reviewer_id].get_username()
        if signoff.decision == D.APPROVE:
            (status.approved_by if signoff.digest == current_digest else status.stale_approvals).append(name)
        elif signoff.decision == D.REJECT:
            status.rejected_by.append(name)
        else:
            status.changes_requested_by.append(name)
    for (reviewer_id, item), signoff in latest_item.items():
        if signoff.decision != D.APPROVE:
            status.open_objections.append(f"{eligible[reviewer_id].get_username()}: {signoff.decision} on {item}")
    for names in (status.approved_by, status.rejected_by, status.changes_requested_by, status.stale_approvals):
        names.sort()
    status.open_objections.sort()
    return status


def _refuse_duplicate(case: AuditCase, reviewer, decision: str, signed_digest: str, evidence: Evidence | None,
                      report_section: str) -> None:
    """The same decision by the same reviewer on the same, unchanged evidence in one round counts
    once; saying it again would only look like a second voice, so it is refused."""
    latest = (Signoff.objects.filter(case_id=case.pk, reviewer=reviewer, review_round=case.review_round,
                                     evidence=evidence, report_section=report_section)
              .order_by("-created_at", "-pk").first())
    if latest is not None and latest.decision == decision and latest.digest == signed_digest:
        target = f"evidence #{evidence.pk}" if evidence is not None else (
            f"section {report_section}" if report_section else f"case #{case.pk}")
        raise WorkflowError(f"you already recorded '{latest.get_decision_display()}' on {target} in review round "
                            f"{case.review_round} ({latest.created_at:%Y-%m-%d %H:%M} UTC) and the evidence has not "
                            "changed since; a decision counts once")


def sign_off(case: AuditCase, reviewer, decision: str, comment: str = "", evidence: Evidence | None = None,
             report_section: str = "", acknowledgements: dict[str, str] | None = None) -> Signoff:
    """Record ``reviewer``'s decision on ``case`` (or one evidence item / report section) and apply it.

    Refuses (:class:`NotAllowed`) anyone not assigned to the case and anyone with a conflict (the
    submitter above all). A case in ``evidence_ready`` enters review with the first sign-off.
    ``reject`` and ``request_changes`` need a comment. A case-level approval while high or medium
    findings (from the case's acceptance criteria) are open needs ``acknowledgements``, one reason per
    finding key (:mod:`governance.acceptance`). Returns the new, immutable :class:`Signoff`.
    """
    if decision not in D.values:
        raise WorkflowError(f"unknown decision {decision!r}; expected one of {', '.join(D.values)}")
    comment = (comment or "").strip()
    if decision != D.APPROVE and not comment:
        raise WorkflowError(f"a '{decision}' decision needs a comment saying why")
    if evidence is not None and report_section:
        raise WorkflowError("sign off either one evidence item or one report section, not both")
    if reviewer is None or not getattr(reviewer, "is_authenticated", False) or not reviewer.is_active:
        raise NotAllowed("sign-offs need an active, signed-in reviewer")
    with transaction.atomic():
        locked = _lock(case)
        conflict = conflict_of(locked, reviewer)
        if conflict:
            raise NotAllowed(f"segregation of duties: {conflict}")
        if not access.has_role(reviewer, access.REVIEWER) or not locked.reviewers.filter(pk=reviewer.pk).exists():
            raise NotAllowed(f"only reviewers assigned to case #{locked.pk} may sign it off")
        if locked.state == S.EVIDENCE_READY:
            _apply(locked, S.IN_REVIEW, reviewer, {"note": "review opened by the first sign-off"})
        if locked.state != S.IN_REVIEW:
            raise TransitionError(locked, locked.state, "signed off", (),
                                  reason=f"case #{locked.pk} is '{locked.state}'; sign-offs are taken only while it "
                                         "is in review (or has evidence ready)")
        if evidence is not None:
            evidence = Evidence.objects.select_related("run").filter(pk=evidence.pk, run__case_id=locked.pk).first()
            if evidence is None:
                raise WorkflowError(f"that evidence does not belong to case #{locked.pk}")
            signed_digest = evidence_digest(evidence)
        else:
            signed_digest = case_digest(locked)
        _refuse_duplicate(locked, reviewer, decision, signed_digest, evidence, report_section)
        acknowledged = []
        if evidence is None and not report_section and decision == D.APPROVE:
            acceptance.ensure_defaults(locked)
            try:
                acknowledged = acceptance.check_acknowledged(locked, acknowledgements)
            except acceptance.AcknowledgementError as refused:
                raise WorkflowError(str(refused)) from refused
        elif acknowledgements:
            raise WorkflowError("acknowledgements belong to a case-level approval")
        signoff = Signoff.objects.create(
            case=locked, evidence=evidence, report_section=report_section, reviewer=reviewer, decision=decision,
            comment=comment, digest=signed_digest, review_round=locked.review_round)
        audit_log.record(reviewer, "signoff.created", signoff, {
            "decision": decision, "digest": signed_digest, "evidence": evidence.pk if evidence else None,
            "report_section": report_section, "comment": comment, "review_round": locked.review_round,
            "content_digest": content_digest(signoff)}
            | ({"acknowledged": {f["key"]: f["reason"] for f in acknowledged}} if acknowledged else {}))
        acceptance.record_acknowledgements(signoff, acknowledged)

        if signoff.is_case_level and decision == D.REJECT:
            _apply(locked, S.REJECTED, reviewer, {"signoff": signoff.pk})
        elif signoff.is_case_level and decision == D.REQUEST_CHANGES:
            _apply(locked, S.CHANGES_REQUESTED, reviewer, {"signoff": signoff.pk})
        else:
            status = review_status(locked, current_digest=case_digest(locked))
            if status.is_approved:
                _apply(locked, S.APPROVED, reviewer, {"signoff": signoff.pk, "approved_by": status.approved_by})
    _sync(locked, case)
    return signoff

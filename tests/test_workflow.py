"""The case workflow: legal transitions, who may make them, and four-eyes sign-off."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth.models import Group
from django.db import connection

from governance import audit_log, workflow
from governance.models import AuditCase, AuditEvent, ProbeRun, Signoff
from tests.actors import finish_run_with_evidence

S = AuditCase.State


def test_it_walks_a_case_from_draft_to_approved_with_two_distinct_reviewers(case_with_evidence, rita, rob):
    case = case_with_evidence
    assert case.state == S.EVIDENCE_READY

    workflow.sign_off(case, rita, "approve", "Heatmaps land on the objects.")
    case.refresh_from_db()
    assert case.state == S.IN_REVIEW  # the first sign-off opened the review, one approval is not enough

    workflow.sign_off(case, rob, "approve", "")
    case.refresh_from_db()
    assert case.state == S.APPROVED
    actions = list(AuditEvent.objects.filter(case=case).values_list("action", flat=True))
    assert actions == ["case.reviewers_assigned", "case.submitted", "case.running", "evidence.recorded",
                       "case.evidence_ready",
                       "case.in_review", "signoff.created", "signoff.created", "case.approved"]


def test_it_refuses_the_submitters_own_sign_off(case_with_evidence, alice):
    with pytest.raises(workflow.NotAllowed, match="segregation of duties: alice"):
        workflow.sign_off(case_with_evidence, alice, "approve")
    assert not Signoff.objects.exists()


def test_it_refuses_sign_off_by_whoever_submitted_even_an_admin_reviewer(draft_case, ada, rita, alice):
    ada.groups.add(Group.objects.get(name="reviewer"))
    ada._loupe_roles = None  # drop the cached roles
    workflow.assign_reviewers(draft_case, [ada, rita], by=ada)  # assigned while nobody had submitted
    draft_case.required_approvals = 1
    draft_case.save()
    workflow.submit(draft_case, by=ada)
    workflow.start_runs(draft_case)
    finish_run_with_evidence(draft_case)
    workflow.mark_evidence_ready(draft_case)

    with pytest.raises(workflow.NotAllowed, match="ada created or submitted case"):
        workflow.sign_off(draft_case, ada, "approve")
    workflow.sign_off(draft_case, rita, "approve")
    draft_case.refresh_from_db()
    assert draft_case.state == S.APPROVED


def test_it_refuses_reviewers_from_the_provider_organisation(draft_case, ada, make_user, acme):
    colleague = make_user("carol", "reviewer", acme)
    with pytest.raises(workflow.NotAllowed, match="belongs to the provider organisation"):
        workflow.assign_reviewers(draft_case, [colleague], by=ada)


def test_it_refuses_sign_off_by_anyone_not_assigned(case_with_evidence, ruth, audrey, mallory, ada):
    for outsider in (ruth, audrey, mallory, ada):
        with pytest.raises(workflow.NotAllowed, match="only reviewers assigned"):
            workflow.sign_off(case_with_evidence, outsider, "approve")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.EVIDENCE_READY


def test_it_counts_one_reviewer_once(case_with_evidence, rita, rob):
    workflow.sign_off(case_with_evidence, rita, "approve")
    with pytest.raises(workflow.WorkflowError, match="a decision counts once"):
        workflow.sign_off(case_with_evidence, rita, "approve", "Really, I approve.")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.IN_REVIEW
    assert workflow.review_status(case_with_evidence).approved_by == ["rita"]


def test_it_moves_to_rejected_on_a_reject_and_only_an_admin_archives_it(case_with_evidence, rita, rob, alice, ada):
    workflow.sign_off(case_with_evidence, rob, "approve")
    workflow.sign_off(case_with_evidence, rita, "reject", "Heatmaps ignore the object: shortcut on the watermark.")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.REJECTED
    with pytest.raises(workflow.NotAllowed):
        workflow.archive(case_with_evidence, by=alice)
    workflow.archive(case_with_evidence, by=ada)
    assert case_with_evidence.state == S.ARCHIVED
    with pytest.raises(workflow.TransitionError) as excinfo:
        workflow.submit(case_with_evidence, by=alice)
    assert excinfo.value.allowed == ()


def test_it_requests_changes_then_counts_only_the_new_round(case_with_evidence, rita, rob, alice):
    case = case_with_evidence
    workflow.sign_off(case, rita, "approve")
    workflow.sign_off(case, rob, "request_changes", "Add the typographic attack probe.")
    case.refresh_from_db()
    assert case.state == S.CHANGES_REQUESTED

    case.probe_plan = case.probe_plan + [{"kind": case.probe_plan[0]["kind"], "params": {"n": 5}}]
    case.save()  # editable again while changes are requested
    workflow.submit(case, by=alice)
    workflow.start_runs(case)
    finish_run_with_evidence(case, summary="Second round.")
    workflow.mark_evidence_ready(case)

    workflow.sign_off(case, rob, "approve", "Thanks.")
    case.refresh_from_db()
    assert case.state == S.IN_REVIEW, "rita's approval from round 1 must not count in round 2"
    assert case.review_round == 2
    workflow.sign_off(case, rita, "approve")
    case.refresh_from_db()
    assert case.state == S.APPROVED


def test_it_blocks_approval_while_an_item_objection_is_open(case_with_evidence, rita, rob):
    evidence = case_with_evidence.runs.get().evidence
    workflow.sign_off(case_with_evidence, rita, "request_changes", "Figure 2 has no colour bar.", evidence=evidence)
    workflow.sign_off(case_with_evidence, rita, "approve")
    workflow.sign_off(case_with_evidence, rob, "approve")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.IN_REVIEW
    assert workflow.review_status(case_with_evidence).open_objections == [
        f"rita: request_changes on evidence #{evidence.pk}"]

    workflow.sign_off(case_with_evidence, rita, "approve", "Colour bar added to the legend.", evidence=evidence)
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.APPROVED


def test_it_signs_the_digest_of_the_evidence_as_seen(case_with_evidence, rita, rob):
    first = workflow.sign_off(case_with_evidence, rita, "approve")
    assert first.digest == workflow.case_digest(case_with_evidence)

    # Evidence changes after rita looked (a run added behind the reviewers' backs): her approval is stale.
    finish_run_with_evidence(case_with_evidence, summary="Late addition.")
    assert workflow.case_digest(case_with_evidence) != first.digest
    workflow.sign_off(case_with_evidence, rob, "approve")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.IN_REVIEW
    status = workflow.review_status(case_with_evidence)
    assert status.approved_by == ["rob"] and status.stale_approvals == ["rita"]


def test_it_refuses_illegal_transitions_naming_the_allowed_targets(draft_case, alice, ada):
    with pytest.raises(workflow.TransitionError) as excinfo:
        workflow.transition(draft_case, S.APPROVED, by=ada)
    error = excinfo.value
    assert (error.from_state, error.to_state) == ("draft", "approved")
    assert set(error.allowed) == {"submitted", "archived"}
    assert "cannot move from 'draft' to 'approved'; allowed from 'draft': submitted, archived" in str(error)

    with pytest.raises(workflow.TransitionError, match="not a case state"):
        workflow.transition(draft_case, "published", by=ada)
    draft_case.refresh_from_db()
    assert draft_case.state == S.DRAFT


def test_it_approves_only_through_sign_offs(case_with_evidence, ada, rita):
    workflow.start_review(case_with_evidence, by=rita)
    with pytest.raises(workflow.TransitionError, match="only through reviewer sign-offs"):
        workflow.transition(case_with_evidence, S.APPROVED, by=ada)


def test_it_refuses_state_changes_that_bypass_the_workflow(draft_case, acme_version, alice):
    draft_case.state = S.APPROVED
    with pytest.raises(ValueError, match="go through governance.workflow"):
        draft_case.save()
    with pytest.raises(ValueError, match="starts as 'draft'"):
        AuditCase.objects.create(model_version=acme_version, title="Sneaky", state=S.APPROVED, created_by=alice)


def test_it_lets_only_the_owner_or_an_admin_submit(draft_case, mallory, rita, audrey, alice):
    for outsider in (mallory, rita, audrey, None):
        with pytest.raises(workflow.NotAllowed):
            workflow.submit(draft_case, by=outsider)
    workflow.submit(draft_case, by=alice)
    assert draft_case.state == S.SUBMITTED and draft_case.submitted_by == alice


def test_it_refuses_to_submit_an_empty_or_unknown_plan(draft_case, alice):
    AuditCase.objects.filter(pk=draft_case.pk).update(probe_plan=[])
    draft_case.refresh_from_db()
    with pytest.raises(workflow.WorkflowError, match="empty probe plan"):
        workflow.submit(draft_case, by=alice)
    AuditCase.objects.filter(pk=draft_case.pk).update(probe_plan=[{"kind": "no.such.probe"}])
    draft_case.refresh_from_db()
    with pytest.raises(workflow.WorkflowError, match="unknown probe kind 'no.such.probe'"):
        workflow.submit(draft_case, by=alice)
    assert draft_case.state == S.DRAFT


def test_it_needs_enough_eligible_reviewers_before_review(draft_case, alice, ada, rita):
    workflow.assign_reviewers(draft_case, [rita], by=ada)
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case)
    workflow.mark_evidence_ready(draft_case)
    with pytest.raises(workflow.WorkflowError, match="needs 2 eligible reviewers assigned before review; it has 1"):
        workflow.start_review(draft_case, by=ada)


def test_it_cancels_active_runs_when_the_case_is_withdrawn(draft_case, alice):
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case, by=alice)
    queued = ProbeRun.objects.create(case=draft_case, kind="test.echo", status=ProbeRun.Status.QUEUED)
    done, _ = finish_run_with_evidence(draft_case)
    workflow.withdraw(draft_case, by=alice)
    queued.refresh_from_db()
    done.refresh_from_db()
    assert draft_case.state == S.DRAFT
    assert queued.status == ProbeRun.Status.CANCELLED and done.status == ProbeRun.Status.SUCCEEDED
    event = AuditEvent.objects.filter(case=draft_case).last()
    assert event.action == "case.draft" and event.data["cancelled_runs"] == [queued.pk]


def test_it_needs_a_comment_to_reject(case_with_evidence, rita):
    with pytest.raises(workflow.WorkflowError, match="needs a comment"):
        workflow.sign_off(case_with_evidence, rita, "reject", "   ")
    with pytest.raises(workflow.WorkflowError, match="unknown decision"):
        workflow.sign_off(case_with_evidence, rita, "lgtm")


def test_it_rolls_back_sign_off_state_and_log_together(case_with_evidence, rita, rob):
    workflow.sign_off(case_with_evidence, rita, "approve")
    events_before = AuditEvent.objects.count()

    def explode(**kwargs):
        raise RuntimeError("receiver failed")

    workflow.case_transitioned.connect(explode, dispatch_uid="explode")
    try:
        with pytest.raises(RuntimeError):
            workflow.sign_off(case_with_evidence, rob, "approve")
    finally:
        workflow.case_transitioned.disconnect(dispatch_uid="explode")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.IN_REVIEW
    assert Signoff.objects.filter(reviewer=rob).count() == 0
    assert AuditEvent.objects.count() == events_before


def test_it_offers_each_actor_only_their_transitions(case_with_evidence, rita, alice, ada, audrey):
    assert workflow.available_transitions(case_with_evidence, rita) == [S.IN_REVIEW]
    assert workflow.available_transitions(case_with_evidence, alice) == []
    assert workflow.available_transitions(case_with_evidence, audrey) == []
    assert set(workflow.available_transitions(case_with_evidence, ada)) == {S.IN_REVIEW, S.RUNNING}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs concurrent connections (PostgreSQL)")
@pytest.mark.django_db(transaction=True)
def test_it_approves_exactly_once_when_reviewers_sign_off_at_the_same_moment(case_with_evidence, rita, rob):
    workflow.start_review(case_with_evidence, by=rita)
    barrier = threading.Barrier(2)
    errors = []

    def approve(reviewer):
        try:
            barrier.wait()
            workflow.sign_off(AuditCase.objects.get(pk=case_with_evidence.pk), reviewer, "approve")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=approve, args=(r,)) for r in (rita, rob)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == S.APPROVED
    assert AuditEvent.objects.filter(case=case_with_evidence, action="case.approved").count() == 1
    assert audit_log.verify() == []

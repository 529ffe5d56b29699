"""Review rules a reviewer relies on: a decision counts once, and a case without evidence is never
ready for review."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from governance import pipeline, workflow
from governance.models import AuditCase, AuditEvent, Signoff
from tests.pipeline_fixtures import make_case, wait_for_state


def test_a_second_identical_approval_is_refused_by_the_workflow_and_the_api(case_with_evidence, rita):
    workflow.sign_off(case_with_evidence, rita, "approve", "looks sound")
    with pytest.raises(workflow.WorkflowError, match="already recorded 'Approve' on case"):
        workflow.sign_off(case_with_evidence, rita, "approve", "again")

    client = APIClient()
    client.force_authenticate(rita)
    response = client.post(f"/api/cases/{case_with_evidence.pk}/signoff/", {"decision": "approve"}, format="json")
    assert response.status_code == 400
    assert "a decision counts once" in response.json()["detail"]
    assert Signoff.objects.filter(case=case_with_evidence, reviewer=rita).count() == 1


def test_a_reviewer_may_still_change_their_mind(case_with_evidence, rita):
    workflow.sign_off(case_with_evidence, rita, "approve", "looks sound")
    workflow.sign_off(case_with_evidence, rita, "request_changes", "the watermark finding needs an answer")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == AuditCase.State.CHANGES_REQUESTED


@pytest.mark.django_db(transaction=True)
def test_a_case_whose_every_run_failed_goes_back_to_submitted_not_evidence_ready(
        tiny_clip_version, alice, ada, rita, rob, celery_worker):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {"fail": True}}])
    pipeline.start_case(case.pk, by=alice)
    case = wait_for_state(case, AuditCase.State.SUBMITTED)
    assert AuditEvent.objects.filter(action="case.no_evidence", case=case).exists()
    assert not AuditEvent.objects.filter(action="case.evidence_aggregated", case=case).exists()
    with pytest.raises(workflow.WorkflowError):
        workflow.sign_off(case, rita, "approve", "nothing to see")

"""Attack 2 (issue #20): the inventory fields a case's conclusions depend on are frozen while the
case is being audited or decided, so an approved high-risk model cannot be turned into a minimal-risk
one behind its reviewers' backs."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from governance import workflow
from governance.models import AIModel, AuditEvent, ImmutableError

pytestmark = pytest.mark.django_db


@pytest.fixture
def approved_high_risk(case_with_evidence, rita, rob):
    model = case_with_evidence.model_version.ai_model
    AIModel.objects.filter(pk=model.pk).update(risk_category="high_risk", annex_iii_area="4",
                                               intended_purpose="Screening CV photos for recruiters.")
    workflow.sign_off(case_with_evidence, rita, "approve")
    workflow.sign_off(case_with_evidence, rob, "approve")
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == "approved"
    return case_with_evidence


@pytest.mark.parametrize("change", [
    {"risk_category": "minimal", "annex_iii_area": "", "intended_purpose": "Tagging holiday photos."},
    {"intended_purpose": "Something else entirely."},
    {"provider_name": "Someone Else Ltd"},
    {"risk_category": "high_risk", "annex_iii_area": "1"},
    {"modality": "image"},
])
def test_an_approved_cases_inventory_fields_cannot_change(change, approved_high_risk, alice):
    model = approved_high_risk.model_version.ai_model
    before = AIModel.objects.filter(pk=model.pk).values().get()
    events = AuditEvent.objects.count()
    client = APIClient()
    client.force_authenticate(alice)
    response = client.patch(f"/api/models/{model.pk}/", change, format="json")
    assert response.status_code == 409, response.json()
    body = response.json()
    assert body["error"] == "immutable" and f"#{approved_high_risk.pk}" in body["detail"]
    assert AIModel.objects.filter(pk=model.pk).values().get() == before
    assert AuditEvent.objects.count() == events
    approved_high_risk.refresh_from_db()
    status = workflow.review_status(approved_high_risk)
    assert approved_high_risk.state == "approved" and not status.stale_approvals


def test_the_model_layer_refuses_too(approved_high_risk):
    model = AIModel.objects.get(pk=approved_high_risk.model_version.ai_model_id)
    model.risk_category, model.annex_iii_area = "minimal", ""
    with pytest.raises(ImmutableError):
        model.save()


def test_fields_no_conclusion_depends_on_stay_editable(approved_high_risk, alice):
    model = approved_high_risk.model_version.ai_model
    client = APIClient()
    client.force_authenticate(alice)
    response = client.patch(f"/api/models/{model.pk}/", {"provider_contact": "new@acme.example"}, format="json")
    assert response.status_code == 200, response.json()


def test_a_draft_cases_model_stays_editable(draft_case, alice):
    model = draft_case.model_version.ai_model
    client = APIClient()
    client.force_authenticate(alice)
    response = client.patch(f"/api/models/{model.pk}/", {"risk_category": "minimal"}, format="json")
    assert response.status_code == 200, response.json()


def test_a_report_is_never_issued_as_approved_on_stale_approvals(approved_high_risk, rita, settings, tmp_path):
    """Even if the inventory changed past every guard (here: raw SQL), the approvals no longer match
    what the reviewers saw, and no report claims the case approved."""
    from governance.models import Report

    settings.MEDIA_ROOT = tmp_path / "media"
    AIModel.objects.filter(pk=approved_high_risk.model_version.ai_model_id).update(
        risk_category="minimal", annex_iii_area="")
    assert workflow.review_status(approved_high_risk).stale_approvals
    client = APIClient()
    client.force_authenticate(rita)
    response = client.post(f"/api/cases/{approved_high_risk.pk}/reports/")
    assert response.status_code in (400, 409), response.content[:300]
    assert "stale" in response.json()["detail"]
    assert not Report.objects.filter(case=approved_high_risk).exists()


def test_the_admin_shows_the_refusal_on_the_form_instead_of_failing(approved_high_risk, ada):
    from django.contrib import admin as django_admin
    from django.test import Client, RequestFactory

    model = AIModel.objects.get(pk=approved_high_risk.model_version.ai_model_id)
    before = AIModel.objects.filter(pk=model.pk).values().get()
    request = RequestFactory().get("/")
    request.user = ada
    form_class = django_admin.site._registry[AIModel].get_form(request, model)
    data = {name: value for name, value in form_class(instance=model).initial.items() if value is not None}
    data.update(risk_category="minimal", annex_iii_area="")
    client = Client()
    client.force_login(ada)
    response = client.post(f"/admin/governance/aimodel/{model.pk}/change/", data)
    assert response.status_code == 200  # the form again, not a server error
    assert f"under audit in case #{approved_high_risk.pk}" in response.content.decode()
    assert AIModel.objects.filter(pk=model.pk).values().get() == before

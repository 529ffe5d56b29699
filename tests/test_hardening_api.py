"""Attacks 5 and 6 (issue #20): every API error is JSON ``{"error", "detail"}``, and another
organisation's ids answer exactly like ids that do not exist."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

MISSING = 987654


def client_for(user=None, *, raise_exceptions: bool = True) -> APIClient:
    client = APIClient()
    client.raise_request_exception = raise_exceptions
    if user is not None:
        client.force_authenticate(user)
    return client


def assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert "detail" in body and body["detail"], body
    return body


# --- attack 5: error shapes ------------------------------------------------------------------------


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [200, 1000, 5000])
def test_a_deeply_nested_body_is_a_json_400(depth, alice, draft_case):
    body = '{"probe_plan": [{"kind": "test.echo", "params": ' + nested(depth) + "}]}"
    response = client_for(alice, raise_exceptions=False).generic(
        "PATCH", f"/api/cases/{draft_case.pk}/", body, content_type="application/json")
    body = assert_error_shape(response, 400)
    assert body["error"] in ("parse_error", "too_deep")


def test_a_body_over_the_size_limit_is_a_json_413(alice, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client_for(alice, raise_exceptions=False).post(
        "/api/models/", json.dumps({"name": "x" * 5000}), content_type="application/json")
    body = assert_error_shape(response, 413)
    assert body["error"] == "request_too_large"


@pytest.mark.parametrize("url", ["/api/cases/999999/", "/api/cases/not-a-number/", "/api/no-such-thing/",
                                 "/api/runs/abc/", "/api/reports/1.5/download/"])
def test_not_found_is_a_json_404(url, alice):
    body = assert_error_shape(client_for(alice, raise_exceptions=False).get(url), 404)
    assert body["error"] == "not_found"


def test_a_method_not_allowed_is_a_json_405(alice):
    body = assert_error_shape(client_for(alice).delete("/api/models/"), 405)
    assert body["error"] == "method_not_allowed"


def test_a_server_error_is_a_json_500_without_a_debug_page(alice, monkeypatch, settings):
    settings.DEBUG = True  # even the development default never answers an API client with a debug page
    from governance.api import views

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(views.OrganisationViewSet, "list", broken)
    response = client_for(alice, raise_exceptions=False).get("/api/organisations/")
    body = assert_error_shape(response, 500)
    assert body["error"] == "server_error"
    assert "secret internals" not in response.content.decode()


def test_too_many_requests_is_json(client, settings, acme, alice):
    from django.core.cache import cache

    cache.clear()
    for _ in range(60):
        response = client_for(raise_exceptions=False).post(
            "/api/auth/token/", {"username": "nobody", "password": "wrong"}, format="json")
        if response.status_code == 429:
            break
    body = assert_error_shape(response, 429)
    assert body["error"] in ("throttled", "locked_out")
    cache.clear()


# --- attack 6: existence oracles -------------------------------------------------------------------


def _same_answer(user, url_for) -> None:
    """``url_for(id)`` answers the same for another organisation's id as for a missing one."""
    foreign, missing = url_for.foreign, MISSING
    a = client_for(user, raise_exceptions=False).get(url_for(foreign))
    b = client_for(user, raise_exceptions=False).get(url_for(missing))
    text_a = a.content.decode().replace(str(foreign), "<id>")
    text_b = b.content.decode().replace(str(missing), "<id>")
    assert (a.status_code, text_a) == (b.status_code, text_b), (url_for(foreign), a.status_code, b.status_code)


class Url:
    def __init__(self, template: str, foreign: int) -> None:
        self.template, self.foreign = template, foreign

    def __call__(self, pk: int) -> str:
        return self.template.format(pk)


def test_list_filters_answer_another_organisations_ids_like_missing_ids(case_with_evidence, mallory, globex_case):
    from governance.models import Evidence, EvidenceArtifact

    case = case_with_evidence
    evidence = Evidence.objects.get(run__case=case)
    artifact = EvidenceArtifact.objects.get(evidence=evidence)
    version, ai_model = case.model_version, case.model_version.ai_model
    run = evidence.run
    urls = [
        Url("/api/runs/?case={}", case.pk), Url("/api/signoffs/?case={}", case.pk),
        Url("/api/reports/?case={}", case.pk), Url("/api/evidence/?case={}", case.pk),
        Url("/api/evidence/?run={}", run.pk), Url("/api/artifacts/?evidence={}", evidence.pk),
        Url("/api/audit-events/?case={}", case.pk), Url("/api/audit-events/?organisation={}", ai_model.organisation_id),
        Url("/api/versions/?ai_model={}", ai_model.pk), Url("/api/cases/?model_version={}", version.pk),
        Url("/api/cases/?ai_model={}", ai_model.pk), Url("/api/models/?organisation={}", ai_model.organisation_id),
        Url("/api/signoffs/?reviewer={}", case.reviewers.first().pk),
        Url("/api/cases/{}/", case.pk), Url("/api/evidence/{}/", evidence.pk),
        Url("/api/artifacts/{}/download/", artifact.pk),
    ]
    for url in urls:
        _same_answer(mallory, url)


def test_signing_off_with_another_cases_evidence_answers_like_a_missing_id(case_with_evidence, globex_case, rita,
                                                                          mallory, ada):
    from governance import workflow
    from tests.actors import finish_run_with_evidence

    workflow.assign_reviewers(globex_case, [rita], by=ada)
    workflow.submit(globex_case, by=mallory)
    workflow.start_runs(globex_case)
    _run, other_evidence = finish_run_with_evidence(globex_case)
    workflow.mark_evidence_ready(globex_case)
    url = f"/api/cases/{case_with_evidence.pk}/signoff/"

    def answer(evidence_id: int) -> tuple[int, str]:
        response = client_for(rita, raise_exceptions=False).post(
            url, {"decision": "approve", "evidence": evidence_id}, format="json")
        return response.status_code, response.content.decode().replace(str(evidence_id), "<id>")

    assert answer(other_evidence.pk) == answer(MISSING)
    assert answer(MISSING)[0] == 400


def test_naming_reviewers_does_not_reveal_who_is_a_reviewer(draft_case, alice, rita, make_user):
    plain = make_user("pat", "submitter")

    def answer(user_id: int) -> tuple[int, str]:
        response = client_for(alice).patch(f"/api/cases/{draft_case.pk}/", {"reviewers": [user_id]}, format="json")
        return response.status_code, response.content.decode().replace(str(user_id), "<id>")

    assert answer(rita.pk) == answer(plain.pk) == answer(MISSING)
    assert answer(rita.pk)[0] == 400

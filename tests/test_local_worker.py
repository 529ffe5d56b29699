"""The embedded default's background worker (workers/local.py): starting runs returns at once, the
runs proceed in the web process's worker thread, and every run ends in a final state."""

from __future__ import annotations

import time

import pytest
from django.test import Client
from django.urls import reverse

from governance import pipeline
from governance.models import AuditCase, ProbeRun
from tests.pipeline_fixtures import make_case, wait_for_state
from tests.review_fixtures import admit
from workers import local

pytestmark = pytest.mark.skipif(not pipeline.broker_is_eager(),
                                reason="the local worker serves the embedded default only")


@pytest.fixture
def local_worker():
    local.enable()
    yield local
    local.disable()
    assert local.wait_idle(120)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_starting_runs_in_the_browser_returns_at_once_and_the_runs_finish_in_the_background(
        tiny_clip_version, alice, ada, rita, rob, local_worker):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {"seconds": 3}}])
    admit(ada)
    client = Client()
    client.force_login(ada)
    started = time.perf_counter()
    response = client.post(reverse("admin:governance_auditcase_review_transition", args=[case.pk]), {"to": "running"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 302
    assert elapsed < 3, f"the request waited {elapsed:.1f} s for a 3 s probe"
    run = ProbeRun.objects.get(case=case)
    assert run.status in ProbeRun.ACTIVE
    # live progress: the status endpoint answers while the run is going
    status = client.get(reverse("admin:governance_auditcase_review_status", args=[case.pk])).json()
    assert status["active"] is True
    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY)
    run.refresh_from_db()
    assert run.status == ProbeRun.Status.SUCCEEDED and run.evidence.pk


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_job_that_crashes_leaves_no_run_active(tiny_clip_version, alice, ada, rita, rob, local_worker,
                                                 monkeypatch):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {}}])

    def broken(*args, **kwargs):
        raise RuntimeError("worker lost its GPU")

    from celery import canvas

    monkeypatch.setattr(canvas.Signature, "apply_async", broken)
    pipeline.start_case(case.pk, by=alice)
    assert local.wait_idle(60)
    run = ProbeRun.objects.get(case=case)
    assert run.status == ProbeRun.Status.FAILED and "worker lost its GPU" in run.error
    case.refresh_from_db()
    assert case.state == AuditCase.State.SUBMITTED  # no evidence: back to the provider, not "evidence ready"

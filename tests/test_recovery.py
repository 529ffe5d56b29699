"""Nothing stuck, nothing doubled: run leases, the sweeper, retries, idempotent report requests and
storage checks, through public interfaces. These run on the embedded default and on the real stack
(tasks in-process); the fault-injection versions with real processes are in test_reliability.py.

Actors: alice submits Acme's model; ada (admin) assigns rita and rob.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from governance import pipeline, workflow
from governance.models import AuditCase, AuditEvent, Evidence, ProbeRun, Report
from tests.actors import client_for
from tests.pipeline_fixtures import make_case

S = AuditCase.State
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lost_messages(monkeypatch):
    """Every dispatch is lost on the way to the broker (what a Redis without persistence does to
    queued messages when it restarts). Returns the run ids that were sent into the void."""
    lost: list[int] = []
    monkeypatch.setattr(pipeline, "dispatch", lambda case_id, run_ids, countdown=None: lost.extend(run_ids))
    return lost


@pytest.fixture
def fresh_media(settings, tmp_path):
    """A storage of this test's own (the session's media root holds earlier tests' files)."""
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def selftest_case(version, alice, ada, rita, rob, n: int = 2) -> AuditCase:
    return make_case(version, alice, ada, rita, rob,
                     [{"kind": "selftest", "params": {"seed": i}} for i in range(n)])


def later(seconds: float) -> dt.datetime:
    return timezone.now() + dt.timedelta(seconds=seconds)


def test_it_dispatches_lost_task_messages_again_once_past_the_deadline_and_only_once(
        tiny_clip_version, alice, ada, rita, rob, lost_messages, monkeypatch):
    case = selftest_case(tiny_clip_version, alice, ada, rita, rob)
    run_ids = pipeline.start_case(case.pk, by=alice)
    assert sorted(lost_messages) == sorted(run_ids)
    assert pipeline.recover_runs()["redispatched"] == []  # queued a moment ago: a worker may yet come

    with override_settings(LOUPE_RUN_REDISPATCH_AFTER=30):
        first = pipeline.recover_runs(now=later(31))
        second = pipeline.recover_runs(now=later(31))
    assert sorted(first["redispatched"]) == sorted(run_ids)
    assert second["redispatched"] == []  # idempotent: the first sweep moved dispatched_at on
    assert sorted(lost_messages) == sorted(run_ids * 2)
    assert all("dispatched again" in r.phase for r in ProbeRun.objects.filter(case=case))

    monkeypatch.undo()  # the broker is back: the next sweep's messages arrive (and run in-process)
    with override_settings(LOUPE_RUN_REDISPATCH_AFTER=30):
        pipeline.recover_runs(now=later(62))
    case.refresh_from_db()
    assert case.state == S.EVIDENCE_READY
    assert [r.status for r in ProbeRun.objects.filter(case=case)] == [ProbeRun.Status.SUCCEEDED] * 2
    assert Evidence.objects.filter(run__case=case).count() == 2
    assert pipeline.case_progress(case)["partial"] is False


def test_it_shows_a_run_whose_worker_is_gone_as_lost_and_runs_it_again_once(
        tiny_clip_version, alice, ada, rita, rob, lost_messages, monkeypatch):
    from workers import tasks

    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=1)
    [run_id] = pipeline.start_case(case.pk, by=alice)
    with override_settings(LOUPE_RUN_LEASE_SECONDS=5):
        claimed = tasks._claim(run_id, "delivery-1")  # a worker took it ... and died: no heartbeat follows
        assert claimed.status == ProbeRun.Status.RUNNING and claimed.lease_expires_at is not None
        assert pipeline.recover_runs()["requeued"] == []  # the lease is live
        done = pipeline.recover_runs(now=later(6))
        again = pipeline.recover_runs(now=later(6))
    assert done["requeued"] == [run_id] and again["requeued"] == []
    run = ProbeRun.objects.get(pk=run_id)
    assert run.status == ProbeRun.Status.QUEUED
    assert run.phase.startswith("worker lost (last heartbeat ") and ", retrying at " in run.phase
    assert AuditEvent.objects.filter(action="run.requeued", object_id=str(run_id)).count() == 1

    monkeypatch.undo()
    pipeline.dispatch(case.pk, [run_id])
    run.refresh_from_db()
    assert run.status == ProbeRun.Status.SUCCEEDED and run.attempts == 2
    assert Evidence.objects.filter(run=run).count() == 1
    case.refresh_from_db()
    assert case.state == S.EVIDENCE_READY


def test_a_second_delivery_never_runs_a_live_run_twice(tiny_clip_version, alice, ada, rita, rob, lost_messages):
    from workers import tasks

    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=1)
    [run_id] = pipeline.start_case(case.pk, by=alice)
    tasks._claim(run_id, "delivery-1")  # a live worker holds the lease

    result = tasks.run_probe.apply(args=[run_id]).get()  # the same task, delivered to a second worker

    assert result["skipped"] is True
    run = ProbeRun.objects.get(pk=run_id)
    assert run.status == ProbeRun.Status.RUNNING and run.attempts == 1
    assert not Evidence.objects.filter(run=run).exists()


def test_it_fails_a_run_that_lost_its_worker_too_often_and_it_can_be_rerun_from_the_api(
        tiny_clip_version, alice, ada, rita, rob, lost_messages, monkeypatch):
    from workers import tasks

    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=2)
    run_id, other_id = pipeline.start_case(case.pk, by=alice)
    with override_settings(LOUPE_RUN_LEASE_SECONDS=5, LOUPE_RUN_MAX_ATTEMPTS=2):
        for _ in range(2):
            tasks._claim(run_id, "doomed")
            pipeline.recover_runs(now=later(6))
    run = ProbeRun.objects.get(pk=run_id)
    assert run.status == ProbeRun.Status.FAILED
    assert run.error.startswith("worker lost 2 times") and "gave up after 2 attempts" in run.error

    monkeypatch.undo()
    # The other run's message was lost too; the sweeper sends it again and it succeeds, so the case
    # holds partial evidence (a case with no evidence at all goes back to submitted instead).
    assert pipeline.recover_runs(now=later(settings.LOUPE_RUN_REDISPATCH_AFTER + 1))["redispatched"] == [other_id]
    case.refresh_from_db()
    assert case.state == S.EVIDENCE_READY and pipeline.case_progress(case)["partial"] is True

    assert client_for(alice).post(f"/api/cases/{case.pk}/rerun/").status_code == 403  # admins re-run
    response = client_for(ada).post(f"/api/cases/{case.pk}/rerun/")
    assert response.status_code == 202, response.content
    case.refresh_from_db()
    assert case.state == S.EVIDENCE_READY  # the re-run ran in-process and succeeded
    assert pipeline.case_progress(case)["partial"] is False
    nothing_left = client_for(ada).post(f"/api/cases/{case.pk}/rerun/")
    assert nothing_left.status_code == 400 and "nothing to re-run" in nothing_left.json()["detail"]


def test_it_retries_transient_errors_over_the_window_then_fails_the_run_with_the_reason(
        tiny_clip_version, alice, ada, rita, rob, monkeypatch):
    from workers import runtime
    from workers.probes import suite

    calls = []

    def database_gone(*args, **kwargs):
        calls.append(1)
        raise OperationalError("terminating connection due to administrator command")

    monkeypatch.setattr(suite, "run", database_gone)
    waits: list[float] = []
    monkeypatch.setattr(runtime, "pause", waits.append)
    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=1)
    with override_settings(LOUPE_RUN_RETRY_WINDOW=20, LOUPE_RUN_RETRY_MAX_DELAY=8):
        [run_id] = pipeline.start_case(case.pk, by=alice)

    run = ProbeRun.objects.get(pk=run_id)
    assert waits == [1, 2, 4, 8]  # backoff 1 + 2 + 4 + 8 = 15 s fits the window, the next 8 s would not
    assert len(calls) == 5
    assert run.status == ProbeRun.Status.FAILED and run.attempts == 1
    assert run.error == "gave up after retrying for 20 s: OperationalError: terminating connection due to " \
                        "administrator command"
    case.refresh_from_db()
    assert case.state == S.SUBMITTED  # its only run failed: no evidence to review, so not evidence_ready
    assert AuditEvent.objects.get(action="case.no_evidence", case=case).data["failed"] == [
        {"run": run_id, "kind": "selftest"}]


def test_a_case_whose_every_planned_item_succeeded_is_not_partial(
        tiny_clip_version, alice, ada, rita, rob, lost_messages, monkeypatch):
    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=2)
    pipeline.start_case(case.pk, by=alice)  # the messages are lost ...
    workflow.withdraw(case, by=alice)  # ... so the owner takes the case back and resubmits it
    workflow.submit(case, by=alice)
    monkeypatch.undo()
    pipeline.start_case(case.pk, by=alice)

    case.refresh_from_db()
    assert case.state == S.EVIDENCE_READY
    counts = pipeline.case_progress(case)["counts"]
    assert counts[ProbeRun.Status.CANCELLED] == 2 and counts[ProbeRun.Status.SUCCEEDED] == 2
    assert pipeline.case_progress(case)["partial"] is False
    assert AuditEvent.objects.get(action="case.evidence_aggregated", case=case).data["partial"] is False


@pytest.mark.slow
def test_the_same_report_request_returns_the_same_version(case_with_evidence, rita):
    client = client_for(rita)
    url = f"/api/cases/{case_with_evidence.pk}/reports/"

    first = client.post(url, HTTP_IDEMPOTENCY_KEY="req-1")
    repeated = client.post(url, HTTP_IDEMPOTENCY_KEY="req-1")
    other = client.post(url, HTTP_IDEMPOTENCY_KEY="req-2")

    assert first.status_code == 201 and repeated.status_code == 200 and other.status_code == 201
    assert repeated.json()["id"] == first.json()["id"]
    assert [r.version for r in Report.objects.filter(case=case_with_evidence)] == [1, 2]
    assert client.post(url, HTTP_IDEMPOTENCY_KEY="x" * 201).status_code == 400


@pytest.mark.slow
def test_a_redelivered_report_task_returns_the_version_it_issued(case_with_evidence, rita):
    from workers.tasks import render_report

    first = render_report.apply(args=[case_with_evidence.pk, rita.pk], task_id="render-1").get()
    again = render_report.apply(args=[case_with_evidence.pk, rita.pk], task_id="render-1").get()

    assert again == first
    assert Report.objects.filter(case=case_with_evidence).count() == 1
    assert AuditEvent.objects.filter(action="report.issued", case=case_with_evidence).count() == 1


def test_check_storage_lists_orphans_and_missing_files(fresh_media, case_with_evidence, capsys, settings):
    from pathlib import Path

    from governance.models import EvidenceArtifact

    artifact = EvidenceArtifact.objects.get(evidence__run__case=case_with_evidence)
    assert artifact.file.name.endswith(f"/{artifact.sha256}.csv")  # content-addressed
    call_command("check_storage")
    assert "0 orphaned, 0 missing" in capsys.readouterr().out

    orphan = Path(settings.MEDIA_ROOT) / Path(artifact.file.name).parent / "left-by-a-rollback.png"
    orphan.write_bytes(b"x")
    call_command("check_storage", "--verify")
    out = capsys.readouterr().out
    assert f"orphan: {Path(artifact.file.name).parent.as_posix()}/left-by-a-rollback.png" in out
    assert "1 orphaned, 0 missing, 0 corrupt" in out

    Path(artifact.file.path).unlink()
    with pytest.raises(CommandError, match="1 missing"):
        call_command("check_storage")
    assert f"missing: {artifact.file.name} (evidence artifact #{artifact.pk})" in capsys.readouterr().err


def test_a_run_claimed_again_discards_files_its_rolled_back_attempt_left(
        fresh_media, tiny_clip_version, alice, ada, rita, rob, lost_messages, monkeypatch, settings):
    from pathlib import Path

    from governance import blobs

    case = selftest_case(tiny_clip_version, alice, ada, rita, rob, n=1)
    [run_id] = pipeline.start_case(case.pk, by=alice)
    leftover = Path(settings.MEDIA_ROOT) / blobs.run_directory(case.pk, run_id) / ("0" * 64 + ".json")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"{}")  # what an evidence transaction that rolled back leaves behind
    from workers import tasks

    with override_settings(LOUPE_RUN_LEASE_SECONDS=5):
        tasks._claim(run_id, "died")
        pipeline.recover_runs(now=later(6))
    monkeypatch.undo()
    pipeline.dispatch(case.pk, [run_id])

    assert ProbeRun.objects.get(pk=run_id).status == ProbeRun.Status.SUCCEEDED
    assert not leftover.exists()
    call_command("check_storage")  # every stored file belongs to a row, every row has its file


@pytest.mark.parametrize(("broker", "visibility", "hard", "refused"), [
    ("redis://127.0.0.1:6379/0", 2100, 2100, True),
    ("redis://127.0.0.1:6379/0", 60, 2100, True),
    ("redis://127.0.0.1:6379/0", 2700, 2100, False),
    ("amqp://guest:guest@127.0.0.1:5672//", 60, 2100, False),  # RabbitMQ has no visibility timeout
])
def test_it_refuses_a_visibility_timeout_at_or_below_the_hard_time_limit(broker, visibility, hard, refused):
    with override_settings(CELERY_BROKER_URL=broker, CELERY_TASK_TIME_LIMIT=hard,
                           CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": visibility}):
        ids = [message.id for message in run_checks()]
    assert ("loupe.E001" in ids) is refused

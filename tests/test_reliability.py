"""Nothing stuck, nothing doubled, on the real stack with faults injected through the harness
(tests/realstack.py): a worker SIGKILLed mid-probe, a Redis without persistence killed and
restarted mid-case, the database connections terminated in a loop for 45 s, a worker killed between
a task's commit and its acknowledgement, a task delivered twice while its run is live. Each test
ends with every run in a final state and counts the evidence, audit events and reports.

They need real processes (PostgreSQL, a broker, Celery workers), so they run in the real-stack rows
(``make test-real``, ``make test-real-rabbitmq``) and are deselected on the embedded default. The
in-process versions of the same rules are in test_recovery.py.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from governance import pipeline
from governance.models import AuditCase, AuditEvent, Evidence, ProbeRun, Report
from tests.pipeline_fixtures import make_case, wait_for_state
from tests.realstack import DatabaseOutage, RedisServer, database_url_for, use_broker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.realworker, pytest.mark.django_db(transaction=True)]

# Short enough for a test, and in the required order: soft limit < hard limit < visibility timeout.
# Leases lapse 6 s after the last heartbeat; beat sweeps every second; a queued run nobody claimed
# is dispatched again after 5 s.
FAST = {"LOUPE_TASK_SOFT_TIME_LIMIT": "20", "LOUPE_TASK_TIME_LIMIT": "25", "LOUPE_BROKER_VISIBILITY_TIMEOUT": "30",
        "LOUPE_BROKER_RESTORE_INTERVAL": "2", "LOUPE_RUN_LEASE_SECONDS": "6", "LOUPE_SWEEP_INTERVAL": "1",
        "LOUPE_RUN_REDISPATCH_AFTER": "5", "LOUPE_RUN_RETRY_MAX_DELAY": "4"}
FINAL = set(ProbeRun.FINISHED)


def runs_of(case: AuditCase) -> list[ProbeRun]:
    return list(ProbeRun.objects.filter(case=case).order_by("pk"))


def assert_settled(case: AuditCase, *, succeeded: int) -> None:
    """Every run final, one evidence item and one ``evidence.recorded`` event per succeeded run, and
    storage that matches the records (no orphaned copies, nothing missing)."""
    runs = runs_of(case)
    assert {r.status for r in runs} <= FINAL, [(r.pk, r.status, r.phase) for r in runs]
    assert sum(r.status == ProbeRun.Status.SUCCEEDED for r in runs) == succeeded, \
        [(r.pk, r.status, r.error) for r in runs]
    assert Evidence.objects.filter(run__case=case).count() == succeeded
    assert AuditEvent.objects.filter(action="evidence.recorded", case=case).count() == succeeded
    call_command("check_storage")  # raises on a missing file
    artifacts = sum(e.artifacts.count() for e in Evidence.objects.filter(run__case=case))
    stored = sum(1 for r in runs for _ in _files_of(r))
    assert stored == artifacts, "every evidence file on disk belongs to exactly one artifact row"


def _files_of(run: ProbeRun):
    from pathlib import Path

    from django.conf import settings

    from governance import blobs

    directory = Path(settings.MEDIA_ROOT) / blobs.run_directory(run.case_id, run.pk)
    return list(directory.iterdir()) if directory.is_dir() else []


def test_a_run_whose_worker_is_sigkilled_shows_worker_lost_and_completes_exactly_once(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    real_stack.stop_workers()  # only the workers of this test may take the task
    first = real_stack.start_worker(extra_env={**FAST, "LOUPE_BROKER_VISIBILITY_TIMEOUT": "600"})
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {"seconds": 4}}])

    pipeline.start_case(case.pk, by=alice)
    wait_until(lambda: runs_of(case)[0].status == ProbeRun.Status.RUNNING and runs_of(case)[0].progress > 0,
               timeout=60)
    first.kill()  # SIGKILL, the whole worker: nothing gets to acknowledge or clean up
    wait_until(lambda: runs_of(case)[0].lease_expires_at < timezone.now(), timeout=20, message="the lease to lapse")
    call_command("recover_runs")  # what beat or a starting worker does; here while no worker runs
    [run] = runs_of(case)
    assert run.status == ProbeRun.Status.QUEUED and run.progress == 0.0
    assert run.phase.startswith("worker lost (last heartbeat ") and ", retrying at " in run.phase

    real_stack.start_worker(extra_env=FAST, beat=True)
    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=120)
    [run] = runs_of(case)
    assert run.status == ProbeRun.Status.SUCCEEDED and run.attempts == 2
    assert AuditEvent.objects.filter(action="run.requeued", case=case).count() == 1
    assert_settled(case, succeeded=1)
    real_stack.stop_workers()


def test_runs_whose_messages_a_restarted_redis_lost_are_recovered_without_a_person(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    redis = RedisServer(appendonly=False).start()  # no persistence: a restart loses every queued message
    try:
        with use_broker(redis.url(0)):
            real_stack.stop_workers()
            real_stack.start_worker(extra_env={**FAST, "CELERY_BROKER_URL": redis.url(0)}, beat=True)
            plan = [{"kind": "selftest", "params": {"seconds": 1.5, "seed": i}} for i in range(3)]
            case = make_case(tiny_clip_version, alice, ada, rita, rob, plan)

            run_ids = pipeline.start_case(case.pk, by=alice)
            wait_until(lambda: ProbeRun.objects.filter(case=case, status=ProbeRun.Status.RUNNING).exists(), timeout=60)
            redis.kill()
            redis.start()  # same port, empty

            case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=180)
            assert [r.pk for r in runs_of(case)] == sorted(run_ids)
            assert_settled(case, succeeded=3)
            assert pipeline.case_progress(case)["partial"] is False
            real_stack.stop_workers()
    finally:
        redis.cleanup()


def test_a_45_second_database_outage_leaves_every_run_final_and_nothing_doubled(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    real_stack.stop_workers()
    real_stack.start_worker(extra_env={**FAST, "LOUPE_RUN_LEASE_SECONDS": "60", "LOUPE_RUN_RETRY_WINDOW": "120"},
                            beat=True)
    plan = [{"kind": "selftest", "params": {"seconds": 2, "seed": i}} for i in range(2)]
    case = make_case(tiny_clip_version, alice, ada, rita, rob, plan)
    database_url = database_url_for(connection.settings_dict)

    pipeline.start_case(case.pk, by=alice)
    wait_until(lambda: ProbeRun.objects.filter(case=case, status=ProbeRun.Status.RUNNING).exists(), timeout=60)
    with DatabaseOutage(database_url, seconds=45, interval=0.25) as outage:
        pass
    connection.close()  # ours was terminated too
    assert outage.terminated > 0

    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=240)
    assert_settled(case, succeeded=2)
    real_stack.stop_workers()


def test_a_worker_killed_between_commit_and_acknowledgement_does_nothing_twice(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    from workers import tasks

    real_stack.stop_workers()
    worker = real_stack.start_worker(extra_env=FAST, kill_after={"workers.tasks.run_probe",
                                                                 "workers.tasks.render_report"})
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {}}])

    pipeline.start_case(case.pk, by=alice)
    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=120)
    requested = tasks.render_report.apply_async(args=[case.pk, rita.pk])
    report_id = requested.get(timeout=180)  # the answer of the redelivery: the first commit's version

    markers = real_stack.log_dir / worker.log_path.stem.replace("worker", "kills")
    # Celery stores a task's result before its postrun signal, where the kill happens: the answer
    # can arrive a moment before the kill's marker does.
    wait_until(lambda: markers.is_dir() and len(list(markers.iterdir())) >= 2, timeout=30, message="both kills")
    kills = sorted(p.name for p in markers.iterdir())
    assert kills == ["workers.tasks.render_report", "workers.tasks.run_probe"]  # both were killed once
    assert [r.pk for r in Report.objects.filter(case=case)] == [report_id]
    assert AuditEvent.objects.filter(action="report.issued", case=case).count() == 1
    [run] = runs_of(case)
    assert run.attempts == 1
    assert_settled(case, succeeded=1)
    real_stack.stop_workers()


def test_a_second_delivery_of_a_live_run_is_refused_and_unsafe_settings_stop_a_worker(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    from django.conf import settings

    from workers import tasks

    real_stack.stop_workers()
    if settings.CELERY_BROKER_URL.startswith("redis"):  # RabbitMQ has no visibility timeout to refuse
        refused = real_stack.start_worker(
            extra_env={"LOUPE_TASK_TIME_LIMIT": "60", "LOUPE_BROKER_VISIBILITY_TIMEOUT": "60"}, wait=False)
        wait_until(lambda: not refused.alive(), timeout=60, message="the worker to refuse its settings")
        assert refused.process.returncode != 0 and "loupe.E001" in refused.log_tail()

    real_stack.start_worker(extra_env=FAST, concurrency=2)
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {"seconds": 5}}])
    [run_id] = pipeline.start_case(case.pk, by=alice)
    wait_until(lambda: runs_of(case)[0].status == ProbeRun.Status.RUNNING, timeout=60)
    duplicate = tasks.run_probe.apply_async(args=[run_id])  # e.g. a redelivery after a visibility timeout

    assert duplicate.get(timeout=60)["skipped"] is True
    assert runs_of(case)[0].status == ProbeRun.Status.RUNNING  # the first delivery still works on it
    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=120)
    assert runs_of(case)[0].attempts == 1
    assert_settled(case, succeeded=1)
    real_stack.stop_workers()

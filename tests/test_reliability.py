"""Reliability of the pipeline on the real stack: a worker SIGKILLed mid-probe, the broker restarted
mid-case. These need real processes (PostgreSQL, Redis, Celery workers), so they run in the real-stack
row (``make test-real``, part of ``.ci/run``) and are deselected on the embedded default, where there
is no worker process to kill. The other reliability cases (a probe that raises, the broker down at
submission, redelivery) are in ``test_pipeline.py`` and run in both rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from governance import pipeline
from governance.models import AuditCase, AuditEvent, Evidence, ProbeRun
from tests.realstack import RedisServer, wait_until
from tests.pipeline_fixtures import make_case, tiny_clip_version, wait_for_state  # noqa: F401 (fixture)

pytestmark = [pytest.mark.realworker, pytest.mark.django_db(transaction=True)]

# Short enough for a test, and in the required order: soft limit < hard limit < visibility timeout.
FAST_REDELIVERY = {"LOUPE_TASK_SOFT_TIME_LIMIT": "8", "LOUPE_TASK_TIME_LIMIT": "9",
                   "LOUPE_BROKER_VISIBILITY_TIMEOUT": "10", "LOUPE_BROKER_RESTORE_INTERVAL": "2"}


@contextlib.contextmanager
def broker(url: str) -> Iterator[None]:
    """Point this test process's Celery app (publisher and result backend) at another Redis."""
    from workers.celery import app

    def reset() -> None:
        app.pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
        app._local.__dict__.pop("backend", None)

    saved_env = os.environ.get("CELERY_BROKER_URL")
    saved = app.conf.broker_url, app.conf.result_backend
    os.environ["CELERY_BROKER_URL"] = url  # Celery lets the environment win over its configuration
    app.conf.broker_url = app.conf.result_backend = url
    reset()
    try:
        yield
    finally:
        reset()
        app.conf.broker_url, app.conf.result_backend = saved
        if saved_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved_env
        reset()


def run_of(case: AuditCase) -> ProbeRun:
    return ProbeRun.objects.filter(case=case).get()


def test_it_completes_a_run_exactly_once_after_its_worker_is_sigkilled(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    real_stack.stop_workers()  # only the workers of this test may take the task
    first = real_stack.start_worker(extra_env=FAST_REDELIVERY)
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {"seconds": 4}}])

    pipeline.start_case(case.pk, by=alice)
    wait_until(lambda: run_of(case).status == ProbeRun.Status.RUNNING and run_of(case).progress > 0, timeout=60)
    first.kill()  # SIGKILL, the whole worker: nothing gets to acknowledge or clean up
    assert run_of(case).status == ProbeRun.Status.RUNNING
    real_stack.start_worker(extra_env=FAST_REDELIVERY)

    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=120)
    run = run_of(case)
    assert run.status == ProbeRun.Status.SUCCEEDED
    assert run.attempts == 2
    assert Evidence.objects.filter(run__case=case).count() == 1
    assert AuditEvent.objects.filter(action="evidence.recorded", case=case).count() == 1
    real_stack.stop_workers()


def test_it_loses_and_duplicates_no_run_when_redis_restarts_mid_case(
        real_stack, tiny_clip_version, alice, ada, rita, rob):
    redis = RedisServer(appendonly=True).start()  # production Redis keeps an append-only file, so do we
    try:
        with broker(redis.url(0)):
            real_stack.stop_workers()
            real_stack.start_worker(extra_env={"CELERY_BROKER_URL": redis.url(0)})
            plan = [{"kind": "selftest", "params": {"seconds": 1.5, "seed": i}} for i in range(3)]
            case = make_case(tiny_clip_version, alice, ada, rita, rob, plan)

            run_ids = pipeline.start_case(case.pk, by=alice)
            wait_until(lambda: ProbeRun.objects.filter(case=case, status=ProbeRun.Status.RUNNING).exists(),
                       timeout=60)
            redis.restart()

            case = wait_for_state(case, AuditCase.State.EVIDENCE_READY, timeout=180)
            assert set(ProbeRun.objects.filter(case=case).values_list("pk", flat=True)) == set(run_ids)
            assert all(r.status == ProbeRun.Status.SUCCEEDED for r in ProbeRun.objects.filter(case=case))
            assert Evidence.objects.filter(run__case=case).count() == 3
            assert AuditEvent.objects.filter(action="evidence.recorded", case=case).count() == 3
            real_stack.stop_workers()
    finally:
        redis.cleanup()

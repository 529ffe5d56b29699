"""The Celery settings that make delivery at-least-once and safe, and the queue routing."""

from __future__ import annotations

import json

import pytest
from django.conf import settings

from workers import tasks
from workers.celery import app


def test_it_delivers_tasks_at_least_once_and_one_at_a_time():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    # Redis re-delivers an unacknowledged task after the visibility timeout: it must outlast a task.
    assert conf.task_soft_time_limit < conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert conf.task_time_limit == settings.LOUPE_TASK_TIME_LIMIT


def test_it_sweeps_for_abandoned_tasks_on_every_interval():
    # kombu only scans on every `unacked_restore_throttle`-th sweep (default 10): a dead worker's
    # task would then wait ~10 sweeps past its visibility timeout before another worker got it.
    options = app.conf.broker_transport_options
    assert options["unacked_restore_throttle"] == 1
    assert 0 < options["unacked_restore_interval"] <= 60


def test_it_speaks_json_only():
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"


@pytest.mark.parametrize(("task", "queue"), [
    ("workers.tasks.run_probe", "gpu"),
    ("workers.tasks.probe_grounding", "gpu"),
    ("workers.tasks.compute_manifest", "cpu"),
    ("workers.tasks.aggregate_case", "cpu"),
])
def test_it_routes_probes_to_gpu_workers_and_the_rest_to_cpu(task, queue):
    assert app.amqp.router.route({}, task)["queue"].name == queue


@pytest.mark.django_db
def test_it_sends_ids_only_after_the_transaction_commits(monkeypatch, django_capture_on_commit_callbacks):
    sent = []
    monkeypatch.setattr(tasks.compute_manifest, "apply_async", lambda args, kwargs: sent.append((args, kwargs)))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        tasks.enqueue_on_commit(tasks.compute_manifest, 42)
        assert sent == []  # nothing leaves before the commit
    for callback in callbacks:
        callback()
    assert sent == [((42,), {})]
    json.dumps(sent)  # ids, not objects

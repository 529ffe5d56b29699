"""The real-stack harness itself, which the reliability tests build on: a killed worker is replaced,
and a private Redis keeps queued messages across a restart (append-only file)."""

from __future__ import annotations

import pytest
import redis

from tests.realstack import RedisServer, use_broker

# Real processes only: deselected on the embedded default (see tests/realstack.py).
pytestmark = [pytest.mark.slow, pytest.mark.realworker]


@pytest.mark.django_db(transaction=True)
def test_it_replaces_a_worker_killed_with_sigkill(real_stack):
    worker = real_stack.ensure_worker()
    assert worker.ping() and worker.pool_children()
    worker.kill()
    assert not worker.alive()
    replacement = real_stack.ensure_worker()
    assert replacement is not worker
    assert replacement.ping()


def test_it_keeps_queued_messages_when_a_private_redis_restarts(real_stack):
    server = RedisServer(appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url(0))
        client.lpush("cpu", b"message-1")
        server.restart()
        assert redis.Redis.from_url(server.url(0)).lrange("cpu", 0, -1) == [b"message-1"]
    finally:
        server.cleanup()


@pytest.mark.django_db(transaction=True)
def test_switching_to_a_private_broker_and_back_leaves_the_next_worker_test_working(real_stack):
    """Ordering bug: a test that used a private Redis left a closed connection pool registered for
    the session broker's URL, and the next worker test failed with "Acquire on closed pool"."""
    from workers.celery import app

    worker = real_stack.ensure_worker()
    assert worker.ping()  # the session broker's pools are in use
    server = RedisServer(appendonly=False).start()
    try:
        with use_broker(server.url(0)):
            app.control.ping(timeout=0.2)  # publish through the private broker
    finally:
        server.cleanup()
    assert worker.ping()  # back on the session broker: its pools work again
    app.send_task("workers.tasks.recover_runs", queue="cpu").forget()

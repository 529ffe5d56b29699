"""The real-stack harness itself, which the reliability tests build on: a killed worker is replaced,
and a private Redis keeps queued messages across a restart (append-only file)."""

from __future__ import annotations

import pytest
import redis

from tests.realstack import RedisServer

# Real processes only: deselected on the embedded default (see tests/realstack.py).
pytestmark = pytest.mark.realworker


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

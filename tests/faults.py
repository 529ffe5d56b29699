"""Fault injection for real-stack tests, loaded only into test workers (``celery worker --include
tests.faults``, see tests/realstack.py ``kill_after``): the pool process executing a task named in
``LOUPE_TEST_KILL_AFTER`` SIGKILLs itself once, after the task returned (its transaction committed)
and before the worker acknowledged the message. The broker then delivers the task again, which is
the window where a non-idempotent task would do its work twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from celery.signals import task_postrun

KILL_AFTER = frozenset(filter(None, os.environ.get("LOUPE_TEST_KILL_AFTER", "").split(",")))
MARKERS = Path(os.environ.get("LOUPE_TEST_KILL_MARKERS", "/nonexistent"))


@task_postrun.connect(dispatch_uid="loupe-test-kill-after-commit")
def kill_after_commit(sender=None, task_id=None, state=None, **kwargs) -> None:
    if sender is None or sender.name not in KILL_AFTER or state != "SUCCESS":
        return
    MARKERS.mkdir(parents=True, exist_ok=True)
    marker = MARKERS / sender.name
    try:
        marker.touch(exist_ok=False)  # once per task name: the redelivery must be allowed to finish
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)

"""The embedded default's background worker: probe runs proceed in a thread of the web process.

Without ``CELERY_BROKER_URL`` tasks execute in-process (Celery's eager mode). Executed inside the
request that started them, a case's runs would hold the browser for the whole audit; so the web
process (``governance.wsgi``, which ``runserver`` and ``make serve`` load) calls :func:`enable`, and
:func:`governance.pipeline.dispatch` hands its work to :func:`offload`, which queues it for one
daemon thread and returns at once. Progress reaches the browser through the database, exactly as
with a Celery worker. Commands (``audit_demo``, ``run_audit --wait``) and tests that do not enable it
keep executing in the calling thread.

One thread, one job at a time: the embedded default is for one machine, and probes already use
every core. A job that raises leaves no run behind in a non-final state: its still-active runs are
marked failed with the reason and the case is aggregated (so it ends with partial evidence, or back
in ``submitted`` when nothing came back).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_jobs: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
_lock = threading.Lock()
_thread: threading.Thread | None = None
_enabled = False


def enable() -> None:
    """Start taking jobs in the background (only when tasks are in-process: no broker)."""
    global _enabled
    from workers.celery import app

    if not app.conf.task_always_eager:
        return
    _enabled = True


def disable() -> None:
    """Stop offloading (tests); queued jobs still finish."""
    global _enabled
    _enabled = False


def is_worker_thread() -> bool:
    return threading.current_thread() is _thread


def offload(fn: Callable[..., Any], *args: Any) -> bool:
    """Queue ``fn(*args)`` for the background thread and return True; False (the caller runs it
    itself) when the local worker is not enabled or this already is the worker thread."""
    if not _enabled or is_worker_thread():
        return False
    _ensure_thread()
    _jobs.put((fn, args))
    return True


def wait_idle(timeout: float = 60.0) -> bool:
    """Block until every queued job has finished (tests and shutdown). True if idle in time."""
    done = threading.Event()

    def wait() -> None:
        _jobs.join()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done.wait(timeout)


def _ensure_thread() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="loupe-local-worker", daemon=True)
            _thread.start()


def _loop() -> None:
    from django.db import close_old_connections

    while True:
        job = _jobs.get()
        try:
            if job is None:
                return
            fn, args = job
            close_old_connections()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a job's failure must end its runs, not the thread
                logger.exception("local worker job %s%r failed", getattr(fn, "__name__", fn), args)
                _fail_leftovers(args, exc)
            else:
                # In-process tasks swallow some errors into their results; whatever the reason, a run
                # this job was given must not stay active once the job is over.
                _fail_leftovers(args, RuntimeError("the run ended without recording a result"))
            finally:
                close_old_connections()
        finally:
            _jobs.task_done()


def _fail_leftovers(args: tuple[Any, ...], exc: Exception) -> None:
    """Runs a failed dispatch left queued or running end as failed, and their case is aggregated."""
    if len(args) < 2 or not isinstance(args[1], list):
        return
    case_id, run_ids = args[0], args[1]
    from django.utils import timezone

    from governance.models import ProbeRun
    from workers.celery import app

    reason = f"the local worker failed: {type(exc).__name__}: {exc}"[:2000]
    ProbeRun.objects.filter(pk__in=run_ids, status__in=ProbeRun.ACTIVE).update(
        status=ProbeRun.Status.FAILED, error=reason, phase="failed", finished_at=timezone.now())
    try:
        # By name, as the pipeline sends it: this module stays below the pipeline, which imports it.
        app.loader.import_default_modules()
        app.signature("workers.tasks.aggregate_case", args=(case_id,), immutable=True).apply()
    except Exception:  # noqa: BLE001 - logged; the runs themselves are final already
        logger.exception("aggregating case %s after a failed local job", case_id)

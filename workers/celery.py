"""The Celery app, configured from Django settings (``CELERY_*``).

Everything that matters for reliability lives in ``governance/settings/__init__.py`` next to the
other environment-driven settings (acks late, reject on worker lost, prefetch 1, JSON only, time
limits, broker visibility timeout). This module only builds the app and routes tasks to queues:

- ``gpu``: probe tasks (anything whose name starts with ``workers.tasks.probe`` or
  ``workers.tasks.run_probe``), which need the accelerator;
- ``reports``: PDF report rendering;
- ``cpu``: everything else (manifests, aggregation).

Start a worker that serves both queues with::

    celery -A workers.celery worker -Q gpu,cpu,reports -c 1 --pool=prefork

(prefork: probe runs in one process share its cached models and take turns with them, so a thread
pool would run them one at a time anyway; ``workers/runtime.py`` says why) and one scheduler for
the whole deployment (or ``-B`` on exactly one worker)::

    celery -A workers.celery beat

Beat sends the sweeper (``workers.tasks.recover_runs``) every ``LOUPE_SWEEP_INTERVAL`` seconds; every
worker also sends one when it starts, so work stranded by a crash or a broker restart is picked up
as soon as a worker is back, even without beat. Sweeps are idempotent, so extra ones are harmless.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
REPORTS_QUEUE = "reports"
# Task-name prefixes that go to GPU workers. A probe task is named after what it runs, so the
# convention lives in the name instead of a hand-kept list that drifts.
GPU_TASK_PREFIXES = ("workers.tasks.probe", "workers.tasks.run_probe")


def route_task(name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None,
               **kw: Any) -> dict[str, str]:
    """Celery router (referenced from ``CELERY_TASK_ROUTES``): probe tasks to ``gpu``, others to ``cpu``."""
    if name.startswith(GPU_TASK_PREFIXES):
        return {"queue": GPU_QUEUE}
    if name.startswith("workers.tasks.render_report"):
        # PDF rendering is CPU-bound and bursty; its own queue keeps it from delaying manifests.
        return {"queue": REPORTS_QUEUE}
    return {"queue": CPU_QUEUE}


app = Celery("loupe")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"], related_name="tasks")


def _beat_schedule() -> dict[str, dict[str, Any]]:
    from django.conf import settings

    return {"loupe-recover-runs": {"task": "workers.tasks.recover_runs",
                                   "schedule": float(settings.LOUPE_SWEEP_INTERVAL),
                                   "options": {"expires": float(settings.LOUPE_SWEEP_INTERVAL)}}}


app.conf.beat_schedule = _beat_schedule()


@worker_ready.connect(dispatch_uid="loupe-sweep-on-worker-start")
def sweep_on_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """A worker that starts (perhaps replacing one that crashed) asks for a sweep at once."""
    try:
        app.send_task("workers.tasks.recover_runs", queue=CPU_QUEUE)
    except Exception:  # noqa: BLE001 - the broker may be flaky at start; beat sweeps again later
        import logging

        logging.getLogger(__name__).warning("could not request a sweep at worker start", exc_info=True)


@worker_init.connect(dispatch_uid="loupe-refuse-unsafe-settings")
def refuse_unsafe_settings(sender: Any = None, **kwargs: Any) -> None:
    """A worker does not start on settings that would run a probe twice (governance/checks.py)."""
    import logging

    from django.core.checks import run_checks

    serious = [message for message in run_checks() if message.is_serious() and str(message.id).startswith("loupe.")]
    if serious:
        text = "; ".join(f"{m.id}: {m.msg} (hint: {m.hint})" for m in serious)
        logging.getLogger(__name__).critical("refusing to start: %s", text)
        # SystemExit, not an exception: Celery logs and ignores exceptions raised by signal handlers.
        raise SystemExit(f"refusing to start: {text}")

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
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
REPORTS_QUEUE = "reports"
# Task-name prefixes that go to GPU workers. A probe task is named after what it runs, so the
# convention lives in the name instead of a hand-kept list that drifts.
GPU_TASK_PREFIXES = ("workers.tasks.probe", "workers.tasks.run_probe")


def route_task(name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **kw: Any) -> dict[str, str]:
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

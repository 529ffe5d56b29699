"""Celery tasks: the only bridge between the database and the work (manifests, probes, reports).

Conventions (pretix style), which every task here follows:

- tasks receive ids, never model instances, and load fresh rows themselves;
- callers enqueue with :func:`enqueue_on_commit`, so a task never runs before the rows it needs are
  committed (and never runs at all if the transaction rolls back);
- tasks are idempotent: ``task_acks_late`` + ``task_reject_on_worker_lost`` mean a task whose worker
  died is delivered again, so running it twice must leave the same state as running it once;
- every change a task makes is written with its audit event in one transaction.

Queues: probe tasks (named ``workers.tasks.probe*`` / ``workers.tasks.run_probe*``) go to ``gpu``,
everything else to ``cpu`` (see ``workers.celery.route_task``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import OperationalError, transaction

logger = logging.getLogger(__name__)


def enqueue_on_commit(task: Any, *args: Any, **kwargs: Any) -> None:
    """Send ``task`` with JSON arguments (ids) once the current transaction commits.

    Outside a transaction it is sent immediately. Without ``CELERY_BROKER_URL`` the task runs
    in-process at that moment (eager mode)."""
    transaction.on_commit(lambda: task.apply_async(args=args, kwargs=kwargs))


@shared_task(name="workers.tasks.compute_manifest", autoretry_for=(OperationalError,), retry_backoff=True,
             max_retries=5)
def compute_manifest(model_version_id: int) -> dict[str, Any]:
    """Hash every file of a model version (SHA-256 manifest), detect its architecture family from
    ``config.json`` and record both, with an audit event, on the version.

    Idempotent: when the stored manifest and family already match, nothing is written (a redelivered
    task adds no second audit event). Returns what it found, for logs and tests.
    """
    from governance import artifacts, audit_log
    from governance.models import ModelVersion, manifest_hash

    version = ModelVersion.objects.select_related("ai_model").get(pk=model_version_id)
    directory = artifacts.model_directory(version)
    # Hash outside the transaction: multi-GB weights take a while, and nobody should wait on a lock.
    manifest = artifacts.directory_manifest(directory)
    family, detail = artifacts.detect_architecture(artifacts.read_config(directory))
    fingerprint = manifest_hash(manifest)
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().select_related("ai_model").get(pk=model_version_id)
        changed = (version.manifest_hash != fingerprint or version.architecture_family != family
                   or version.architecture_detail != detail)
        if changed:
            previous = version.manifest_hash
            version.set_manifest(manifest)
            version.architecture_family = family
            version.architecture_detail = detail
            version.save(update_fields=["manifest", "manifest_hash", "architecture_family", "architecture_detail",
                                        "updated_at"])
            audit_log.record(None, "model_version.manifest_computed", version, {
                "manifest_hash": fingerprint,
                "previous_manifest_hash": previous,
                "files": len(manifest),
                "architecture_family": family,
                "architecture_detail": detail,
            })
    logger.info("manifest of model version %s: %s (%s files, %s)", model_version_id, fingerprint, len(manifest), family)
    return {"model_version_id": model_version_id, "manifest_hash": fingerprint, "files": len(manifest),
            "architecture_family": family, "changed": changed}

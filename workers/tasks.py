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


# --------------------------------------------------------------------------------------------------
# The audit pipeline (governance/pipeline.py dispatches these)
# --------------------------------------------------------------------------------------------------

# Errors worth another try: the database or broker blinked. Everything else a probe raises is
# permanent (bad input, or a bug that a retry will not fix) and fails the run with its reason.
TRANSIENT_ERRORS = (OperationalError, ConnectionError, TimeoutError)


def _provenance(version, device: str, params: dict[str, Any]) -> dict[str, Any]:
    import platform

    import numpy
    import torch
    import transformers

    from workers import runtime

    return {
        "device": device if device == "cpu" else f"{device}:{torch.cuda.get_device_name(0)}",
        "model_manifest_hash": version.manifest_hash,
        "code_version": runtime.code_version(),
        "seed": int(params.get("seed", 0)) if str(params.get("seed", 0)).isdigit() else 0,
        "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "numpy": numpy.__version__},
    }


def _claim(run_id: int, task_id: str):
    """Mark the run running (once per delivery), or return ``None`` if there is nothing to do: the run
    finished already (a redelivered task) or was cancelled with its case."""
    from django.utils import timezone

    from governance.models import AuditCase, ProbeRun

    with transaction.atomic():
        run = ProbeRun.objects.select_for_update().select_related("case__model_version").get(pk=run_id)
        if run.is_finished:
            return None
        if run.case.state != AuditCase.State.RUNNING:
            run.status = ProbeRun.Status.CANCELLED
            run.finished_at = timezone.now()
            run.phase = f"cancelled: the case is '{run.case.state}'"
            run.save(update_fields=["status", "finished_at", "phase"])
            return None
        # A run found 'running' was claimed by a worker that died; start it again from scratch (its
        # evidence is only ever written at the end, in one transaction, so nothing partial remains).
        run.status = ProbeRun.Status.RUNNING
        run.attempts += 1
        run.started_at = timezone.now()
        run.task_id = task_id or run.task_id
        run.progress = 0.0
        run.phase = "starting" if run.attempts == 1 else f"starting again (attempt {run.attempts})"
        run.save(update_fields=["status", "attempts", "started_at", "task_id", "progress", "phase"])
        return run


def _fail(run_id: int, reason: str) -> None:
    from django.utils import timezone

    from governance import audit_log
    from governance.models import ProbeRun

    with transaction.atomic():
        run = ProbeRun.objects.select_for_update().get(pk=run_id)
        if run.is_finished:
            return
        run.status = ProbeRun.Status.FAILED
        run.error = reason[:5000]
        run.finished_at = timezone.now()
        run.phase = "failed"
        run.save(update_fields=["status", "error", "finished_at", "phase"])
        audit_log.record(None, "run.failed", run, {"kind": run.kind, "error": run.error[:500]})


@shared_task(name="workers.tasks.run_probe", bind=True, autoretry_for=TRANSIENT_ERRORS, retry_backoff=True,
             retry_backoff_max=120, max_retries=4)
def run_probe(self, run_id: int) -> dict[str, Any]:
    """Run one probe of a case and store its evidence. Idempotent under redelivery.

    Permanent errors (bad input, a probe that raises) mark the run failed with the reason and return
    normally, so the rest of the case's runs and its aggregation go on.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    from governance import artifacts, evidence, pipeline
    from governance.models import ProbeRun
    from workers import runtime
    from workers.probes import allocator, suite
    from workers.probes.errors import ProbeInputError

    # Whichever process runs the probe (a worker's pool child, or the web or demo process itself on
    # the embedded default) keeps freed tensor memory from now on; allocator.py says why.
    allocator.tune_malloc()
    run = _claim(run_id, self.request.id or "")
    if run is None:
        status = ProbeRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        _request_aggregation(run_id)
        return {"run": run_id, "status": status, "skipped": True}
    version = run.case.model_version
    try:
        model_dir = str(artifacts.model_directory(version))
        dataset_dir = pipeline.resolve_dataset(run.dataset)
        device = runtime.select_device()
        params = pipeline.resolve_params(run.params)  # confined again: settings may have changed since
        result = suite.run(run.kind, model_dir, dataset_dir, params, device=device,
                           progress=pipeline.RunProgress(run_id),
                           loader=lambda path, dev: runtime.model_cache.get(
                               version.manifest_hash or path, dev, lambda: suite.load_adapter_uncached(path, dev)))
        evidence.record_result(run_id, result, _provenance(version, device, run.params))
    except evidence.AlreadyRecorded:
        pass
    except TRANSIENT_ERRORS:
        raise  # autoretry with backoff
    except SoftTimeLimitExceeded:
        _fail(run_id, f"exceeded the soft time limit of {self.soft_time_limit or 'the configured'} seconds")
    except (ProbeInputError, artifacts.ArtifactUnavailable, pipeline.PipelineError) as exc:
        _fail(run_id, str(exc))
    except Exception as exc:  # a probe bug: fail this run with its reason, keep the others going
        logger.exception("probe run %s (%s) raised", run_id, run.kind)
        _fail(run_id, f"{type(exc).__name__}: {exc}")
    _request_aggregation(run_id)
    status = ProbeRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
    return {"run": run_id, "status": status}


def _request_aggregation(run_id: int) -> None:
    """After a run finishes, aggregate its case if it was the last one (see governance/pipeline.py for
    why this complements the chord)."""
    from governance import pipeline
    from governance.models import ProbeRun

    case_id = ProbeRun.objects.filter(pk=run_id).values_list("case_id", flat=True).first()
    if case_id is not None:
        pipeline.aggregate_case(case_id)


@shared_task(name="workers.tasks.aggregate_case", autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, max_retries=5)
def aggregate_case(case_id: int) -> str:
    """The chord's closing step: ``running -> evidence_ready`` once every run finished."""
    from governance import pipeline

    return pipeline.aggregate_case(case_id)


@shared_task(name="workers.tasks.render_report", autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, max_retries=3)
def render_report(case_id: int, author_id: int) -> int:
    """Issue the next report version of a case (queue ``reports``); returns the report's id.

    Not idempotent by nature (each call issues a version), so it is only enqueued by explicit requests.
    """
    from django.contrib.auth import get_user_model

    from governance.models import AuditCase
    from governance.reports import generate_report

    case = AuditCase.objects.get(pk=case_id)
    author = get_user_model().objects.get(pk=author_id)
    return generate_report(case, author=author).pk

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
from django.db import InterfaceError, OperationalError, transaction

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
        version = (ModelVersion.objects.select_for_update(of=("self",), no_key=True)
                   .select_related("ai_model").get(pk=model_version_id))
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
# (InterfaceError: a connection the server closed under us, e.g. pg_terminate_backend.)
TRANSIENT_ERRORS = (OperationalError, InterfaceError, ConnectionError, TimeoutError)


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


def _claim(run_id: int, task_id: str, lease: str | None = None):
    """Take the run's lease for this delivery and mark it running, or return ``None`` when there is
    nothing to do: the run finished already (a redelivered task), was cancelled with its case, or is
    held by another delivery whose lease is still live (its worker heartbeats: it is not abandoned,
    and running it here too would run one probe twice). ``lease`` is the token a retry of this same
    delivery carries, which may take its own lease back."""
    import uuid

    from django.utils import timezone

    from governance.models import AuditCase, ProbeRun
    from workers import runtime

    with transaction.atomic():
        # Only the run row is locked (workflow.LOCK_ORDER: a run after its case; the case is read).
        run = ProbeRun.objects.select_for_update(of=("self",), no_key=True).filter(pk=run_id).first()
        if run is None or run.is_finished:  # (a message outliving its row, e.g. a restored database)
            return None
        now = timezone.now()
        case_state = AuditCase.objects.filter(pk=run.case_id).values_list("state", flat=True).get()
        if case_state != AuditCase.State.RUNNING:
            run.status = ProbeRun.Status.CANCELLED
            run.finished_at = now
            run.phase = f"cancelled: the case is '{case_state}'"
            run.save(update_fields=["status", "finished_at", "phase"])
            return None
        own_retry = bool(lease) and lease == run.lease_token
        if (not own_retry and run.status == ProbeRun.Status.RUNNING and run.lease_expires_at is not None
                and run.lease_expires_at > now):
            logger.info("run %s is held by a live lease until %s; delivery %s skips it", run_id,
                        run.lease_expires_at.isoformat(), task_id)
            return None
        # A run found 'running' with a lapsed lease lost its worker; it starts again from scratch
        # (evidence is only ever written at the end, in one transaction, so nothing partial remains).
        if not own_retry:
            run.attempts += 1
            run.lease_token = uuid.uuid4().hex
        run.status = ProbeRun.Status.RUNNING
        run.started_at = now
        run.lease_expires_at = now + runtime.lease_duration()
        run.heartbeat_at = now
        run.task_id = task_id or run.task_id
        run.progress = 0.0
        run.phase = "starting" if run.attempts == 1 else f"starting again (attempt {run.attempts})"
        run.save(update_fields=["status", "attempts", "lease_token", "started_at", "lease_expires_at",
                                "heartbeat_at", "task_id", "progress", "phase"])
        return run


def _fail(run_id: int, reason: str, lease: str | None = None) -> bool:
    """Mark the run failed with ``reason``, unless it finished or another delivery holds it: ``lease``
    no longer its token, or (without one: this delivery never claimed it) a live lease on it."""
    from django.utils import timezone

    from governance import audit_log
    from governance.models import ProbeRun

    with transaction.atomic():
        run = ProbeRun.objects.select_for_update(of=("self",), no_key=True).get(pk=run_id)
        if run.is_finished or (lease is not None and run.lease_token != lease):
            return False
        if lease is None and run.status == ProbeRun.Status.RUNNING and run.lease_expires_at is not None \
                and run.lease_expires_at > timezone.now():
            return False
        run.status = ProbeRun.Status.FAILED
        run.error = reason[:5000]
        run.finished_at = timezone.now()
        run.phase = "failed"
        run.lease_expires_at = None
        run.save(update_fields=["status", "error", "finished_at", "phase", "lease_expires_at"])
        audit_log.record(None, "run.failed", run, {"kind": run.kind, "error": run.error[:500]})
    return True


def _fail_persistently(run_id: int, reason: str, lease: str | None, patience: float = 60.0) -> bool:
    """:func:`_fail` through a database that may still be blinking: retried on fresh connections for
    ``patience`` seconds. If it never gets through, the lease lapses and the sweeper takes over."""
    import time

    from django.db import connection

    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return _fail(run_id, reason, lease)
        except TRANSIENT_ERRORS:
            connection.close()
            if time.monotonic() > deadline:
                logger.exception("could not mark run %s failed; the sweeper will find its lapsed lease", run_id)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _note_retry(run_id: int, lease: str, text: str, delay: float) -> None:
    """Best effort (the database may be what is failing): show why the run waits, and keep its lease
    through the backoff so the sweeper does not take the retry for a lost worker."""
    import datetime as dt

    from django.db import connection
    from django.utils import timezone

    from governance.models import ProbeRun
    from workers import runtime

    try:
        ProbeRun.objects.filter(pk=run_id, lease_token=lease, status=ProbeRun.Status.RUNNING).update(
            phase=text[:200], lease_expires_at=timezone.now() + dt.timedelta(seconds=delay) + runtime.lease_duration())
    except TRANSIENT_ERRORS:
        connection.close()


@shared_task(name="workers.tasks.run_probe", bind=True, max_retries=None)
def run_probe(self, run_id: int, lease: str | None = None, since: float | None = None,
              waited: float = 0.0, tries: int = 0) -> dict[str, Any]:
    """Run one probe of a case and store its evidence. Idempotent under redelivery.

    Permanent errors (bad input, a probe that raises) mark the run failed with the reason and return
    normally, so the rest of the case's runs and its aggregation go on. Transient errors (the
    database or broker blinked) are retried with exponential backoff for ``LOUPE_RUN_RETRY_WINDOW``
    seconds from the first of them; after that the run fails with the last error as its reason.
    ``lease``, ``since`` (when the first error came) and ``waited`` (backoff so far: the window is
    spent by whichever is larger, so eager retries, which do not sleep, end too) come from retries.
    """
    import time

    from celery.exceptions import SoftTimeLimitExceeded
    from django.db import connection

    from governance import artifacts, evidence, pipeline
    from governance.models import ProbeRun
    from workers import runtime
    from workers.probes import allocator, suite
    from workers.probes.errors import ProbeInputError

    # Whichever process runs the probe (a worker's pool child, or the web or demo process itself on
    # the embedded default) keeps freed tensor memory from now on; allocator.py says why.
    allocator.tune_malloc()
    run = None
    heartbeat = None
    try:
        run = _claim(run_id, self.request.id or "", lease)
        if run is None:
            status = ProbeRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
            _request_aggregation(run_id)
            return {"run": run_id, "status": status, "skipped": True}
        lease = run.lease_token
        heartbeat = runtime.Heartbeat(run_id, lease).start()
        # Files of an earlier attempt whose evidence transaction rolled back (governance/artifacts.py).
        if run.attempts > 1 or self.request.retries:
            artifacts.discard_unrecorded_files(run.case_id, run.pk)
        version = run.case.model_version
        try:
            model_dir = str(artifacts.model_directory(version))
            dataset_dir = pipeline.resolve_dataset(run.dataset)
            device = runtime.select_device()
            params = pipeline.resolve_params(run.params)  # confined again: settings may have changed since
            with runtime.model_cache.exclusive():
                result = suite.run(run.kind, model_dir, dataset_dir, params, device=device,
                                   progress=pipeline.RunProgress(run_id),
                                   loader=lambda path, dev: runtime.model_cache.get(
                                       version.manifest_hash or path, dev,
                                       lambda: suite.load_adapter_uncached(path, dev)))
            evidence.record_result(run_id, result, _provenance(version, device, run.params))
        except evidence.AlreadyRecorded:
            pass
        except TRANSIENT_ERRORS:
            raise
        except SoftTimeLimitExceeded:
            _fail(run_id, f"exceeded the soft time limit of {self.soft_time_limit or 'the configured'} seconds", lease)
        except (ProbeInputError, artifacts.ArtifactUnavailable, pipeline.PipelineError) as exc:
            _fail(run_id, str(exc), lease)
        except Exception as exc:  # a probe bug: fail this run with its reason, keep the others going
            logger.exception("probe run %s (%s) raised", run_id, run.kind)
            _fail(run_id, f"{type(exc).__name__}: {exc}", lease)
        _request_aggregation(run_id)
        status = ProbeRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        return {"run": run_id, "status": status}
    except TRANSIENT_ERRORS as exc:
        connection.close()  # a connection the server dropped is useless; the next query opens a fresh one
        since = since or time.time()
        tries = max(tries, self.request.retries or 0)
        delay = runtime.retry_delay(tries)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if max(time.time() - since, waited) + delay <= runtime.retry_window():
            if lease:
                retry_at = time.strftime("%H:%M:%S", time.gmtime(time.time() + delay))
                _note_retry(run_id, lease, f"transient error ({reason[:80]}); retrying at {retry_at} UTC", delay)
            again = {"run_id": run_id, "lease": lease, "since": since, "waited": waited + delay, "tries": tries + 1}
            if self.request.is_eager:
                # In-process (the embedded default) there is no broker to hold the retry, and Celery
                # propagates an eager Retry as an error: wait here and try again.
                runtime.pause(delay)
                return run_probe.run(**again)
            raise self.retry(exc=exc, countdown=delay, kwargs=again) from exc
        window = runtime.retry_window()
        if _fail_persistently(run_id, f"gave up after retrying for {window:.0f} s: {reason}", lease if run else None):
            _request_aggregation_safely(run_id)
        return {"run": run_id, "status": "failed"}
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _request_aggregation_safely(run_id: int) -> None:
    try:
        _request_aggregation(run_id)
    except TRANSIENT_ERRORS:  # the sweeper aggregates cases whose runs all finished
        logger.warning("aggregation after run %s deferred to the sweeper", run_id, exc_info=True)


def _request_aggregation(run_id: int) -> None:
    """After a run finishes, aggregate its case if it was the last one (governance/pipeline.py)."""
    from governance import pipeline
    from governance.models import ProbeRun

    case_id = ProbeRun.objects.filter(pk=run_id).values_list("case_id", flat=True).first()
    if case_id is not None:
        pipeline.aggregate_case(case_id)


@shared_task(name="workers.tasks.aggregate_case", autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, max_retries=5)
def aggregate_case(case_id: int) -> str:
    """``running -> evidence_ready`` once every run of the case finished (idempotent)."""
    from governance import pipeline

    return pipeline.aggregate_case(case_id)


@shared_task(name="workers.tasks.recover_runs", ignore_result=True, expires=300)
def recover_runs() -> dict[str, list[int]]:
    """The sweeper (Celery beat, and once when a worker starts): see ``governance.pipeline.recover_runs``
    and ``governance.notifications.resend_stalled``. It expires: sweeps that queued up while no worker
    ran are redundant with the next one."""
    from governance import notifications, pipeline

    done = pipeline.recover_runs()
    with transaction.atomic():
        done["webhooks_resent"] = notifications.resend_stalled()
    return done


@shared_task(name="workers.tasks.render_report", bind=True, autoretry_for=TRANSIENT_ERRORS, retry_backoff=True,
             max_retries=3)
def render_report(self, case_id: int, author_id: int, request_key: str | None = None) -> int:
    """Issue the report version requested under ``request_key`` (queue ``reports``); returns its id.

    Without a key, the task's own id is the key: a redelivery (the worker died after the commit,
    before the acknowledgement) carries the same id, so it returns the version already issued
    instead of issuing another (governance/report_requests.py).
    """
    from django.contrib.auth import get_user_model

    from governance import report_requests

    author = get_user_model().objects.get(pk=author_id)
    key = request_key or f"task:{self.request.id}"
    report, _ = report_requests.issue(case_id, author, key)
    return report.pk


# --------------------------------------------------------------------------------------------------
# Notifications (governance/notifications.py): e-mail and signed webhooks
# --------------------------------------------------------------------------------------------------


@shared_task(name="workers.tasks.send_notification_mail", autoretry_for=(OSError,), retry_backoff=True,
             max_retries=5, ignore_result=True)
def send_notification_mail(subject: str, body: str, recipients: list[str]) -> int:
    """Send one notification e-mail through Django's mail backend (``EMAIL_BACKEND``)."""
    from governance import notifications

    return notifications.send_mail_now(subject, body, recipients)


@shared_task(name="workers.tasks.deliver_webhook", bind=True, max_retries=None, ignore_result=True)
def deliver_webhook(self: Any, delivery_id: int) -> str:
    """POST one webhook delivery; on failure retry with exponential backoff up to
    ``LOUPE_WEBHOOK_MAX_ATTEMPTS`` attempts, then mark it failed. Every attempt is recorded on the
    delivery (attempts, response status, last error). A delivered one is never sent again."""
    from django.conf import settings

    from governance import notifications
    from governance.models import WebhookDelivery

    while True:
        delivery = WebhookDelivery.objects.select_related("endpoint").filter(pk=delivery_id).first()
        if delivery is None or delivery.status != WebhookDelivery.Status.PENDING:
            return delivery.status if delivery is not None else "missing"
        if notifications.attempt(delivery):
            return WebhookDelivery.Status.DELIVERED
        if delivery.attempts >= settings.LOUPE_WEBHOOK_MAX_ATTEMPTS or not delivery.endpoint.is_active:
            notifications.give_up(delivery)
            return WebhookDelivery.Status.FAILED
        if not self.request.is_eager:
            delay = min(settings.LOUPE_WEBHOOK_RETRY_MAX_DELAY,
                        settings.LOUPE_WEBHOOK_RETRY_DELAY * 2 ** (delivery.attempts - 1))
            raise self.retry(countdown=delay)
        # In-process (no broker) nothing can hold a retry for later, and Celery propagates an eager
        # Retry as an error: the attempts follow one another at once.

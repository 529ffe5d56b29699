"""The audit pipeline: a submitted case becomes probe runs on workers, then reviewable evidence.

::

    start_case(case_id)                         (API "start", ``manage.py run_audit``)
      ├─ check the broker first: if it is down, answer clearly and write nothing
      ├─ one transaction: submitted -> running, one ProbeRun per plan item (status queued,
      │  a task id of its own), an audit event
      └─ on commit: one run_probe(run_id) message per run, on queue "gpu"

    run_probe(run_id)   (workers/tasks.py)      lease the run, run the probe kind, store evidence,
                                                then aggregate the case if it was the last run
    aggregate_case(case_id)                     all runs finished -> running -> evidence_ready
    recover_runs()      (the sweeper: Celery beat, worker start, ``manage.py recover_runs``)
                                                re-dispatch runs nobody works on, aggregate
                                                cases whose runs all finished

Why no chord: its join counts task completions, and with ``acks_late`` a task whose worker died
after finishing is delivered again and counted twice, so it fires early or never; it also needs a
result backend, which RabbitMQ does not give. Instead each run, once finished, asks for
aggregation, and the sweeper catches what a lost message or a dead worker left behind.
``aggregate_case`` is idempotent and only acts when every run is finished.

Lost work is found by leases (workers/runtime.py ``Heartbeat``): a worker renews its run's lease
while it works, so a ``running`` run whose lease lapsed has no worker, and a ``queued`` run not
claimed long after its dispatch has no message. Locks follow ``workflow.LOCK_ORDER``.

Everything here receives and enqueues ids, never objects (tasks run in other processes, later).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from governance import audit_log, workflow
from governance.models import AuditCase, Evidence, ProbeRun

logger = logging.getLogger(__name__)

S = AuditCase.State

# In-process listeners (``manage.py audit_demo`` draws progress bars with them): called as
# ``listener(run_id, fraction, phase)`` on every progress update that reaches the database.
progress_listeners: list[Callable[[int, float, str], None]] = []


class BrokerUnavailable(Exception):
    """The task broker cannot be reached; nothing was written."""


class PipelineError(Exception):
    """A case cannot be started (bad dataset reference, nothing to run, ...)."""


# --------------------------------------------------------------------------------------------------
# Datasets named in probe plans
# --------------------------------------------------------------------------------------------------


# One resolver for every reference in a plan (closed zoo lists, roots after links, one answer for
# missing and forbidden): governance/references.py. These names are what callers use.


def dataset_roots() -> list[Path]:
    """Server directories below which plan datasets may live (``LOUPE_DATASET_ROOTS``)."""
    from governance import references

    return references.dataset_roots()


def resolve_dataset(reference: str | None) -> str | None:
    """A plan's ``dataset`` -> a local directory (see :func:`governance.references.resolve_dataset`)."""
    from governance import references

    try:
        return references.resolve_dataset(reference)
    except references.ReferenceUnavailable as exc:
        raise PipelineError(str(exc)) from exc


def resolve_model_reference(reference: str) -> str:
    """``zoo:<checkpoint>`` or a directory below ``LOUPE_MODEL_ROOTS`` -> a local model directory."""
    from governance import references

    try:
        return references.resolve_model(reference)
    except references.ReferenceUnavailable as exc:
        raise PipelineError(str(exc)) from exc


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``params`` with every reference resolved and confined (:mod:`governance.references`)."""
    from governance import references

    try:
        return references.resolve_params(params)
    except references.ReferenceUnavailable as exc:
        raise PipelineError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------
# Starting a case
# --------------------------------------------------------------------------------------------------


def broker_is_eager() -> bool:
    """True when tasks run in-process (no ``CELERY_BROKER_URL``: the embedded default)."""
    from workers.celery import app

    return bool(app.conf.task_always_eager)


def check_broker(timeout: float = 3.0) -> None:
    """Raise :class:`BrokerUnavailable` unless the broker accepts a connection within ``timeout``."""
    if broker_is_eager():
        return
    from kombu import Connection

    from workers.celery import app

    try:
        # A fresh connection, not one from the app's pool: a pooled connection can look alive after
        # the broker went away, and the point is to know *now*.
        with Connection(app.conf.broker_url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # kombu raises a variety of transport errors
        raise BrokerUnavailable(
            "the task broker is unreachable, so no probe can be queued; the case was left unchanged. "
            f"Try again when the broker is back ({type(exc).__name__}).") from exc


def task_id_for(run: ProbeRun) -> str:
    """A task id derived from the run, so a run's task can be found and revoked without a lookup."""
    return f"loupe-run-{run.pk}-{run.idempotency_key[:12]}"


def _plan_items_to_run(case: AuditCase) -> list[tuple[int, dict[str, Any]]]:
    """On a first start every plan item; on a re-run only items whose latest run did not succeed."""
    plan = list(enumerate(case.probe_plan))
    if not case.runs.exists():
        return plan
    succeeded = {(run.kind, _key(run.params), run.dataset or "")
                 for run in case.runs.filter(status=ProbeRun.Status.SUCCEEDED)}
    return [(i, item) for i, item in plan
            if (item["kind"], _key(item.get("params") or {}), item.get("dataset") or "") not in succeeded]


def _key(params: dict[str, Any]) -> str:
    from governance.canonical import canonical_json

    return canonical_json(params).decode()


def start_case(case_id: int, by=None) -> list[int]:
    """Expand the plan of a submitted case (or re-run the failed probes of one with evidence ready),
    queue the runs, and dispatch them once the transaction commits. Returns the new run ids.

    Raises :class:`BrokerUnavailable` (nothing written), ``workflow.TransitionError``/``NotAllowed``,
    or :class:`PipelineError` for a dataset reference the server will not use.
    """
    check_broker()
    with transaction.atomic():
        case = workflow.lock_case(case_id)  # workflow.LOCK_ORDER: the case first
        items = _plan_items_to_run(case)
        if not items:
            raise PipelineError(f"case #{case.pk}: every planned probe already succeeded; nothing to re-run")
        for _, item in items:
            resolve_dataset(item.get("dataset"))  # refuse bad references before anything is written
            resolve_params(item.get("params"))
        workflow.transition(case, S.RUNNING, by)
        now = timezone.now()
        runs = []
        for _, item in items:
            run = ProbeRun.objects.create(case=case, kind=item["kind"], params=item.get("params") or {},
                                          dataset=item.get("dataset") or "", status=ProbeRun.Status.QUEUED,
                                          queued_at=now, dispatched_at=now, phase="queued")
            run.task_id = task_id_for(run)
            run.save(update_fields=["task_id"])
            runs.append(run)
        audit_log.record(by, "case.runs_queued", case, {
            "runs": [{"run": r.pk, "kind": r.kind, "plan_item": i} for r, (i, _) in zip(runs, items, strict=True)]})
        run_ids = [r.pk for r in runs]
        transaction.on_commit(functools.partial(dispatch, case.pk, run_ids))
    return run_ids


def dispatch(case_id: int, run_ids: list[int], countdown: float | None = None) -> None:
    """Send one ``run_probe`` message (queue ``gpu``) per run; each run asks for aggregation when it
    finishes, and the sweeper aggregates too (:func:`recover_runs`).

    Runs after commit. If the broker went away between the check and now, the runs are put back to
    ``pending`` with the reason, and the sweeper (or ``manage.py recover_runs``) dispatches them again.
    """
    from workers import local
    from workers.celery import app

    # The embedded default in the web process: never hold the request.
    if local.offload(dispatch, case_id, run_ids, countdown):
        return
    # Tasks are sent by name: the web process never imports the worker's task module (which imports
    # this one). Executed in-process, the tasks must be registered first, as a worker does at start.
    if broker_is_eager():
        app.loader.import_default_modules()
    runs = list(ProbeRun.objects.filter(pk__in=run_ids).order_by("pk"))
    sent: list[int] = []
    try:
        for run in runs:
            app.signature("workers.tasks.run_probe", args=(run.pk,)).apply_async(task_id=run.task_id,
                                                                                 countdown=countdown)
            sent.append(run.pk)
    except Exception as exc:
        if broker_is_eager():
            raise
        logger.exception("dispatching runs of case %s failed", case_id)
        ProbeRun.objects.filter(pk__in=set(run_ids) - set(sent), status=ProbeRun.Status.QUEUED).update(
            status=ProbeRun.Status.PENDING, phase=f"not dispatched: broker unavailable ({type(exc).__name__})")


def dispatch_pending(case_id: int) -> list[int]:
    """Dispatch runs of a running case that never reached the broker (see :func:`dispatch`)."""
    check_broker()
    with transaction.atomic():
        pending = list(ProbeRun.objects.select_for_update(of=("self",), no_key=True).filter(
            case_id=case_id, case__state=S.RUNNING, status=ProbeRun.Status.PENDING).order_by("pk"))
        now = timezone.now()
        for run in pending:
            run.status = ProbeRun.Status.QUEUED
            run.phase = "queued again"
            run.dispatched_at = now
            run.save(update_fields=["status", "phase", "dispatched_at"])
        run_ids = [r.pk for r in pending]
        if run_ids:
            transaction.on_commit(functools.partial(dispatch, case_id, run_ids))
    return run_ids


# --------------------------------------------------------------------------------------------------
# Recovery: the sweeper
# --------------------------------------------------------------------------------------------------


def _utc(value) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def recover_runs(now: dt.datetime | None = None) -> dict[str, list[int]]:
    """Find work nobody is doing and get it done; safe to run any number of times, anywhere, at once.

    - a ``running`` run whose lease lapsed (its worker died or hangs): back to ``queued`` with
      "worker lost, retrying at ..." and dispatched again after a backoff; after
      ``LOUPE_RUN_MAX_ATTEMPTS`` lost workers it fails with the reason instead;
    - a ``pending`` or ``queued`` run of a running case not claimed ``LOUPE_RUN_REDISPATCH_AFTER``
      seconds after its last dispatch (the broker lost the message): dispatched again;
    - an active run of a case that is no longer running: cancelled;
    - a running case whose runs all finished: aggregated.

    Each run is handled under its row lock (``skip_locked``: two sweepers never both take a run) and
    re-checked there, and ``dispatched_at`` moves forward, so a second sweep finds nothing to do.
    A duplicate message is harmless anyway: the run's lease lets only one delivery execute it.
    Returns the run and case ids acted on, by what was done.
    """
    from workers import runtime

    now = now or timezone.now()
    lease = runtime.lease_duration()
    redispatch_after = dt.timedelta(seconds=settings.LOUPE_RUN_REDISPATCH_AFTER)
    done: dict[str, list[int]] = {"requeued": [], "redispatched": [], "failed": [], "cancelled": [], "aggregated": []}
    lapsed = Q(status=ProbeRun.Status.RUNNING) & (
        Q(lease_expires_at__lt=now) | Q(lease_expires_at__isnull=True, started_at__lt=now - lease))
    unclaimed = Q(status__in=(ProbeRun.Status.PENDING, ProbeRun.Status.QUEUED)) & (
        Q(dispatched_at__lt=now - redispatch_after)
        | Q(dispatched_at__isnull=True, queued_at__lt=now - redispatch_after)
        | Q(dispatched_at__isnull=True, queued_at__isnull=True, created_at__lt=now - redispatch_after))
    orphaned = Q(status__in=ProbeRun.ACTIVE) & ~Q(case__state=S.RUNNING)
    candidates = list(ProbeRun.objects.filter(lapsed | unclaimed | orphaned).order_by("pk")
                      .values_list("pk", flat=True))
    to_dispatch: dict[tuple[int, float], list[int]] = {}
    for run_id in candidates:
        with transaction.atomic():
            run = (ProbeRun.objects.select_for_update(of=("self",), no_key=True, skip_locked=True)
                   .filter(pk=run_id).filter(lapsed | unclaimed | orphaned).first())
            if run is None:
                continue  # another sweeper or a worker holds it, or it moved on
            case_state = AuditCase.objects.filter(pk=run.case_id).values_list("state", flat=True).get()
            if case_state != S.RUNNING:
                run.status, run.finished_at = ProbeRun.Status.CANCELLED, now
                run.phase = f"cancelled: the case is '{case_state}'"
                run.lease_expires_at = None
                run.save(update_fields=["status", "finished_at", "phase", "lease_expires_at"])
                done["cancelled"].append(run.pk)
                continue
            was_running = run.status == ProbeRun.Status.RUNNING
            if was_running and run.attempts >= settings.LOUPE_RUN_MAX_ATTEMPTS:
                last = _utc(run.heartbeat_at) if run.heartbeat_at else "never"
                run.status, run.finished_at, run.phase = ProbeRun.Status.FAILED, now, "failed"
                run.error = (f"worker lost {run.attempts} times (last heartbeat {last}); "
                             f"gave up after {settings.LOUPE_RUN_MAX_ATTEMPTS} attempts")
                run.lease_expires_at = None
                run.save(update_fields=["status", "finished_at", "phase", "error", "lease_expires_at"])
                audit_log.record(None, "run.failed", run, {"kind": run.kind, "error": run.error})
                done["failed"].append(run.pk)
                continue
            delay = runtime.retry_delay(run.attempts) if was_running else 0.0
            retry_at = now + dt.timedelta(seconds=delay)
            if was_running:
                last = _utc(run.heartbeat_at) if run.heartbeat_at else "never"
                run.phase = f"worker lost (last heartbeat {last}), retrying at {_utc(retry_at)}"
                done["requeued"].append(run.pk)
            else:
                since = run.dispatched_at or run.queued_at or run.created_at
                run.phase = (f"not picked up since {_utc(since)} (task message lost?), "
                             f"dispatched again at {_utc(retry_at)}")
                done["redispatched"].append(run.pk)
            run.status = ProbeRun.Status.QUEUED
            run.progress = 0.0
            run.lease_token, run.lease_expires_at = "", None
            run.dispatched_at = retry_at
            run.save(update_fields=["status", "progress", "phase", "lease_token", "lease_expires_at", "dispatched_at"])
            if was_running:
                audit_log.record(None, "run.requeued", run, {"kind": run.kind, "attempts": run.attempts,
                                                             "reason": "worker lost (lease lapsed)"})
            to_dispatch.setdefault((run.case_id, delay), []).append(run.pk)
    for (case_id, delay), run_ids in to_dispatch.items():
        dispatch(case_id, run_ids, countdown=delay or None)
    stalled = (AuditCase.objects.filter(state=S.RUNNING).exclude(runs__status__in=ProbeRun.ACTIVE)
               .values_list("pk", flat=True))
    for case_id in list(stalled):
        result = aggregate_case(case_id)
        if "evidence ready" in result:
            done["aggregated"].append(case_id)
    if any(done.values()):
        logger.info("recover_runs: %s", {k: v for k, v in done.items() if v})
    return done


# --------------------------------------------------------------------------------------------------
# Aggregation and progress
# --------------------------------------------------------------------------------------------------


def case_progress(case: AuditCase) -> dict[str, Any]:
    """Counts by status, overall progress (0..1) and whether the evidence is partial."""
    runs = list(case.runs.all())
    missing = unsatisfied_plan_items(case, runs)
    counts = {status: 0 for status in ProbeRun.Status.values}
    for run in runs:
        counts[run.status] += 1
    total = len(runs)
    progress = sum(1.0 if run.is_finished else run.progress for run in runs) / total if total else 0.0
    return {
        "runs": total,
        "counts": counts,
        "progress": round(progress, 4),
        "partial": bool(missing),
        "failed": [{"run": run.pk, "kind": run.kind, "error": run.error} for run in runs
                   if run.status == ProbeRun.Status.FAILED and _item_key(run.kind, run.params, run.dataset) in missing],
    }


def _item_key(kind: str, params: dict[str, Any] | None, dataset: str | None) -> tuple[str, str, str]:
    return kind, _key(params or {}), dataset or ""


def unsatisfied_plan_items(case: AuditCase, runs: list[ProbeRun] | None = None) -> set[tuple[str, str, str]]:
    """Plan items of ``case`` without a succeeded run. Evidence is partial exactly when this is not
    empty: runs cancelled or failed on the way (a withdrawn and resubmitted case, a re-run that then
    succeeded) do not make it partial once every planned item has succeeded."""
    runs = list(case.runs.all()) if runs is None else runs
    succeeded = {_item_key(r.kind, r.params, r.dataset) for r in runs if r.status == ProbeRun.Status.SUCCEEDED}
    planned = {_item_key(item["kind"], item.get("params"), item.get("dataset")) for item in case.probe_plan or []}
    return planned - succeeded


def aggregate_case(case_id: int) -> str:
    """Move a running case whose runs have all finished to ``evidence_ready``. Idempotent.

    Failed runs do not block aggregation: the case then holds *partial* evidence, which the audit
    event, the API (``progress.partial``) and the report state plainly.
    """
    with transaction.atomic():
        case = workflow.lock_case(case_id)  # workflow.LOCK_ORDER: the case first
        if case.state != S.RUNNING:
            return f"case #{case_id} is '{case.state}'; nothing to aggregate"
        if case.runs.filter(status__in=ProbeRun.ACTIVE).exists():
            return f"case #{case_id} still has active runs"
        summary = case_progress(case)
        if not Evidence.objects.filter(run__case=case).exists():
            # Nothing to review: "evidence ready" with no evidence would invite an approval of nothing.
            workflow.transition(case, S.SUBMITTED, None, note="every probe run finished without evidence")
            audit_log.record(None, "case.no_evidence", case, {
                "counts": summary["counts"],
                "failed": [{"run": f["run"], "kind": f["kind"]} for f in summary["failed"]]})
            return f"case #{case_id}: no evidence; back to submitted"
        workflow.mark_evidence_ready(case, by=None)
        audit_log.record(None, "case.evidence_aggregated", case, {
            "counts": summary["counts"], "partial": summary["partial"],
            "failed": [{"run": f["run"], "kind": f["kind"]} for f in summary["failed"]]})
    return f"case #{case_id}: evidence ready ({'partial' if summary['partial'] else 'complete'})"


class RunProgress:
    """The ``progress(fraction, phase)`` callback a probe kind receives, writing to the run's row.

    Throttled (at most every ``interval`` seconds unless the phase changes): probes call it per
    batch, and a write per call would make the database the bottleneck.
    """

    def __init__(self, run_id: int, interval: float = 0.5) -> None:
        self.run_id = run_id
        self.interval = interval
        self._last_write = 0.0
        self._last_phase = ""
        self._lock = threading.Lock()

    def __call__(self, fraction: float, phase: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        phase = (phase or "")[:200]
        now = time.monotonic()
        with self._lock:
            if phase == self._last_phase and now - self._last_write < self.interval and fraction < 1.0:
                return
            self._last_write, self._last_phase = now, phase
        # Never report 1.0 from inside the probe: "done" is set with the evidence, atomically.
        try:
            ProbeRun.objects.filter(pk=self.run_id, status=ProbeRun.Status.RUNNING).update(
                progress=min(fraction, 0.99), phase=phase)
        except (OperationalError, InterfaceError):
            # Progress is best effort: a database blip must not fail a probe that is otherwise fine
            # (the heartbeat and the final write decide what happens to the run).
            logger.warning("progress of run %s not written", self.run_id, exc_info=True)
            connection.close()
        for listener in list(progress_listeners):
            listener(self.run_id, fraction, phase)


# --------------------------------------------------------------------------------------------------
# Cancelling
# --------------------------------------------------------------------------------------------------


@receiver(workflow.case_transitioned, dispatch_uid="loupe-pipeline-revoke-on-cancel")
def revoke_cancelled_runs(sender, case: AuditCase, from_state: str, to_state: str, by, **kwargs) -> None:
    """A withdrawn case (``submitted|running -> draft``) revokes its runs' pending tasks on commit.

    The workflow already marked the runs cancelled in the same transaction; a task that starts anyway
    (revocation is best effort) sees that and does nothing.
    """
    if to_state != S.DRAFT or from_state not in (S.SUBMITTED, S.RUNNING) or broker_is_eager():
        return
    task_ids = list(ProbeRun.objects.filter(case_id=case.pk, status=ProbeRun.Status.CANCELLED)
                    .exclude(task_id="").values_list("task_id", flat=True))
    if not task_ids:
        return

    def revoke() -> None:
        from workers.celery import app

        try:
            app.control.revoke(task_ids)
        except Exception:  # the broker may be down; the cancelled status still stops the tasks
            logger.warning("could not revoke tasks of case %s", case.pk, exc_info=True)

    transaction.on_commit(revoke)

"""The audit pipeline: plan -> runs -> evidence -> evidence_ready, on the embedded default and, with
``LOUPE_REAL_STACK=1``, through Redis and a real worker process on PostgreSQL.

Actors: alice submits Acme's model; ada (admin) assigns rita and rob. The probes are the
``selftest`` kind (loads the model, holds for ``seconds``, fails on request) on a tiny CLIP.
"""

from __future__ import annotations

import pytest

from governance import audit_log, pipeline
from governance.models import AuditCase, AuditEvent, Evidence, ProbeRun
from tests.pipeline_fixtures import make_case, wait_for_state


@pytest.mark.django_db(transaction=True)
def test_it_runs_every_planned_probe_and_reports_partial_evidence_honestly(
        tiny_clip_version, alice, ada, rita, rob, celery_worker):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [
        {"kind": "selftest", "params": {"seconds": 0.2}},
        {"kind": "selftest", "params": {"fail": True}},
    ])

    run_ids = pipeline.start_case(case.pk, by=alice)
    case = wait_for_state(case, AuditCase.State.EVIDENCE_READY)

    ok, failed = ProbeRun.objects.filter(pk__in=run_ids).order_by("pk")
    assert ok.status == ProbeRun.Status.SUCCEEDED and ok.progress == 1.0
    assert ok.evidence.metrics["architecture"] == "clip"
    assert ok.model_manifest_hash == tiny_clip_version.manifest_hash
    assert ok.library_versions["torch"] and ok.code_version and ok.device.startswith("cpu")
    assert {a.name for a in ok.evidence.artifacts.all()} == {"metrics.json"}
    assert failed.status == ProbeRun.Status.FAILED
    assert "failed on request" in failed.error
    assert not Evidence.objects.filter(run=failed).exists()
    progress = pipeline.case_progress(case)
    assert progress["partial"] is True
    assert progress["failed"] == [{"run": failed.pk, "kind": "selftest", "error": failed.error}]
    aggregated = AuditEvent.objects.get(action="case.evidence_aggregated", case=case)
    assert aggregated.data["partial"] is True
    assert audit_log.verify() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_it_halves_a_batch_that_runs_out_of_gpu_memory_and_says_so_in_the_evidence(
        tiny_clip_version, alice, ada, rita, rob, celery_worker):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [
        {"kind": "selftest", "params": {"batch_size": 8, "out_of_memory_above": 3}},
        {"kind": "selftest", "params": {"out_of_memory_above": 0, "batch_size": 2}},
    ])

    run_ids = pipeline.start_case(case.pk, by=alice)
    wait_for_state(case, AuditCase.State.EVIDENCE_READY)

    fitted, failing = ProbeRun.objects.filter(pk__in=run_ids).order_by("pk")
    assert fitted.status == ProbeRun.Status.SUCCEEDED and fitted.attempts == 1
    assert fitted.evidence.metrics["batch_size"] == 2
    assert fitted.evidence.metrics["memory_backoff"] == {
        "device": "cpu", "batch_params": {"batch_size": 2}, "out_of_memory_at": [{"batch_size": 8}, {"batch_size": 4}]}
    assert fitted.params == {"batch_size": 8, "out_of_memory_above": 3}  # the plan as written stays on record
    assert failing.status == ProbeRun.Status.FAILED and not Evidence.objects.filter(run=failing).exists()
    assert failing.error.startswith("selftest ran out of cpu memory even with batch_size=1; the model does not fit")


@pytest.mark.django_db(transaction=True)
def test_it_never_stores_a_second_set_of_evidence_for_a_redelivered_task(
        tiny_clip_version, alice, ada, rita, rob, celery_worker):
    from workers.tasks import run_probe

    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {}}])
    [run_id] = pipeline.start_case(case.pk, by=alice)
    wait_for_state(case, AuditCase.State.EVIDENCE_READY)
    first = Evidence.objects.get(run_id=run_id)

    result = run_probe.apply(args=[run_id]).get()  # the same task, delivered again

    assert result["skipped"] is True
    assert list(Evidence.objects.filter(run__case=case)) == [first]
    assert ProbeRun.objects.get(pk=run_id).attempts == 1


@pytest.mark.django_db
@pytest.mark.slow
def test_it_reruns_only_the_probes_that_did_not_succeed(tiny_clip_version, alice, ada, rita, rob,
                                                         django_capture_on_commit_callbacks):
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [
        {"kind": "selftest", "params": {}},
        {"kind": "selftest", "params": {"fail": True}},
    ])
    with django_capture_on_commit_callbacks(execute=True):
        pipeline.start_case(case.pk, by=alice)
    case.refresh_from_db()
    assert case.state == AuditCase.State.EVIDENCE_READY

    with django_capture_on_commit_callbacks(execute=True):
        rerun = pipeline.start_case(case.pk, by=ada)

    assert ProbeRun.objects.get(pk__in=rerun).params == {"fail": True}
    assert case.runs.count() == 3


@pytest.mark.django_db
def test_it_refuses_a_dataset_outside_the_allowed_roots_and_writes_nothing(tiny_clip_version, alice, ada, rita, rob):
    case = make_case(tiny_clip_version, alice, ada, rita, rob,
                     [{"kind": "selftest", "params": {}, "dataset": "/etc"}])
    events = AuditEvent.objects.count()

    with pytest.raises(pipeline.PipelineError, match="is not available"):
        pipeline.start_case(case.pk, by=alice)

    case.refresh_from_db()
    assert case.state == AuditCase.State.SUBMITTED
    assert not case.runs.exists()
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db
@pytest.mark.parametrize("kind, params, message", [
    ("tcav", {"inputs": "/etc", "target": "a cat"}, "dataset reference .* is not available"),
    ("attention", {"compare_models": ["/root"]}, "model reference .* is not available"),
])
def test_it_confines_server_paths_inside_probe_params_too(tiny_clip_version, alice, ada, rita, rob, kind, params,
                                                          message):
    # tcav/shortcut read an image folder and the attention probe loads models named in params: a
    # plan is user input, so these paths get the same confinement as the plan's dataset
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": kind, "params": params}])

    with pytest.raises(pipeline.PipelineError, match=message):
        pipeline.start_case(case.pk, by=alice)

    case.refresh_from_db()
    assert case.state == AuditCase.State.SUBMITTED and not case.runs.exists()


def test_it_refuses_model_references_that_are_not_a_list():
    with pytest.raises(pipeline.PipelineError, match="expected a list of model references"):
        pipeline.resolve_params({"compare_models": "zoo:tiny-clip"})


def test_it_resolves_zoo_references_in_probe_params():
    from workers.probes import zoo

    resolved = pipeline.resolve_params({"compare_models": ["zoo:tiny-siglip"], "limit": 4})
    assert resolved == {"compare_models": [str(zoo.checkpoint_path("tiny-siglip"))], "limit": 4}


@pytest.mark.django_db
def test_it_answers_clearly_when_the_broker_is_down_and_leaves_nothing_half_written(
        tiny_clip_version, alice, ada, rita, rob, client, monkeypatch):
    from workers.celery import app

    case = make_case(tiny_clip_version, alice, ada, rita, rob, [{"kind": "selftest", "params": {}}])
    events = AuditEvent.objects.count()
    dead = "redis://127.0.0.1:1/0"  # nothing listens there
    monkeypatch.setenv("CELERY_BROKER_URL", dead)  # Celery lets the environment win over its config
    saved = app.conf.broker_url, app.conf.task_always_eager
    app.conf.broker_url, app.conf.task_always_eager = dead, False
    try:
        client.force_login(alice)
        response = client.post(f"/api/cases/{case.pk}/start/")
    finally:
        app.conf.broker_url, app.conf.task_always_eager = saved

    assert response.status_code == 503
    assert "broker is unreachable" in response.json()["detail"]
    case.refresh_from_db()
    assert case.state == AuditCase.State.SUBMITTED
    assert not case.runs.exists()
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db(transaction=True)
def test_runs_of_one_worker_process_take_turns_with_its_shared_models(
        tiny_clip_version, alice, ada, rita, rob, monkeypatch):
    # A thread pool (or any second thread) runs two probes in one process, on one cached model that
    # some methods change for the length of a call: the runs must not overlap.
    import threading
    import time

    from django.db import connection

    from workers import tasks
    from workers.probes import suite

    monkeypatch.setattr(pipeline, "dispatch", lambda *args, **kwargs: None)  # the test delivers the runs itself
    case = make_case(tiny_clip_version, alice, ada, rita, rob, [
        {"kind": "selftest", "params": {"seconds": 0.3}},
        {"kind": "selftest", "params": {"seconds": 0.3}},
    ])
    run_ids = pipeline.start_case(case.pk, by=alice)
    inside, most = [0], [0]
    guard = threading.Lock()
    real_run = suite.run

    def counted(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)
            return real_run(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(suite, "run", counted)

    def deliver(run_id):
        try:
            tasks.run_probe.run(run_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert most[0] == 1
    assert set(ProbeRun.objects.filter(pk__in=run_ids).values_list("status", flat=True)) == {ProbeRun.Status.SUCCEEDED}

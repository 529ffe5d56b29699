"""The Compose deployment agrees with the code: every service runs something that exists.

Docker is not available where the tests run, so this checks what can drift silently: the Celery app
and queues a worker consumes, the settings module, the WSGI target, healthchecks and start order,
the GPU reservation, and that the image does not run as root.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from workers import celery as celery_module

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def option(command: list[str], *names: str) -> str | None:
    for i, part in enumerate(command):
        if part in names and i + 1 < len(command):
            return command[i + 1]
    return None


def routed_queues() -> set[str]:
    queues = set()
    for name in ("workers.tasks.run_probe", "workers.tasks.compute_manifest", "workers.tasks.aggregate_case",
                 "workers.tasks.render_report"):
        queues.add(celery_module.route_task(name, (), {}, {})["queue"])
    return queues


WORKERS = [n for n, s in SERVICES.items() if "celery" in (s.get("command") or []) and "worker" in s["command"]]


@pytest.mark.parametrize("name", WORKERS)
def test_it_starts_workers_on_a_real_celery_app_and_queues_the_code_routes_to(name):
    command = SERVICES[name]["command"]
    app_path = option(command, "-A", "--app")
    module = importlib.import_module(app_path)
    assert module.app.main == "loupe"
    queues = set(option(command, "-Q", "--queues").split(","))
    assert queues <= routed_queues(), f"{name} consumes queues no task is routed to: {queues - routed_queues()}"


def test_it_consumes_every_queue_the_code_routes_to():
    consumed = set()
    for name in WORKERS:
        consumed |= set(option(SERVICES[name]["command"], "-Q", "--queues").split(","))
    assert routed_queues() <= consumed


def test_it_runs_exactly_one_scheduler_for_the_sweeper():
    schedulers = [n for n, s in SERVICES.items()
                  if "beat" in (s.get("command") or []) or "-B" in (s.get("command") or [])]
    assert schedulers == ["beat"]
    assert "replicas" not in (SERVICES["beat"].get("deploy") or {})
    tasks = {entry["task"] for entry in celery_module.app.conf.beat_schedule.values()}
    assert "workers.tasks.recover_runs" in tasks


def test_it_gives_the_gpu_worker_a_gpu_and_one_process():
    worker = SERVICES["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert option(worker["command"], "--concurrency", "-c") == "1"
    assert option(worker["command"], "-Q", "--queues") == celery_module.GPU_QUEUE


def test_it_uses_a_settings_module_and_wsgi_app_that_exist():
    for name, service in SERVICES.items():
        settings_module = (service.get("environment") or {}).get("DJANGO_SETTINGS_MODULE")
        if settings_module:
            assert importlib.util.find_spec(settings_module) is not None, name
    target = option(SERVICES["web"]["command"], "gunicorn") or SERVICES["web"]["command"][1]
    module_name, attribute = target.split(":")
    assert callable(getattr(importlib.import_module(module_name), attribute))


def test_it_checks_health_and_starts_in_order():
    for name in ("db", "redis", "web", "worker-gpu", "worker-cpu"):
        assert SERVICES[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("web", "worker-gpu", "worker-cpu"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert {"media", "pgdata"} <= set(COMPOSE["volumes"])


def test_it_answers_the_web_healthcheck(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_it_builds_an_image_that_runs_as_a_non_root_user():
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    env_example = (ROOT / "compose" / ".env.example").read_text()
    assert "SECRET_KEY=" in env_example and "POSTGRES_PASSWORD=" in env_example

"""API under concurrent load: gunicorn + PostgreSQL, clients creating, submitting, signing off and
listing cases on one model version (the pattern that deadlocked when a workflow lock also locked
the model version and model rows).

Measures, over ``--seconds`` (60) with ``--clients`` (20) threads against ``gunicorn -w --workers``
(2): requests per second, p50/p95 latency, and the HTTP status counts; any 5xx is a failure (exit
1). Each client loops: create a case, submit it, approve a prepared case as one of its two
reviewers (the second approval completes it), list cases. Tasks run in-process (no broker): the
start action, which queues probes, is not part of the mix.

Peer, measured in the same run and server: the same clients fetching ``/healthz`` (no database
writes, no locks) for ``--peer-seconds``; the ratio of medians says what the workflow adds to the
server's own floor.

Uses a throw-away database ``<name>_bench`` on the PostgreSQL server of ``--database``; prints a
table and writes JSON (``--json``)::

    nice python -m benchmarks api_load [--database postgres://postgres@127.0.0.1:5432/loupe_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _recreate_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _prepare(env: dict[str, str], cases: int) -> dict:
    """Migrate, create the actors, the model version and ``cases`` cases with evidence ready.
    Runs in a subprocess so this process stays free of Django."""
    script = r'''
import json, sys
import django
django.setup()
from django.contrib.auth.models import Group, User
from django.utils import timezone
from rest_framework.authtoken.models import Token
from governance import workflow
from governance.models import (AIModel, AuditCase, Evidence, Membership, ModelVersion, Organisation, ProbeRun)

n = int(sys.argv[1])
org = Organisation.objects.create(name="Acme Vision", slug="acme")
def user(name, role, organisation=None):
    u = User.objects.create_user(username=name, password=name + "-pw-1234")
    u.groups.add(Group.objects.get(name=role))
    if organisation: Membership.objects.create(user=u, organisation=organisation)
    return u
alice, rita, rob = user("alice", "submitter", org), user("rita", "reviewer"), user("rob", "reviewer")
ada = user("ada", "admin")
model = AIModel.objects.create(organisation=org, name="Acme CLIP", provider_name="Acme",
    provider_contact="a@acme.example",
    intended_purpose="Tagging.", modality=AIModel.Modality.IMAGE_TEXT, risk_category=AIModel.RiskCategory.LIMITED,
    created_by=alice)
version = ModelVersion(ai_model=model, version="1.0", source=ModelVersion.Source.HUB, hub_id="acme/clip",
    hub_revision="a" * 40, created_by=alice)
version.set_manifest({"config.json": "1" * 64}); version.save()
plan = [{"kind": "selftest", "params": {}}]
ready = []
for i in range(n):
    case = AuditCase.objects.create(model_version=version, title=f"prepared {i}", created_by=alice, probe_plan=plan)
    workflow.assign_reviewers(case, [rita, rob], by=ada)
    workflow.submit(case, by=alice)
    workflow.start_runs(case)
    run = ProbeRun.objects.create(case=case, kind="selftest", status=ProbeRun.Status.RUNNING, started_at=timezone.now())
    Evidence.objects.create(run=run, kind="selftest", metrics={"ok": 1}, summary="ok")
    run.status = ProbeRun.Status.SUCCEEDED; run.progress = 1.0; run.finished_at = timezone.now(); run.save()
    workflow.mark_evidence_ready(case)
    ready.append(case.pk)
tokens = {u.username: Token.objects.create(user=u).key for u in (alice, rita, rob, ada)}
print(json.dumps({"version": version.pk, "ready": ready, "tokens": tokens, "rita": rita.pk, "rob": rob.pk}))
'''
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    out = subprocess.run([sys.executable, "-c", script, str(cases)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.lock = threading.Lock()

    def add(self, name: str, status: int, seconds: float, body: str = "") -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.statuses[status] += 1
            if status >= 500:
                self.errors[f"{name} {status}: {body[:120]}"] += 1

    def summary(self, seconds: float) -> dict:
        lat = sorted(self.latencies)
        total = len(lat)
        return {
            "requests": total, "seconds": round(seconds, 1), "requests_per_second": round(total / seconds, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "p95_ms": round(lat[int(0.95 * (total - 1))] * 1000, 1) if lat else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "http_5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "errors": dict(self.errors.most_common(5)),
        }


def _workflow_client(base: str, setup: dict, slice_: list[int], deadline: float, rec: Recorder) -> None:
    import requests

    session = requests.Session()
    auth = {name: {"Authorization": f"Token {key}"} for name, key in setup["tokens"].items()}
    pending = list(slice_)
    half_signed: list[int] = []

    def call(name: str, method: str, path: str, who: str, **kwargs):
        started = time.perf_counter()
        response = session.request(method, base + path, headers=auth[who], timeout=60, **kwargs)
        body = response.text if response.status_code >= 500 else ""
        rec.add(name, response.status_code, time.perf_counter() - started, body)
        return response

    i = 0
    while time.monotonic() < deadline:
        i += 1
        created = call("create", "POST", "/api/cases/", "alice", json={
            "model_version": setup["version"], "title": f"load {threading.get_ident()} {i}",
            "probe_plan": [{"kind": "selftest", "params": {}}]})
        if created.status_code == 201:
            call("submit", "POST", f"/api/cases/{created.json()['id']}/submit/", "alice")
        if half_signed:
            call("signoff", "POST", f"/api/cases/{half_signed.pop()}/signoff/", "rob", json={"decision": "approve"})
        elif pending:
            case_id = pending.pop()
            signed = call("signoff", "POST", f"/api/cases/{case_id}/signoff/", "rita", json={"decision": "approve"})
            if signed.status_code == 201:
                half_signed.append(case_id)
        call("list", "GET", "/api/cases/?page_size=20", "rita")


def _peer_client(base: str, deadline: float, rec: Recorder) -> None:
    import requests

    session = requests.Session()
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = session.get(base + "/healthz", timeout=60)
        rec.add("healthz", response.status_code, time.perf_counter() - started)


def _run_clients(n: int, target, args_for) -> float:
    """Run ``target(*args_for(i))`` in ``n`` threads; the wall time until all finished."""
    threads = [threading.Thread(target=target, args=args_for(i)) for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks api_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/loupe_bench")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--peer-seconds", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--warmup-seconds", type=float, default=15.0)
    parser.add_argument("--prepared", type=int, default=300, help="cases with evidence ready, to sign off")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)

    load_before = round(os.getloadavg()[0], 2)
    database = args.database if args.database.endswith("_bench") else args.database + "_bench"
    _recreate_database(database)
    media = Path(tempfile.mkdtemp(prefix="loupe-api-load-"))
    env = {**os.environ, "DATABASE_URL": database, "LOUPE_STORAGE_ROOT": str(media), "CELERY_BROKER_URL": "",
           "DJANGO_SETTINGS_MODULE": "governance.settings", "PYTHONPATH": str(ROOT)}
    print(f"preparing {database} ({args.prepared} cases with evidence ready) ...", file=sys.stderr)
    setup = _prepare(env, args.prepared)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = media / "gunicorn.log"
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", str(args.workers), "-b", f"127.0.0.1:{port}",
                               "--timeout", "120", "governance.wsgi:application"], cwd=ROOT, env=env,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        import requests

        for _ in range(120):
            try:
                if requests.get(base + "/healthz", timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        # Warm-up, not measured: each gunicorn worker imports the API, DRF and the probe registry (which
        # validates plans) on its first requests.
        _run_clients(args.workers * 2, _workflow_client,
                     lambda i: (base, setup, [], time.monotonic() + args.warmup_seconds, Recorder()))
        slices = [setup["ready"][i::args.clients] for i in range(args.clients)]
        load = Recorder()
        deadline = time.monotonic() + args.seconds
        elapsed = _run_clients(args.clients, _workflow_client, lambda i: (base, setup, slices[i], deadline, load))
        peer = Recorder()
        peer_deadline = time.monotonic() + args.peer_seconds
        peer_elapsed = _run_clients(args.clients, _peer_client, lambda i: (base, peer_deadline, peer))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "benchmark": "api_load", "clients": args.clients, "gunicorn_workers": args.workers,
        "cpus": os.cpu_count(), "load_average_1m_before": load_before, "load_average_1m": round(os.getloadavg()[0], 2),
        "workflow": load.summary(elapsed), "peer_healthz": peer.summary(peer_elapsed),
    }
    w, p = result["workflow"], result["peer_healthz"]
    result["p50_ratio_vs_healthz"] = round(w["p50_ms"] / p["p50_ms"], 2) if w["p50_ms"] and p["p50_ms"] else None
    print(f"{'mix':<10} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'5xx':>5}  statuses")
    for name, row in (("workflow", w), ("healthz", p)):
        print(f"{name:<10} {row['requests_per_second']!s:>8} {row['p50_ms']!s:>8} {row['p95_ms']!s:>8} "
              f"{row['http_5xx']:>5}  {row['statuses']}")
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if w["http_5xx"] or not w["requests"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

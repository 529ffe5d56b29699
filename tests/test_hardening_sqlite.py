"""Attack 7 (issue #20): concurrent approvals on the embedded default (a SQLite file, a threaded
server) wait for each other instead of failing with "database is locked".

A real server process on a fresh SQLite file, eight reviewers signing off the same case at the same
instant over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REVIEWERS = 8

SEED = f"""
import json, django
django.setup()
from django.contrib.auth.models import Group, User
from rest_framework.authtoken.models import Token
from governance import workflow
from governance.models import AIModel, AuditCase, Membership, ModelVersion, Organisation
from tests.actors import finish_run_with_evidence

org = Organisation.objects.create(name="Acme", slug="acme")
alice = User.objects.create_user("alice", password="x")
alice.groups.add(Group.objects.get(name="submitter"))
Membership.objects.create(user=alice, organisation=org)
ada = User.objects.create_user("ada", password="x", is_staff=True)
ada.groups.add(Group.objects.get(name="admin"))
model = AIModel.objects.create(organisation=org, name="m", provider_name="Acme", provider_contact="a@example.org",
                               intended_purpose="x", risk_category="minimal", created_by=alice)
version = ModelVersion.objects.create(ai_model=model, version="1", source="hub", hub_id="acme/m",
                                      hub_revision="a" * 40, created_by=alice)
case = AuditCase.objects.create(model_version=version, title="t", created_by=alice, required_approvals={REVIEWERS},
                                probe_plan=[{{"kind": "selftest", "params": {{}}}}])
reviewers = []
for i in range({REVIEWERS}):
    user = User.objects.create_user(f"r{{i}}", password="x")
    user.groups.add(Group.objects.get(name="reviewer"))
    reviewers.append(user)
workflow.assign_reviewers(case, reviewers, by=ada)
workflow.submit(case, by=alice)
workflow.start_runs(case)
finish_run_with_evidence(case, kind="selftest")
workflow.mark_evidence_ready(case)
print(json.dumps({{"case": case.pk, "tokens": [Token.objects.create(user=u).key for u in reviewers]}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def embedded_server(tmp_path):
    env = {**os.environ, "LOUPE_VAR_DIR": str(tmp_path / "var"), "DEBUG": "1", "DJANGO_SETTINGS_MODULE":
           "governance.settings", "PYTHONPATH": str(ROOT)}
    for key in ("DATABASE_URL", "CELERY_BROKER_URL", "LOUPE_CACHE_URL"):
        env.pop(key, None)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    seeded = subprocess.run([sys.executable, "-c", SEED], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    data = json.loads(seeded.stdout.strip().splitlines()[-1])
    port = free_port()
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", data, env
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_concurrent_approvals_wait_instead_of_failing(embedded_server):
    url, data, env = embedded_server
    barrier = threading.Barrier(REVIEWERS)
    results: list[tuple[int, str]] = [None] * REVIEWERS  # type: ignore[list-item]

    def approve(i: int) -> None:
        request = urllib.request.Request(
            f"{url}/api/cases/{data['case']}/signoff/", data=json.dumps({"decision": "approve"}).encode(),
            headers={"Authorization": f"Token {data['tokens'][i]}", "Content-Type": "application/json"}, method="POST")
        barrier.wait()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                results[i] = (response.status, "")
        except urllib.error.HTTPError as exc:
            results[i] = (exc.code, exc.read().decode()[:300])

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(REVIEWERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [201] * REVIEWERS, results
    state = subprocess.run([sys.executable, "-c", "import django; django.setup(); from governance.models import "
                            f"AuditCase; c = AuditCase.objects.get(pk={data['case']}); "
                            "print(c.state, c.signoffs.count())"],
                           cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert state == ["approved", str(REVIEWERS)]

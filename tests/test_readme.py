"""The README's own-model block, run as written, and the accounts commands it relies on.

The block is cut from README.md between its markers and executed by bash in a fresh directory that
looks like a clone (``manage.py`` and ``.venv`` linked from this checkout, ``var/`` empty), on a
tiny CLIP this test builds with transformers' config classes: a model directory the repository
never shipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- readme-own-model:begin -->", "<!-- readme-own-model:end -->"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the own-model block is a ```bash fence between the markers"
    return match.group(1)


def test_the_readme_own_model_block_runs_verbatim_on_a_model_the_repository_never_shipped(tmp_path):
    from tests.tiny_models import save_tiny_clip

    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("manage.py", "governance", "workers", "templates"):
        (clone / name).symlink_to(ROOT / name)
    # The project's interpreter, as `make install` leaves it (.venv), or this test's own.
    venv = ROOT / ".venv"
    (clone / ".venv").symlink_to(venv if (venv / "bin" / "python").exists() else Path(sys.executable).parent.parent)
    save_tiny_clip(clone / "var" / "models" / "acme-clip")
    (clone / "var" / "models" / "acme-clip" / "README.md").write_text(
        "---\nlicense: mit\n---\n# Acme CLIP\n\nTags product photos.\n", encoding="utf-8")
    script = clone / "own-model.sh"
    script.write_text("set -euo pipefail\n" + readme_block(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "CELERY_", "LOUPE_"))}
    env.update(LOUPE_VAR_DIR=str(clone / "var"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(["bash", str(script)], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"password for alice: \S{12,}", output), output[-2000:]
    assert "created reviewer 'ada'" in output
    assert "report v1 of case #1" in output
    assert "verified" in output.lower() or "ok" in output.lower()
    assert (clone / "loupe-case-1-export.zip").stat().st_size > 1000, "export_case wrote no bundle"
    summary = json.loads(subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "manage.py", "shell", "-c",
         "import json; from governance.models import AuditCase as C, Evidence as E; c = C.objects.get(pk=1); "
         "print(json.dumps({'state': c.state, 'runs': [r.status for r in c.runs.all()], "
         "'evidence': E.objects.filter(run__case=c).count()}))"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=True).stdout.strip().splitlines()[-1])
    assert summary == {"state": "evidence_ready", "runs": ["succeeded"], "evidence": 1}


@pytest.mark.django_db
def test_create_user_makes_a_submitter_who_can_log_in_in_a_new_organisation(capsys, monkeypatch):
    from django.contrib.auth import authenticate
    from django.test import RequestFactory

    from governance import access
    from governance.models import Organisation

    monkeypatch.delenv("LOUPE_NEW_PASSWORD", raising=False)
    call_command("create_user", "zoe", "--role", "submitter", "--organisation", "zeta-labs")
    out = capsys.readouterr().out
    password = re.search(r"password for zoe: (\S+)", out).group(1)
    user = authenticate(RequestFactory().post("/login/"), username="zoe", password=password)
    assert user is not None and access.roles_of(user) == {"submitter"} and not user.is_staff
    assert access.organisation_of(user) == Organisation.objects.get(slug="zeta-labs")


@pytest.mark.django_db
def test_create_user_takes_the_password_from_the_environment_and_never_prints_it(capsys, monkeypatch):
    from django.contrib.auth import authenticate
    from django.test import RequestFactory

    monkeypatch.setenv("LOUPE_NEW_PASSWORD", "correct-horse-battery-9")
    call_command("create_user", "rev", "--role", "reviewer")
    out = capsys.readouterr().out
    assert "correct-horse" not in out
    user = authenticate(RequestFactory().post("/login/"), username="rev", password="correct-horse-battery-9")
    assert user is not None and user.is_staff


@pytest.mark.django_db
def test_create_user_refuses_a_submitter_without_organisation_a_duplicate_and_a_weak_password(monkeypatch):
    monkeypatch.delenv("LOUPE_NEW_PASSWORD", raising=False)
    with pytest.raises(CommandError, match="--organisation"):
        call_command("create_user", "sam", "--role", "submitter")
    call_command("create_user", "sam", "--role", "auditor")
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_user", "sam", "--role", "auditor")
    monkeypatch.setenv("LOUPE_NEW_PASSWORD", "123")
    with pytest.raises(CommandError, match="LOUPE_NEW_PASSWORD is refused"):
        call_command("create_user", "tim", "--role", "admin")


def test_submit_model_parses_its_version_option_and_help():
    result = subprocess.run([sys.executable, "manage.py", "submit_model", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model-version" in result.stdout

"""Plain helpers the test modules import (fixtures are not imported: they live in ``tests/conftest.py``
and the plugin modules the root ``conftest.py`` registers): the test-only probe kind's name, users
with a role, a succeeded run with evidence, and an API client acting as a user."""

from __future__ import annotations

from django.contrib.auth.models import Group, User
from django.utils import timezone
from rest_framework.test import APIClient

TEST_KIND = "test.echo"


def create_user(username: str, role: str | None = None, organisation=None, **extra) -> User:
    from governance.models import Membership

    user = User.objects.create_user(username=username, password=f"{username}-pw-1234", email=f"{username}@example.org",
                                    **extra)
    if role:
        user.groups.add(Group.objects.get(name=role))
    if organisation is not None:
        Membership.objects.create(user=user, organisation=organisation)
    return user


def finish_run_with_evidence(case, *, kind: str = TEST_KIND, summary: str = "All good."):
    """Create a run for ``case`` with evidence and one artifact, then mark the run succeeded."""
    from governance.evidence import log_recorded
    from governance.models import Evidence, EvidenceArtifact, ProbeRun

    run = ProbeRun.objects.create(case=case, kind=kind, params={"n": 3}, status=ProbeRun.Status.RUNNING,
                                  started_at=timezone.now(), model_manifest_hash=case.model_version.manifest_hash,
                                  seed=0, device="cpu", code_version="test")
    evidence = Evidence.objects.create(run=run, kind=kind, metrics={"pointing_game": 0.8}, summary=summary,
                                       findings=[{"severity": "low", "title": "Slight colour bias", "detail": ""}])
    EvidenceArtifact.from_bytes(evidence, "scores.csv", b"image,score\n1,0.8\n", "text/csv")
    run.status = ProbeRun.Status.SUCCEEDED
    run.progress = 1.0
    run.finished_at = timezone.now()
    run.save()
    log_recorded(evidence)  # bound to the audit log by its content digest, as record_result does
    return run, evidence


def client_for(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client

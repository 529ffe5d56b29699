"""Shared by the pipeline and reliability tests: a tiny CLIP registered as an uploaded version, and
helpers to open a case and wait for it."""

from __future__ import annotations

import pytest

from governance import workflow
from governance.models import AuditCase, ModelVersion
from tests.model_archives import model_members, zip_bytes
from tests.realstack import wait_until
from tests.tiny_models import save_tiny_clip


@pytest.fixture
def tiny_clip_version(acme_model, alice):
    """An uploaded-archive version whose unpacked directory holds a tiny CLIP (where workers look)."""
    import tempfile
    from pathlib import Path

    from django.core.files.base import ContentFile

    from governance import artifacts

    with tempfile.TemporaryDirectory() as tmp:
        members = model_members(save_tiny_clip(Path(tmp) / "m"))
    version = ModelVersion(ai_model=acme_model, version="tiny", source=ModelVersion.Source.ARCHIVE, created_by=alice)
    version.archive.save("tiny-clip.zip", ContentFile(zip_bytes(members)), save=False)
    version.save()
    unpacked = artifacts.uploaded_model_directory(version)  # where an upload would be unpacked
    unpacked.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (unpacked / name).write_bytes(data)
    from workers.tasks import compute_manifest

    compute_manifest.apply(args=[version.pk])
    version.refresh_from_db()
    return version


def make_case(version, alice, ada, rita, rob, plan) -> AuditCase:
    case = AuditCase.objects.create(model_version=version, title="Tiny CLIP audit", created_by=alice,
                                    probe_plan=plan)
    workflow.assign_reviewers(case, [rita, rob], by=ada)
    workflow.submit(case, by=alice)
    return case


def wait_for_state(case: AuditCase, state: str, timeout: float = 90.0) -> AuditCase:
    wait_until(lambda: AuditCase.objects.get(pk=case.pk).state == state, timeout=timeout)
    case.refresh_from_db()
    return case

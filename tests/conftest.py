"""Shared actors and cases for the governance tests.

The cast (healthchecks style):

- ``alice``: submitter at Acme (registers Acme's model and submits its case);
- ``mallory``: submitter at Globex (another provider: must never see Acme's work);
- ``rita`` and ``rob``: independent reviewers (no organisation), assigned to Acme's case by ``ada``;
- ``ruth``: a reviewer who is *not* assigned to anything;
- ``audrey``: auditor (a regulator: sees everything, changes nothing);
- ``ada``: admin (the Loupe operator).

Cases: ``draft_case`` (Acme, draft, planned with the ``test.echo`` probe kind), ``case_with_evidence``
(walked through the workflow to ``evidence_ready`` with one succeeded run, its evidence and an
artifact, reviewers rita and rob). ``tamper(sql, params)`` runs raw SQL past the ORM guards and the
PostgreSQL immutability triggers, to simulate an attacker with database access.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import User
from django.db import connection

from tests.actors import TEST_KIND, create_user, finish_run_with_evidence
from workers.probes import suite


@pytest.fixture(autouse=True)
def local_worker_off():
    """Tests execute runs in the calling thread unless they turn the local background worker on.

    Importing ``governance.wsgi`` (the schema tests load the real WSGI app) enables that worker for
    the whole process, as the web process wants; left on, every later test's dispatch would return
    at once and its runs would finish in another thread, outside the test's transaction.
    """
    from workers import local

    local.disable()
    yield
    local.disable()
    assert local.wait_idle(120), "the local worker still had jobs two minutes after the test"


@pytest.fixture(scope="session")
def test_probe_kind() -> str:
    """A probe kind registered for tests only (real kinds import torch models; plans only need a name)."""

    from pydantic import ConfigDict

    from workers.probes import kinds

    class EchoParams(kinds.KindParams):
        model_config = ConfigDict(extra="allow")

    def echo(model_dir, dataset_dir, params, *, device, progress):  # pragma: no cover - never run here
        return suite.ProbeResult(kind=TEST_KIND, metrics=params.model_dump(), summary="echo")

    kinds.probe_kind(TEST_KIND, title="Echo (tests)", section=None, params=EchoParams, help="tests only")(echo)
    yield TEST_KIND
    kinds.unregister(TEST_KIND)


@pytest.fixture
def make_user(db) -> Callable[..., User]:
    """``make_user("name", "reviewer", organisation=None)``: a user with a role (group) and membership."""
    return create_user


@pytest.fixture
def acme(db):
    from governance.models import Organisation

    return Organisation.objects.create(name="Acme Vision", slug="acme", contact_email="ai@acme.example")


@pytest.fixture
def globex(db):
    from governance.models import Organisation

    return Organisation.objects.create(name="Globex", slug="globex", contact_email="ml@globex.example")


@pytest.fixture
def alice(acme):
    return create_user("alice", "submitter", acme)


@pytest.fixture
def mallory(globex):
    return create_user("mallory", "submitter", globex)


@pytest.fixture
def rita(db):
    return create_user("rita", "reviewer")


@pytest.fixture
def rob(db):
    return create_user("rob", "reviewer")


@pytest.fixture
def ruth(db):
    return create_user("ruth", "reviewer")


@pytest.fixture
def audrey(db):
    return create_user("audrey", "auditor")


@pytest.fixture
def ada(db):
    return create_user("ada", "admin", is_staff=True)


@pytest.fixture
def acme_model(alice, acme):
    from governance.models import AIModel

    return AIModel.objects.create(
        organisation=acme, name="Acme CLIP", provider_name="Acme Vision GmbH", provider_contact="ai@acme.example",
        intended_purpose="Zero-shot product photo tagging for an online shop.",
        modality=AIModel.Modality.IMAGE_TEXT, risk_category=AIModel.RiskCategory.LIMITED, created_by=alice)


@pytest.fixture
def acme_version(acme_model, alice):
    from governance.models import ModelVersion

    version = ModelVersion(ai_model=acme_model, version="1.0", source=ModelVersion.Source.HUB,
                           hub_id="acme/clip-tiny", hub_revision="a" * 40,
                           architecture_family=ModelVersion.Architecture.DUAL_ENCODER,
                           model_details="A tiny CLIP.", intended_uses="Tagging product photos.",
                           limitations="Trained on synthetic shapes.", created_by=alice)
    version.set_manifest({"config.json": "1" * 64, "model.safetensors": "2" * 64})
    version.save()
    return version


@pytest.fixture
def tiny_clip_version(acme_model, alice):
    """An uploaded-archive version whose unpacked directory holds a tiny CLIP (where workers look)."""
    import tempfile
    from pathlib import Path

    from django.core.files.base import ContentFile

    from governance import artifacts
    from governance.models import ModelVersion
    from tests.model_archives import model_members, zip_bytes
    from tests.tiny_models import save_tiny_clip

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


@pytest.fixture
def globex_case(mallory, globex, test_probe_kind):
    from governance.models import AIModel, AuditCase, ModelVersion

    model = AIModel.objects.create(organisation=globex, name="Globex BLIP", provider_name="Globex",
                                   provider_contact="ml@globex.example", intended_purpose="Captioning.",
                                   risk_category=AIModel.RiskCategory.MINIMAL, created_by=mallory)
    version = ModelVersion.objects.create(ai_model=model, version="2", source=ModelVersion.Source.HUB,
                                          hub_id="globex/blip", hub_revision="b" * 40, created_by=mallory)
    return AuditCase.objects.create(model_version=version, title="Globex BLIP audit", created_by=mallory,
                                    probe_plan=[{"kind": test_probe_kind, "params": {}}])


@pytest.fixture
def draft_case(acme_version, alice, test_probe_kind):
    from governance.models import AuditCase

    return AuditCase.objects.create(
        model_version=acme_version, title="Acme CLIP 1.0 grounding audit", scope="Grounding and bias.",
        probe_plan=[{"kind": test_probe_kind, "params": {"n": 3}, "dataset": "zoo:heldout"}], created_by=alice)


@pytest.fixture
def case_with_evidence(draft_case, alice, ada, rita, rob):
    """Acme's case, submitted by alice, probed, evidence ready; reviewers rita and rob."""
    from governance import workflow

    workflow.assign_reviewers(draft_case, [rita, rob], by=ada)
    workflow.submit(draft_case, by=alice)
    workflow.start_runs(draft_case)
    finish_run_with_evidence(draft_case)
    workflow.mark_evidence_ready(draft_case)
    return draft_case


@pytest.fixture
def tamper(db) -> Callable[[str, list | tuple], None]:
    """Run raw SQL as an attacker with database access would: past the ORM's immutability guards
    and, on PostgreSQL, past the triggers (``session_replication_role = replica`` skips them; the
    CI user is a superuser)."""

    def run(sql: str, params: list | tuple = ()) -> None:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(sql, params)
            if connection.vendor == "postgresql":
                cursor.execute("SET LOCAL session_replication_role = DEFAULT")

    return run

"""Seed a fresh database for the schemathesis run (.ci/schemathesis): an organisation, a submitter
and an admin with API tokens, a model, a version and a case whose evidence is ready, so the fuzzer
reaches real objects. Prints the admin's and the submitter's tokens as JSON."""

from __future__ import annotations

import json

import django

django.setup()

from django.contrib.auth.models import Group, User  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from governance import workflow  # noqa: E402
from governance.models import AIModel, AuditCase, Membership, ModelVersion, Organisation  # noqa: E402
from tests.actors import finish_run_with_evidence  # noqa: E402


def user(name: str, role: str, **extra) -> User:
    account = User.objects.create_user(name, password=f"{name}-pw-1234", email=f"{name}@example.org", **extra)
    account.groups.add(Group.objects.get(name=role))
    return account


org = Organisation.objects.create(name="Acme", slug="acme", contact_email="ai@acme.example")
alice = user("alice", "submitter")
Membership.objects.create(user=alice, organisation=org)
ada = user("ada", "admin", is_staff=True)
rita, rob = user("rita", "reviewer"), user("rob", "reviewer")
model = AIModel.objects.create(organisation=org, name="Acme CLIP", provider_name="Acme",
                               provider_contact="ai@acme.example", intended_purpose="Tagging photos.",
                               risk_category="minimal", created_by=alice)
version = ModelVersion.objects.create(ai_model=model, version="1.0", source="hub", hub_id="acme/clip",
                                      hub_revision="a" * 40, created_by=alice)
case = AuditCase.objects.create(model_version=version, title="Acme CLIP audit", created_by=alice,
                                probe_plan=[{"kind": "selftest", "params": {}}])
workflow.assign_reviewers(case, [rita, rob], by=ada)
workflow.submit(case, by=alice)
workflow.start_runs(case)
finish_run_with_evidence(case, kind="selftest")
workflow.mark_evidence_ready(case)
print(json.dumps({"admin": Token.objects.create(user=ada).key,  # noqa: T201 - the script's output
                  "submitter": Token.objects.create(user=alice).key}))

"""Shared by the pipeline and reliability tests: helpers to open a case on a version (the tiny CLIP of
the ``tiny_clip_version`` fixture in ``tests/conftest.py``) and wait for it."""

from __future__ import annotations

from governance import workflow
from governance.models import AuditCase
from tests.realstack import wait_until


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

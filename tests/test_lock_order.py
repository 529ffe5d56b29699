"""One lock order for every workflow path (governance/workflow.py ``LOCK_ORDER``), checked where row
locks exist: on PostgreSQL, with concurrent connections. SQLite serialises whole writers instead."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from governance import audit_log, workflow
from governance.models import AIModel, AuditCase, ModelVersion

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need PostgreSQL"),
    pytest.mark.django_db(transaction=True),
]


def in_thread(target, *args) -> list[BaseException]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the other transaction is blocked"
    return errors


def test_a_workflow_action_locks_the_case_row_only(case_with_evidence, rita):
    """Locking a case must not lock its model version or model: every other case of that version
    would wait for it, and a case insert (which takes the version's key-share lock) could deadlock."""
    def lock_version_and_model_nowait() -> None:
        with transaction.atomic():
            ModelVersion.objects.select_for_update(nowait=True).get(pk=case_with_evidence.model_version_id)
            AIModel.objects.select_for_update(nowait=True).get(pk=case_with_evidence.model_version.ai_model_id)

    with transaction.atomic():
        workflow.start_review(case_with_evidence, by=rita)  # holds the case lock until this block ends
        assert in_thread(lock_version_and_model_nowait) == []


def test_a_transaction_holding_the_chain_head_commits_while_a_case_is_locked(case_with_evidence, rita):
    """The deadlock of the load test: one transaction locks the case and then wants the audit chain
    head; another holds the head and, committing a row that references the case, checks its foreign
    key (a KEY SHARE lock on the case). With FOR UPDATE the two wait for each other; with the case
    locked FOR NO KEY UPDATE the second commits and the first goes on."""
    recorded = threading.Event()
    committed = threading.Event()

    def other_writer() -> None:
        with transaction.atomic():
            audit_log.record(None, "test.concurrent_write", AuditCase.objects.get(pk=case_with_evidence.pk), {})
            recorded.set()
        committed.set()

    with transaction.atomic():
        workflow.lock_case(case_with_evidence.pk)
        thread = threading.Thread(target=lambda: (other_writer(), connection.close()))
        thread.start()
        assert recorded.wait(10)
        assert committed.wait(5), "a commit referencing the locked case waits for the case lock"
        workflow.start_review(case_with_evidence, by=rita)  # takes the chain head next
    thread.join(10)
    case_with_evidence.refresh_from_db()
    assert case_with_evidence.state == AuditCase.State.IN_REVIEW
    assert audit_log.verify() == []

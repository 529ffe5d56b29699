"""Content digests: RFC 8785 canonical JSON, every bound row recomputed by ``verify_audit_log``, and
the migration that binds rows recorded before events carried digests."""

from __future__ import annotations

import importlib
import io

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from governance import evidence as ev
from governance.canonical import canonical_json
from governance.models import Evidence, Signoff
from tests.actors import finish_run_with_evidence

pytestmark = pytest.mark.django_db


def test_canonical_json_is_rfc8785():
    # RFC 8785 section 3.2.2 / appendix B: ES6 number forms, UTF-16 key order, no whitespace.
    assert canonical_json({"b": 1.0, "a": [1e-7, 1e21, -0.0, 0.5]}) == b'{"a":[1e-7,1e+21,0,0.5],"b":1}'
    assert canonical_json({"\u20ac": 1, "\r": 2, "1": 3}) == '{"\\r":2,"1":3,"\u20ac":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ValueError):
        canonical_json({"x": 2**60})  # not exactly representable for an RFC 8785 verifier
    assert ev.json_safe({"big": 2**60, "ok": 3}) == {"big": str(2**60), "ok": 3}


def _tamper(sql, params):
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(sql, params)
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = DEFAULT")


def test_a_sign_off_edited_in_the_database_is_named(case_with_evidence, rita):
    from governance import workflow

    signoff = workflow.sign_off(case_with_evidence, rita, "approve", "Heatmaps land on the objects.")
    assert ev.ledger_problems() == []
    _tamper(f"UPDATE {Signoff._meta.db_table} SET comment = %s WHERE id = %s", ["Nothing to add.", signoff.pk])
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("verify_audit_log", stdout=io.StringIO(), stderr=err)
    assert f"record: signoff #{signoff.pk}: its content digest" in err.getvalue()


def test_a_row_the_log_never_recorded_is_named(case_with_evidence):
    run, evidence = finish_run_with_evidence(case_with_evidence)
    legacy = Evidence.objects.create(run=type(run).objects.create(case=case_with_evidence, kind=run.kind,
                                                                  status="running"), kind=run.kind)
    assert ev.ledger_problems() == [f"evidence #{legacy.pk} ({run.kind}, run #{legacy.run_id}): not bound to the audit "
                                    "log: no evidence.recorded event records it"]


def test_the_migration_binds_rows_recorded_before_digests(case_with_evidence):
    run, _ = finish_run_with_evidence(case_with_evidence)
    legacy = Evidence.objects.create(run=type(run).objects.create(case=case_with_evidence, kind=run.kind,
                                                                  status="running"), kind=run.kind)
    assert len(ev.ledger_problems()) == 1
    migration = importlib.import_module("governance.migrations.0005_i19_countersignatures")
    from django.apps import apps

    migration._backfill(apps, None)
    assert ev.ledger_problems() == []
    recorded = ev.recorded_digests("evidence", [str(legacy.pk)])[str(legacy.pk)]
    assert recorded[1] == ev.content_digest(legacy)
    migration._backfill(apps, None)  # idempotent: rows already bound get no second event
    from governance.models import AuditEvent

    assert AuditEvent.objects.filter(action=ev.BACKFILL_ACTION).count() == 1


def test_the_api_refuses_a_report_from_edited_evidence_and_the_refusal_stays_logged(case_with_evidence, ada):
    from rest_framework.test import APIClient

    from governance.models import AuditEvent

    evidence = Evidence.objects.filter(run__case=case_with_evidence).first()
    _tamper(f"UPDATE {Evidence._meta.db_table} SET summary = %s WHERE id = %s", ["All findings resolved.", evidence.pk])
    client = APIClient()
    client.force_authenticate(ada)
    response = client.post(f"/api/cases/{case_with_evidence.pk}/reports/")
    assert response.status_code == 409 and response.json()["error"] == "immutable"
    assert f"evidence #{evidence.pk}" in response.json()["detail"]
    assert AuditEvent.objects.filter(action="report.refused", case=case_with_evidence).count() == 1
    assert not case_with_evidence.reports.exists()

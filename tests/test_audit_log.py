"""The hash-chained audit log: it verifies when intact and names the row when someone tampers."""

from __future__ import annotations

import io
import re
import threading

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pypdf import PdfReader

from governance import audit_log
from governance.canonical import sha256_hex
from governance.models import AuditChainHead, AuditEvent, ImmutableError

TABLE = AuditEvent._meta.db_table


@pytest.fixture
def five_events(alice, acme_model):
    return [audit_log.record(alice, "ai_model.updated", acme_model, {"step": i, "note": "<b>x</b> ü"})
            for i in range(1, 6)]


def kinds_and_seqs(problems):
    return [(p.kind, p.seq) for p in problems]


def test_it_chains_every_row_to_the_previous_one(five_events, acme):
    assert [e.seq for e in five_events] == [1, 2, 3, 4, 5]
    assert five_events[0].prev_hash == AuditEvent.GENESIS_HASH
    for before, after in zip(five_events, five_events[1:], strict=False):
        assert after.prev_hash == before.row_hash
    assert five_events[0].organisation_id == acme.pk and five_events[0].actor_label == "alice"
    head = AuditChainHead.objects.get()
    assert (head.seq, head.row_hash) == (5, five_events[-1].row_hash)
    assert audit_log.verify() == []


def test_it_reports_ok_from_the_command(five_events, capsys):
    call_command("verify_audit_log")
    out = capsys.readouterr().out
    assert f"audit log OK: 5 rows, head seq 5 {five_events[-1].row_hash}" in out


def test_it_detects_a_modified_payload_and_names_the_row(five_events, tamper, capsys):
    tamper(f"UPDATE {TABLE} SET payload = %s WHERE seq = 3", ['{"note":"nothing to see","step":3}'])
    assert kinds_and_seqs(audit_log.verify()) == [("modified", 3)]
    with pytest.raises(CommandError, match="audit log does NOT verify: 1 problem"):
        call_command("verify_audit_log")
    err = capsys.readouterr().err
    assert f"seq 3 (id {five_events[2].pk}): modified: its payload no longer matches its payload hash" in err


def test_it_reports_problems_as_json_for_machines(five_events, tamper, capsys):
    import json

    tamper(f"DELETE FROM {TABLE} WHERE seq = 2")
    with pytest.raises(CommandError):
        call_command("verify_audit_log", "--json")
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["rows"] == 4 and result["head"]["seq"] == 5
    assert result["problems"] == [{"kind": "deleted", "seq": 3, "id": five_events[2].pk,
                                   "message": "seq 2 was missing before this row"}]


def test_it_detects_a_modified_column(five_events, tamper):
    tamper(f"UPDATE {TABLE} SET actor_label = %s WHERE seq = 2", ["rita"])
    problems = audit_log.verify()
    assert kinds_and_seqs(problems) == [("modified", 2)]
    assert "no longer match its row hash" in problems[0].message


def test_it_detects_a_row_rewritten_with_recomputed_hashes(five_events, tamper):
    row = AuditEvent.objects.filter(seq=3).values(*audit_log.ROW_FIELDS).get()
    payload = '{"note":"rewritten","step":3}'
    row.update(payload=payload, payload_hash=sha256_hex(payload.encode()))
    row["row_hash"] = audit_log.row_hash_of(row)
    tamper(f"UPDATE {TABLE} SET payload = %s, payload_hash = %s, row_hash = %s WHERE seq = 3",
           [payload, row["payload_hash"], row["row_hash"]])
    problems = audit_log.verify()
    assert kinds_and_seqs(problems) == [("modified", 3)]
    assert "the next row (seq 4) was chained to a different version of it" in problems[0].message


def test_it_detects_a_deleted_row(five_events, tamper):
    tamper(f"DELETE FROM {TABLE} WHERE seq = 3")
    problems = audit_log.verify()
    assert kinds_and_seqs(problems) == [("deleted", 4)]
    assert problems[0].message == "seq 3 was missing before this row"


def test_it_detects_a_deleted_tail(five_events, tamper):
    tamper(f"DELETE FROM {TABLE} WHERE seq >= 4")
    problems = audit_log.verify()
    assert kinds_and_seqs(problems) == [("deleted", None)]
    assert "seq 4..5 were deleted" in problems[0].message


def _forge(seq: int, prev_hash: str, actor_label: str = "mallory") -> dict:
    payload = '{"forged":true}'
    row = {"seq": seq, "created_at": "2026-01-01T00:00:00.000000+00:00", "actor_id": None,
           "actor_label": actor_label, "action": "signoff.created", "object_type": "auditcase", "object_id": "1",
           "organisation_id": None, "case_id": None, "payload": payload,
           "payload_hash": sha256_hex(payload.encode()), "prev_hash": prev_hash}
    row["row_hash"] = audit_log.row_hash_of(row)
    return row


def _insert(tamper, row: dict) -> None:
    columns = [c for c in audit_log.ROW_FIELDS if c != "id"]
    tamper(f"INSERT INTO {TABLE} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
           [row[c] for c in columns])


def test_it_detects_a_row_appended_behind_record(five_events, tamper):
    forged = _forge(6, five_events[-1].row_hash)  # perfectly chained, but the head never saw it
    _insert(tamper, forged)
    assert kinds_and_seqs(audit_log.verify()) == [("inserted", 6)]


def test_it_detects_a_row_inserted_in_the_middle(five_events, tamper):
    tamper(f"UPDATE {TABLE} SET seq = seq + 100 WHERE seq >= 3")
    tamper(f"UPDATE {TABLE} SET seq = seq - 99 WHERE seq >= 103")
    _insert(tamper, _forge(3, "f" * 64))
    problems = audit_log.verify()
    assert ("inserted", 3) in kinds_and_seqs(problems)
    assert "not linked into the chain" in next(p for p in problems if p.kind == "inserted").message
    # The rows pushed down are named too: they were written at other places in the chain.
    assert {("reordered", 4), ("reordered", 5), ("reordered", 6)} <= set(kinds_and_seqs(problems))


def test_it_detects_reordered_rows(five_events, tamper):
    tamper(f"UPDATE {TABLE} SET seq = 99 WHERE seq = 2")
    tamper(f"UPDATE {TABLE} SET seq = 2 WHERE seq = 3")
    tamper(f"UPDATE {TABLE} SET seq = 3 WHERE seq = 99")
    problems = audit_log.verify()
    assert kinds_and_seqs(problems) == [("reordered", 2), ("reordered", 3)]
    assert problems[0].message == "it was written as seq 3 and now sits at seq 2"


def test_it_refuses_changes_through_the_orm(five_events):
    event = AuditEvent.objects.get(seq=2)
    event.actor_label = "rita"
    with pytest.raises(ImmutableError):
        event.save()
    with pytest.raises(ImmutableError):
        event.delete()
    with pytest.raises(ImmutableError):
        AuditEvent.objects.filter(seq=2).update(actor_label="rita")
    with pytest.raises(ImmutableError):
        AuditEvent.objects.all().delete()
    with pytest.raises(ImmutableError):
        AuditEvent.objects.create(seq=6, created_at=event.created_at, actor_label="x", action="x", object_type="x",
                                  payload="{}", payload_hash="0", prev_hash="1", row_hash="2")
    assert audit_log.verify() == []


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL triggers exist on PostgreSQL only")
def test_it_refuses_raw_sql_changes_on_postgresql(five_events):
    from django.db import IntegrityError

    for sql in (f"UPDATE {TABLE} SET actor_label = 'rita' WHERE seq = 2", f"DELETE FROM {TABLE} WHERE seq = 5"):
        with pytest.raises(IntegrityError, match="immutable"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert audit_log.verify() == []


def test_it_verifies_a_case_excerpt_without_the_database(case_with_evidence):
    rows = audit_log.excerpt(case_with_evidence)
    assert [r["action"] for r in rows][:2] == ["case.reviewers_assigned", "case.submitted"]
    assert audit_log.verify_excerpt(rows) == []
    rows[1]["payload"] = rows[1]["payload"].replace("submitted", "approved")
    assert kinds_and_seqs(audit_log.verify_excerpt(rows)) == [("modified", rows[1]["seq"])]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs concurrent connections (PostgreSQL)")
@pytest.mark.django_db(transaction=True)
def test_it_keeps_one_chain_under_concurrent_writers(acme):
    barrier = threading.Barrier(4)
    errors = []

    def write(n):
        try:
            barrier.wait()
            for i in range(5):
                with transaction.atomic():
                    audit_log.record(None, "test.concurrent", acme, {"writer": n, "i": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(AuditEvent.objects.values_list("seq", flat=True)) == list(range(1, 21))
    assert audit_log.verify() == []


# --- any single tampering of an in-memory chain is detected and located (no database needed) ------


def _chain(n: int) -> list[dict]:
    rows, prev = [], AuditEvent.GENESIS_HASH
    for i in range(1, n + 1):
        payload = f'{{"i":{i}}}'
        row = {"id": i, "seq": i, "created_at": f"2026-01-01T00:00:{i:02d}.000000+00:00", "actor_id": 7,
               "actor_label": "alice", "action": "demo", "object_type": "auditcase", "object_id": "1",
               "organisation_id": 1, "case_id": 1, "payload": payload,
               "payload_hash": sha256_hex(payload.encode()), "prev_hash": prev}
        row["row_hash"] = audit_log.row_hash_of(row)
        rows.append(row)
        prev = row["row_hash"]
    return rows


@hypothesis_settings(max_examples=150, deadline=None)
@given(n=st.integers(3, 12), data=st.data())
def test_it_detects_and_locates_any_single_tampering(n, data):
    rows = _chain(n)
    assert audit_log.verify_rows(rows, head_seq=n, head_hash=rows[-1]["row_hash"]) == []
    k = data.draw(st.integers(0, n - 1), label="row")
    op = data.draw(st.sampled_from(["payload", "column", "delete", "swap", "append", "truncate"]), label="op")
    head_seq, head_hash = n, rows[-1]["row_hash"]
    if op == "payload":
        rows[k]["payload"] = '{"i":-1}'
        expected = {rows[k]["seq"]}
    elif op == "column":
        rows[k]["actor_label"] = "mallory"
        expected = {rows[k]["seq"]}
    elif op == "delete":
        deleted = rows.pop(k)
        expected = {deleted["seq"] + 1} if k < n - 1 else {None}
    elif op == "swap":
        k = min(k, n - 2)
        rows[k]["seq"], rows[k + 1]["seq"] = rows[k + 1]["seq"], rows[k]["seq"]
        rows.sort(key=lambda r: r["seq"])
        expected = {k + 1, k + 2}
    elif op == "append":
        forged = dict(rows[-1], id=n + 1, seq=n + 1, prev_hash=rows[-1]["row_hash"], actor_label="mallory")
        forged["row_hash"] = audit_log.row_hash_of(forged)
        rows.append(forged)
        expected = {n + 1}
    else:  # truncate the tail
        rows = rows[:k + 1] if k < n - 1 else rows[:-1]
        expected = {None}
    problems = audit_log.verify_rows(rows, head_seq=head_seq, head_hash=head_hash)
    assert problems, op
    assert {p.seq for p in problems} & expected, (op, k, [str(p) for p in problems])


def rewrite_consistently(tamper, seq: int, payload: str) -> None:
    """What ``verify`` cannot catch by design: row ``seq`` rewritten and every later row and the
    chain head re-hashed, as someone with write access to the database could."""
    prev = AuditEvent.objects.filter(seq=seq - 1).values_list("row_hash", flat=True).first() or AuditEvent.GENESIS_HASH
    for row in AuditEvent.objects.filter(seq__gte=seq).order_by("seq").values(*audit_log.ROW_FIELDS):
        if row["seq"] == seq:
            row.update(payload=payload, payload_hash=sha256_hex(payload.encode()))
        row["prev_hash"] = prev
        row["row_hash"] = prev = audit_log.row_hash_of(row)
        tamper(f"UPDATE {TABLE} SET payload = %s, payload_hash = %s, prev_hash = %s, row_hash = %s WHERE seq = %s",
               [row["payload"], row["payload_hash"], row["prev_hash"], row["row_hash"], row["seq"]])
    tamper(f"UPDATE {AuditChainHead._meta.db_table} SET row_hash = %s", [prev])


@pytest.mark.slow
def test_it_anchors_the_head_in_each_issued_report_and_catches_a_consistent_rewrite(case_with_evidence, ada, tamper):
    from governance.reports import generate_report
    from governance.reports.manifest import check_against_database, extract_from_pdf

    head_before = audit_log.anchor()
    report = generate_report(case_with_evidence, author=ada, sign=False)
    with report.pdf.open("rb") as handle:
        pdf = handle.read()
    manifest = extract_from_pdf(pdf)
    cover = re.sub(r"\s+", "", PdfReader(io.BytesIO(pdf)).pages[0].extract_text())
    assert "Auditlogatissue" in cover and head_before["row_hash"][:32] in cover  # printed for a human reader too
    # the head as of issue is in the embedded (hashed) manifest, and report.issued is the next row
    assert manifest["audit_log"] == head_before == report.manifest["audit_log"]
    issued = AuditEvent.objects.get(action="report.issued", object_id=str(report.pk))
    assert issued.seq == head_before["seq"] + 1 and issued.prev_hash == head_before["row_hash"]
    assert check_against_database(manifest) == ([], [])

    rewrite_consistently(tamper, 2, '{"rewritten":true}')
    assert audit_log.verify() == []  # internally consistent: the log alone cannot tell
    problems, _ = check_against_database(manifest)
    assert len(problems) == 1 and problems[0].startswith(f"audit log: seq {head_before['seq']} (id None): head:")
    assert "was rewritten" in problems[0]


def test_it_reports_an_unreadable_or_missing_anchor(five_events):
    assert audit_log.check_anchor({"seq": "x"})[0].kind == "head"
    (problem,) = audit_log.check_anchor({"seq": 99, "row_hash": "0" * 64})
    assert "that row is gone" in problem.message
    assert audit_log.check_anchor(audit_log.anchor()) == []

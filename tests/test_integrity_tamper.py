"""The tamper suite: each forgery an assessor would try, and the command that must catch it.

Two signed reports are issued once per module (rendering takes seconds): v1 of an approved case
and v1 of a case a reviewer rejected, signed with a development CA's keys (the ``env``, ``issued``
and ``keys`` fixtures of ``tests/signing_fixtures.py``). Each test works on copies of the files; the
database changes of a test are rolled back after it.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from pyhanko import stamp
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from governance import audit_log
from governance.canonical import sha256_hex
from governance.models import AuditChainHead, AuditEvent, Evidence
from governance.reports import render_case, signing
from tests.signing_fixtures import reviewer_signer

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def verify_report(path) -> tuple[bool, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out, stderr=err)
    except CommandError:
        return False, out.getvalue() + err.getvalue()
    return True, out.getvalue() + err.getvalue()


def test_the_genuine_reports_verify_naming_signer_and_role(env):
    ok, out = verify_report(env["paths"]["approved"])
    assert ok, out
    assert "signature Loupe-issuer: OK · issuer · Loupe report issuer (development)" in out
    assert "revision 1: the issued report v1" in out


def test_one_flipped_byte_fails(env, tmp_path):
    data = bytearray(env["paths"]["approved"].read_bytes())
    data[len(data) // 3] ^= 0x01
    path = tmp_path / "flipped.pdf"
    path.write_bytes(bytes(data))
    ok, out = verify_report(path)
    assert not ok
    assert "changed after signing" in out or "could not be parsed" in out or "hashes to" in out, out


def test_an_appended_revision_changing_the_title_fails_even_when_a_reviewer_countersigns_it(env, tmp_path):
    # pyHanko's own modification policy accepts /Info changes after a signature; Loupe's does not.
    writer = IncrementalPdfFileWriter(io.BytesIO(env["paths"]["approved"].read_bytes()), strict=False)
    info = writer.trailer["/Info"]
    info[generic.NameObject("/Title")] = generic.TextStringObject("Acme CLIP 1.0: APPROVED, no findings")
    writer.update_container(info)
    retitled = io.BytesIO()
    writer.write(retitled)
    alone = tmp_path / "retitled.pdf"
    alone.write_bytes(retitled.getvalue())
    ok, out = verify_report(alone)
    assert not ok and "appended after the last signature" in out, out

    countersigned = tmp_path / "retitled-countersigned.pdf"
    countersigned.write_bytes(signing.sign_pdf(retitled.getvalue(), reviewer_signer(env["keys"], "rita"),
                                               role="reviewer", reason="countersigned"))
    ok, out = verify_report(countersigned)
    assert not ok
    assert "revision 3 changes the document information dictionary (" in out and "/Title" in out, out


def test_a_reviewer_key_forging_approved_over_a_rejected_report_fails(env, tmp_path):
    writer = IncrementalPdfFileWriter(io.BytesIO(env["paths"]["rejected"].read_bytes()), strict=False)
    style = stamp.TextStampStyle(stamp_text="APPROVED", border_width=3)
    stamp.TextStamp(writer, style).apply(0, 150, 600)  # on the cover
    stamp.TextStamp(writer, style).apply(1, 150, 600)  # on the summary page
    meta = signers.PdfSignatureMetadata(field_name="Loupe-issuer-1", subfilter=fields.SigSeedSubFilter.PADES,
                                        md_algorithm="sha256", reason="Loupe report issued")
    forged = tmp_path / "forged-approved.pdf"
    forged.write_bytes(signers.sign_pdf(writer, meta, signer=reviewer_signer(env["keys"], "rob")).getvalue())
    ok, out = verify_report(forged)
    assert not ok
    assert "revision 3 changes object" in out and "Page" in out, out  # the overlay is found ...
    assert "rob is not a reviewer of this case who approved it" in out, out  # ... and the signer has no standing
    assert "not a countersignature recorded by Loupe" in out, out


def test_another_render_signed_from_scratch_with_a_reviewer_key_fails(env, tmp_path):
    rendered, _ = render_case(env["rejected_case"], version=1, report_meta={"supersedes": None})
    forged = tmp_path / "rerendered.pdf"
    forged.write_bytes(signing.sign_pdf(rendered.pdf, reviewer_signer(env["keys"], "rita"), role="issuer",
                                        reason="Loupe report v1 issued"))
    ok, out = verify_report(forged)
    assert not ok
    assert "the first signature was not made with Loupe's issuer certificate" in out, out
    assert f"not to the SHA-256 stored for report v1 ({env['rejected'].sha256})" in out, out


def test_a_report_claiming_to_supersede_a_version_it_does_not_fails(env, tmp_path):
    # Rendered from the same case state with a forged change log, signed with the issuer's own key.
    rendered, _ = render_case(env["case"], version=1, report_meta={
        "supersedes": 3, "changelog": [{"change": "state_changed", "detail": "Findings withdrawn."}]},
        audit_anchor=env["approved"].manifest.get("audit_log"))
    forged = tmp_path / "changelog.pdf"
    forged.write_bytes(signing.sign_pdf(rendered.pdf, signing.load_signer(*signing.configured_signer_paths()),
                                        role="issuer", reason="Loupe report v1 issued"))
    ok, out = verify_report(forged)
    assert not ok
    assert "the report claims to supersede v3 but v1 of case" in out, out
    assert "the embedded manifest differs from the one stored for report v1" in out, out


def _tamper(sql, params=()):
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")  # past the immutability triggers
        cursor.execute(sql, params)
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = DEFAULT")


def test_a_direct_database_edit_of_one_evidence_metric_is_caught_and_refused(env):
    call_command("verify_audit_log", stdout=io.StringIO(), stderr=io.StringIO())  # sound before
    evidence = Evidence.objects.filter(run__case=env["case"]).first()
    metrics = dict(evidence.metrics)
    metrics["methods"][0]["pointing_game"] = 0.99
    _tamper(f"UPDATE {Evidence._meta.db_table} SET metrics = %s WHERE id = %s", [json.dumps(metrics), evidence.pk])

    err = io.StringIO()
    with pytest.raises(CommandError, match="1 record"):
        call_command("verify_audit_log", stdout=io.StringIO(), stderr=err)
    assert f"evidence #{evidence.pk} (grounding, run #{evidence.run_id}): its content digest" in err.getvalue()
    assert "the row was changed after it was recorded" in err.getvalue()

    with pytest.raises(CommandError, match=f"refusing to issue a report for case #{env['case'].pk}: evidence "
                                           f"#{evidence.pk}"):
        call_command("generate_report", str(env["case"].pk), "--author", "ada", stdout=io.StringIO())
    refusal = AuditEvent.objects.filter(action="report.refused", case=env["case"]).last()
    assert refusal is not None and f"evidence #{evidence.pk}" in refusal.payload
    assert env["case"].reports.count() == 1


def test_an_audit_log_rewritten_with_every_later_hash_recomputed_fails_verify_report(env):
    # Rewrite rob's... rita's approval comment on the approved case, then re-hash every later row and the head.
    target = AuditEvent.objects.filter(action="signoff.created", case=env["case"]).first()
    payload = json.loads(target.payload) | {"comment": "Approved without reservations."}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    prev = AuditEvent.objects.filter(seq=target.seq - 1).values_list("row_hash", flat=True).first()
    for row in AuditEvent.objects.filter(seq__gte=target.seq).order_by("seq").values(*audit_log.ROW_FIELDS):
        if row["seq"] == target.seq:
            row.update(payload=text, payload_hash=sha256_hex(text.encode()))
        row["prev_hash"] = prev
        row["row_hash"] = prev = audit_log.row_hash_of(row)
        _tamper(f"UPDATE {AuditEvent._meta.db_table} SET payload = %s, payload_hash = %s, prev_hash = %s, "
                "row_hash = %s WHERE seq = %s",
                [row["payload"], row["payload_hash"], row["prev_hash"], row["row_hash"], row["seq"]])
    _tamper(f"UPDATE {AuditChainHead._meta.db_table} SET row_hash = %s", [prev])
    assert audit_log.verify() == []  # internally consistent: the log alone cannot tell

    ok, out = verify_report(env["paths"]["approved"])
    assert not ok
    assert "audit log:" in out and "the log up to there was rewritten" in out, out


def test_a_manifest_altered_inside_the_pdf_is_reported_not_a_crash(env):
    """The embedded manifest is input under verification: an artifact entry that lost its SHA-256
    (one flipped byte in its key) is a finding, as is any other malformed entry."""
    from governance.reports import manifest as mf

    manifest = mf.extract_from_pdf(env["paths"]["approved"].read_bytes())
    artifact = next(a for e in manifest["evidence"] for a in e.get("artifacts", []))
    artifact["sha257"] = artifact.pop("sha256")
    assert any("gives no SHA-256" in p for p in mf.check_artifact_files(manifest))
    del manifest["report"]
    ok, out = verify_report_from_manifest(manifest, env)
    assert not ok and "manifest: malformed" in out, out


def verify_report_from_manifest(manifest, env):
    """verify_report_pdf on the approved report with its embedded manifest replaced (in memory)."""
    from unittest import mock

    from governance.reports import manifest as mf
    from governance.reports.verification import verify_report_pdf

    with mock.patch.object(mf, "extract_from_pdf", return_value=manifest):
        result = verify_report_pdf(env["paths"]["approved"].read_bytes())
    return not result.problems, "\n".join(result.problems)

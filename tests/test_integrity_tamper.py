"""The tamper suite: each forgery an assessor would try, and the command that must catch it.

Two signed reports are issued once per module (rendering takes seconds): v1 of an approved case
and v1 of a case a reviewer rejected. Keys: a development CA, the issuer, and reviewers rita and rob
(``make_signing_key``). Each test works on copies of the files; the database changes of a test are
rolled back after it.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import override_settings
from pyhanko import stamp
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from governance import audit_log, workflow
from governance.canonical import sha256_hex
from governance.models import AuditChainHead, AuditEvent, Evidence
from governance.reports import generate_report, render_case, signing
from tests.test_reports import _acme_case

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("signing")
    with override_settings(LOUPE_SIGNING_DIR=directory):
        call_command("make_signing_key", stdout=io.StringIO())
        call_command("make_signing_key", "--name", "Rita Reviewer", "--slug", "rita", stdout=io.StringIO())
        call_command("make_signing_key", "--name", "Rob Reviewer", "--slug", "rob", stdout=io.StringIO())
    return directory


def signing_settings(keys, **extra):
    return override_settings(LOUPE_SIGNING_KEY=str(keys / "issuer-key.pem"),
                             LOUPE_SIGNING_CERT=str(keys / "issuer-cert.pem"),
                             LOUPE_SIGNING_CA_CHAIN=[str(keys / "dev-ca-cert.pem")],
                             LOUPE_SIGNING_TRUST_ROOTS=[str(keys / "dev-ca-cert.pem")], **extra)


@pytest.fixture(scope="module")
def issued(django_db_setup, django_db_blocker, keys, tmp_path_factory, test_probe_kind):
    """Signed v1 of an approved case and signed v1 of a rejected one (rita approved, rob rejected)."""
    tmp = tmp_path_factory.mktemp("issued")
    with django_db_blocker.unblock(), signing_settings(keys), override_settings(MEDIA_ROOT=str(tmp / "media")):
        with transaction.atomic():
            case, actors = _acme_case(("grounding",))
            approved = generate_report(case, author=actors["ada"])
            rejected_case, _ = _rejected_case(actors)
            rejected = generate_report(rejected_case, author=actors["ada"])
            paths = {}
            for name, report in (("approved", approved), ("rejected", rejected)):
                paths[name] = tmp / f"{name}.pdf"
                paths[name].write_bytes(report.pdf.open("rb").read())
            yield {"paths": paths, "tmp": tmp, "case": case, "rejected_case": rejected_case, "actors": actors,
                   "approved": approved, "rejected": rejected, "keys": keys}
            transaction.set_rollback(True)


def _rejected_case(actors):
    from governance.models import AuditCase
    from tests.report_fixtures import populate

    case = AuditCase.objects.create(model_version=AuditCase.objects.first().model_version, title="Acme CLIP 1.0 re-audit",
                                    scope="Full plan.", probe_plan=[{"kind": "grounding", "params": {}}],
                                    created_by=actors["alice"])
    populate(case, submitter=actors["alice"], reviewers=[actors["rita"], actors["rob"]], admin=actors["ada"],
             kinds=("grounding",), approve=False)
    from governance import acceptance

    # An approval must give a reason for each open high/medium finding the case's criteria derive.
    reasons = {f["key"]: "Known for this method; not relied on." for f in acceptance.open_findings(case)}
    workflow.sign_off(case, actors["rita"], "approve", "Looks fine to me.", acknowledgements=reasons)
    workflow.sign_off(case, actors["rob"], "reject", "The watermark shortcut disqualifies this model.")
    case.refresh_from_db()
    assert case.state == "rejected"
    return case, actors


@pytest.fixture
def env(issued, keys, settings):
    with signing_settings(keys), override_settings(MEDIA_ROOT=str(issued["tmp"] / "media")):
        yield issued


def verify_report(path) -> tuple[bool, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out, stderr=err)
    except CommandError:
        return False, out.getvalue() + err.getvalue()
    return True, out.getvalue() + err.getvalue()


def reviewer_signer(keys, slug):
    return signing.load_signer(keys / f"{slug}-key.pem", keys / f"{slug}-cert.pem",
                               ca_chain=[keys / "dev-ca-cert.pem"])


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

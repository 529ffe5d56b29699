"""PAdES B-T: with ``LOUPE_TSA_URL`` set, every signature carries an RFC 3161 timestamp from that
authority (a local TSA the test starts), which ``verify_report`` validates and prints. B-LTA:
``archive_report`` adds the validation data and a document timestamp, still PDF/A-3b and verifying."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from governance.models import Report
from governance.reports import generate_report, signing
from loupe_verify.pdfa import pdfa3b_problems
from tests.report_fixtures import acme_case
from tests.signing_fixtures import signing_settings
from tests.tsa_server import LocalTSA

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture(scope="module")
def tsa_keys(keys):
    signing.make_development_tsa(keys)
    return keys


def test_reports_and_countersignatures_carry_a_verified_timestamp(tsa_keys, tmp_path, test_probe_kind):
    keys = tsa_keys
    tsa = LocalTSA(keys / "tsa-key.pem", keys / "tsa-cert.pem", keys / "dev-ca-cert.pem")
    with tsa as url, signing_settings(keys, LOUPE_TSA_URL=url), override_settings(MEDIA_ROOT=str(tmp_path)):
        case, actors = acme_case(("grounding",))
        report = generate_report(case, author=actors["ada"])
        issued = report.pdf.open("rb").read()
        countersigned = signing.sign_pdf(issued, signing.load_signer(keys / "rita-key.pem", keys / "rita-cert.pem"),
                                         role="reviewer", reason="countersigned")
        from governance.reports.countersign import countersign

        countersign(report, actors["rita"], countersigned)
        path = tmp_path / "countersigned.pdf"
        path.write_bytes(countersigned)
        out = io.StringIO()
        call_command("verify_report", str(path), stdout=out, stderr=io.StringIO())
        archived = tmp_path / "archived.pdf"
        call_command("archive_report", str(path), str(archived), stdout=io.StringIO())
        archived_out = io.StringIO()
        call_command("verify_report", str(archived), stdout=archived_out, stderr=io.StringIO())
    assert tsa.requests >= 2  # pyHanko also asks once per signature to size the signature field
    lines = [line for line in out.getvalue().splitlines() if line.startswith("signature ")]
    assert len(lines) == 2 and all("· timestamp 20" in line for line in lines), out.getvalue()
    assert pdfa3b_problems(countersigned) == []
    # B-LTA: a document security store and a document timestamp over everything, still PDF/A-3b.
    data = archived.read_bytes()
    assert data.startswith(countersigned) and b"/DSS" in data[len(countersigned):]
    assert pdfa3b_problems(data) == []
    text = archived_out.getvalue()
    assert "· timestamp · Loupe development TSA" in text and "all 3 signature(s) and the manifest verify" in text


def test_an_unreachable_timestamp_authority_issues_nothing(tsa_keys, tmp_path, test_probe_kind):
    with signing_settings(tsa_keys, LOUPE_TSA_URL="http://127.0.0.1:9/tsa", LOUPE_TSA_TIMEOUT=2), \
            override_settings(MEDIA_ROOT=str(tmp_path)):
        case, actors = acme_case(("grounding",))
        with pytest.raises(Exception, match="(?i)timestamp|connect|refused"):
            generate_report(case, author=actors["ada"])
    assert not Report.objects.filter(case=case).exists()
    assert not list((tmp_path / "reports").rglob("*.pdf")) if (tmp_path / "reports").exists() else True


def test_a_timestamp_from_an_untrusted_authority_fails_verification(tsa_keys, tmp_path, tmp_path_factory,
                                                                   test_probe_kind):
    other = tmp_path_factory.mktemp("other-tsa")
    signing.make_development_tsa(other)  # under another development CA
    tsa = LocalTSA(other / "tsa-key.pem", other / "tsa-cert.pem", other / "dev-ca-cert.pem")
    with tsa as url, signing_settings(tsa_keys, LOUPE_TSA_URL=url), override_settings(MEDIA_ROOT=str(tmp_path)):
        case, actors = acme_case(("grounding",))
        report = generate_report(case, author=actors["ada"])
        path = tmp_path / "v1.pdf"
        path.write_bytes(report.pdf.open("rb").read())
        err = io.StringIO()
        with pytest.raises(CommandError):
            call_command("verify_report", str(path), stdout=io.StringIO(), stderr=err)
    assert "its timestamp token does not verify or is not trusted" in err.getvalue()

"""Signing fixtures shared by the report-integrity tests (a pytest plugin module: the root ``conftest.py``
registers it, so test modules request these by name and import nothing from each other).

``keys``: a development CA, the issuer, and reviewers rita and rob (``make_signing_key``), once per
module. ``issued``: signed v1 of an approved case and signed v1 of a case a reviewer rejected, rendered
once per module (rendering takes seconds) inside a transaction that is rolled back. ``env``: the
issued reports with the signing settings and media root in force for one test.
"""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings

from governance import acceptance, workflow
from governance.models import AuditCase
from governance.reports import generate_report, signing
from tests.report_fixtures import acme_case, populate


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
    with (django_db_blocker.unblock(), signing_settings(keys), override_settings(MEDIA_ROOT=str(tmp / "media")),
          transaction.atomic()):
        case, actors = acme_case(("grounding",))
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
    case = AuditCase.objects.create(model_version=AuditCase.objects.get(title="Acme CLIP 1.0 audit").model_version,
                                    title="Acme CLIP 1.0 re-audit", scope="Full plan.",
                                    probe_plan=[{"kind": "grounding", "params": {}}], created_by=actors["alice"])
    populate(case, submitter=actors["alice"], reviewers=[actors["rita"], actors["rob"]], admin=actors["ada"],
             kinds=("grounding",), approve=False)
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


def reviewer_signer(keys, slug):
    return signing.load_signer(keys / f"{slug}-key.pem", keys / f"{slug}-cert.pem",
                               ca_chain=[keys / "dev-ca-cert.pem"])

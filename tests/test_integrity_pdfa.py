"""Issued reports stay PDF/A-3b after signing and countersigning, and are tagged.

The checks (:mod:`loupe_verify.pdfa`) name the ISO 19005-3 clause each problem breaks. They run on
every file the tamper suite's module issues (approved and rejected v1, each countersigned), and on
files signed the way pyHanko does by default, which they must reject.
"""

from __future__ import annotations

import io

import pytest
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from governance.reports import signing
from loupe_verify.pdfa import is_tagged, pdfa3b_problems
from tests.signing_fixtures import reviewer_signer

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.mark.parametrize("name", ["approved", "rejected"])
def test_every_issued_and_countersigned_file_is_pdfa3b_and_tagged(env, name):
    issued_pdf = env["paths"][name].read_bytes()
    countersigned = signing.sign_pdf(issued_pdf, reviewer_signer(env["keys"], "rita"), role="reviewer",
                                     reason="countersigned")
    twice = signing.sign_pdf(countersigned, reviewer_signer(env["keys"], "rob"), role="reviewer", reason="again")
    for pdf in (issued_pdf, countersigned, twice):
        assert pdfa3b_problems(pdf) == []
        assert is_tagged(pdf)
    assert b"/Version /2.0" not in twice and b"ISO_" not in twice


def test_the_checks_catch_what_pyhankos_default_signing_breaks(env):
    writer = IncrementalPdfFileWriter(io.BytesIO(env["paths"]["approved"].read_bytes()), strict=False)
    meta = signers.PdfSignatureMetadata(field_name="Plain", subfilter=fields.SigSeedSubFilter.PADES,
                                        md_algorithm="sha256")
    plain = signers.sign_pdf(writer, meta, signer=reviewer_signer(env["keys"], "rita")).getvalue()
    problems = pdfa3b_problems(plain)
    assert any(p.startswith("ISO 19005-3 6.1.2: the catalog declares /Version /2.0") for p in problems), problems
    assert any(p.startswith("ISO 19005-3 6.1.2: developer extension") for p in problems), problems
    assert any(p.startswith("ISO 19005-3 6.6.2.3.1: document information /Producer") for p in problems), problems


def test_the_checks_catch_a_missing_output_intent_and_a_duplicated_associated_file(env):
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import ArrayObject, NameObject

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(env["paths"]["approved"].read_bytes())))
    root = writer._root_object
    del root[NameObject("/OutputIntents")]
    root[NameObject("/AF")] = ArrayObject(list(root["/AF"]) * 2)
    out = io.BytesIO()
    writer.write(out)
    problems = pdfa3b_problems(out.getvalue())
    assert "ISO 19005-3 6.2.3: no /GTS_PDFA1 output intent with an embedded ICC profile" in problems
    assert "ISO 19005-3 6.8: the catalog's /AF lists an associated file more than once" in problems

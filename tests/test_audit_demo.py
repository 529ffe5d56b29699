"""``manage.py audit_demo``'s countersigning: only reviewers who approved a case countersign its report,
each countersignature recorded before the next reviewer signs.

The demo rejects the shortcut case (one reviewer rejects it); countersigning its report as that
reviewer is refused by ``sign_report``. For an approved case, a second reviewer signing a copy whose
first countersignature Loupe has no record of is refused too. Either stopped the demo.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from governance.management.commands.audit_demo import Command

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def test_a_case_no_reviewer_approved_is_not_countersigned(globex_case, tmp_path, settings):
    settings.LOUPE_SIGNING_DIR = str(tmp_path)  # no keys: signing anything here would fail loudly
    report = SimpleNamespace(case=globex_case, pdf=None)
    assert Command().countersign(report) == "not countersigned: no reviewer approved this case"


def test_a_case_two_reviewers_approved_is_countersigned_by_both_and_verifies(env, settings, tmp_path):
    """Each countersignature is recorded before the next reviewer signs: sign_report refuses a file
    whose reviewer signature Loupe has no record of, which stopped the demo at its first approved case."""
    from governance.models import Countersignature

    settings.LOUPE_SIGNING_DIR = str(env["keys"])
    settings.VAR_DIR = tmp_path
    outcome = Command().countersign(env["approved"])
    assert outcome.startswith("countersigned by rita, rob, verified: "), outcome
    assert list(Countersignature.objects.filter(report=env["approved"]).order_by("sequence")
                .values_list("reviewer__username", flat=True)) == ["rita", "rob"]

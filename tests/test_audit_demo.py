"""``manage.py audit_demo``'s countersigning: only reviewers who approved a case countersign its report.

The demo rejects the shortcut case (one reviewer rejects it); countersigning its report as that
reviewer is refused by ``sign_report``, which stopped the demo before the remaining cases ran.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from governance.management.commands.audit_demo import Command

pytestmark = pytest.mark.django_db


def test_a_case_no_reviewer_approved_is_not_countersigned(globex_case, tmp_path, settings):
    settings.LOUPE_SIGNING_DIR = str(tmp_path)  # no keys: signing anything here would fail loudly
    report = SimpleNamespace(case=globex_case, pdf=None)
    assert Command().countersign(report) == "not countersigned: no reviewer approved this case"

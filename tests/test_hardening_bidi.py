"""Attack 8 (issue #20): bidirectional control characters in provider text (U+202E RIGHT-TO-LEFT
OVERRIDE and friends) must not reorder what a reviewer reads, in the admin or in the PDF report."""

from __future__ import annotations

import pytest
from django.test import Client

from governance.models import AIModel

pytestmark = pytest.mark.django_db

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
EVIL = "Risk is low.\u202e Not suitable for recruitment \u2066 decisions\u2069 by law."


def assert_no_bidi(text: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in text if c in BIDI})
    assert not found, found


def test_the_admin_and_the_review_workspace_show_no_bidi_controls(draft_case, alice, ada, rita, rob):
    from tests.review_fixtures import admit, make_review_case

    AIModel.objects.filter(pk=draft_case.model_version.ai_model_id).update(intended_purpose=EVIL,
                                                                           name="Acme \u202eCLIP")
    admit(rita)
    case, _ = make_review_case(draft_case, alice=alice, ada=ada, rita=rita, rob=rob)
    reviewer = Client()
    reviewer.force_login(rita)
    review = reviewer.get(f"/admin/governance/auditcase/{case.pk}/review/")
    assert review.status_code == 200
    html = review.content.decode()
    assert "Not suitable for recruitment" in html
    assert_no_bidi(html)

    admin = Client()
    admin.force_login(ada)
    for url in (f"/admin/governance/aimodel/{case.model_version.ai_model_id}/change/", "/admin/governance/aimodel/"):
        page = admin.get(url)
        assert page.status_code == 200, url
        assert "Acme" in page.content.decode()
        assert_no_bidi(page.content.decode())


@pytest.mark.slow
def test_the_report_shows_no_bidi_controls(settings, tmp_path, monkeypatch, test_probe_kind):
    from governance.reports import render as render_module
    from governance.reports import render_case
    from tests.report_fixtures import acme_case

    settings.MEDIA_ROOT = str(tmp_path)
    seen: list[str] = []
    real = render_module.render_pdf

    def spy(html, **kwargs):
        seen.append(html)
        return real(html, **kwargs)

    monkeypatch.setattr(render_module, "render_pdf", spy)
    case, _ = acme_case(("grounding",), comment=EVIL, card=EVIL)
    rendered, manifest = render_case(case, version=1)
    assert rendered.pdf.startswith(b"%PDF")
    assert "Not suitable for recruitment" in seen[0]
    assert_no_bidi(seen[0])
    # The manifest (what was signed) keeps the provider's text exactly as written.
    assert manifest["signoffs"][0]["comment"] == EVIL.strip()

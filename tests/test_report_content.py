"""Reports an assessor accepts: honest mapping, declared criteria, plain words, provider documents.

Actors from ``tests/conftest.py``: alice (Acme's submitter) attaches documents, ada (admin) changes a
criterion with a reason, rita and rob review. The issued reports are read as an assessor reads them:
through their text (pypdf), page by page.
"""

from __future__ import annotations

import io
import re

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.test import override_settings
from pypdf import PdfReader
from rest_framework.test import APIClient

from governance import acceptance, glossary, workflow
from governance.models import AuditEvent, FindingAcknowledgement, ProviderDocument
from governance.reports import generate_report
from governance.reports.context import SECTIONS, markdown_html
from tests.report_fixtures import acme_case

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

PDF_DOC = b"%PDF-1.4\n% Acme risk-management file\n"
CASE_KINDS = ("grounding", "shortcut", "robustness")


def _pages(pdf: bytes) -> list[str]:
    return [re.sub(r"\s+", " ", page.extract_text() or "") for page in PdfReader(io.BytesIO(pdf)).pages]


def _section_text(pages: list[str], title: str, next_title: str) -> str:
    text = " ".join(pages[2:])  # past the cover and the table of contents
    start = text.index(title)
    end = text.index(next_title, start)
    return text[start:end]


# A4 with the report's page margins (governance/static/reports/report.css), in points.
PAGE_HEIGHT, TOP_MARGIN, BOTTOM_MARGIN = 841.89, 24 / 25.4 * 72, 20 / 25.4 * 72


def _body_fill(page) -> float:
    """How far down the page body (between the running header and footer) its text reaches, 0 to 1."""
    top, bottom = PAGE_HEIGHT - TOP_MARGIN, BOTTOM_MARGIN
    lowest = [top]

    def visit(text, cm, tm, font, size):
        y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
        if text.strip() and bottom < y < top:
            lowest.append(y)

    page.extract_text(visitor_text=visit)
    return (top - min(lowest)) / (top - bottom)


def _metric_keys(metrics, keys=None) -> set[str]:
    keys = set() if keys is None else keys
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            keys.add(key)
            _metric_keys(value, keys)
    elif isinstance(metrics, list):
        for value in metrics:
            _metric_keys(value, keys)
    return keys


def _approve_all(case, reviewers):
    for reviewer in reviewers:
        reasons = {f["key"]: f"{reviewer.get_username()} accepts it for the demo scope"
                   for f in acceptance.open_findings(case)}
        workflow.sign_off(case, reviewer, "approve", "Evidence complete for the stated scope.",
                          acknowledgements=reasons)


@pytest.fixture(scope="module")
def issued(django_db_setup, django_db_blocker, tmp_path_factory, test_probe_kind):
    """A case with a provider document, an admin-changed criterion and acknowledged findings, issued
    as v1; then the criterion changes again and v2 is issued. The database is rolled back."""
    media = tmp_path_factory.mktemp("media")
    with (django_db_blocker.unblock(), override_settings(MEDIA_ROOT=str(media), LOUPE_SIGNING_KEY=""),
          transaction.atomic()):
        case, actors = acme_case(CASE_KINDS, approve=False, probe_figures=True)
        client = APIClient()
        client.force_authenticate(actors["alice"])
        upload = io.BytesIO(PDF_DOC)
        upload.name = "risk-file.pdf"
        response = client.post("/api/documents/", {"model_version": case.model_version_id,
                                                   "doc_type": "risk_management", "title": "Acme risk file",
                                                   "file": upload}, format="multipart")
        assert response.status_code == 201, response.content
        acceptance.set_criterion(case, kind="robustness", metric="flip_rate@family=prompt", by=actors["ada"],
                                 reason="Prompts are fixed by the shop's interface.", threshold=0.5)
        blocking = acceptance.open_findings(case)
        _approve_all(case, [actors["rita"], actors["rob"]])
        case.refresh_from_db()
        v1 = generate_report(case, author=actors["ada"])
        acceptance.set_criterion(case, kind="grounding", metric="deletion_auc", by=actors["ada"],
                                 reason="A medical-grade purpose needs this as high.", severity="high")
        v2 = generate_report(case, author=actors["ada"])
        result = {"case": case.pk, "v1": v1.pdf.open("rb").read(), "v2": v2.pdf.open("rb").read(),
                  "manifest": v1.manifest, "v2_changelog": v2.changelog, "blocking": blocking,
                  "document": response.json(), "acks": FindingAcknowledgement.objects.filter(case=case).count(),
                  "events": list(AuditEvent.objects.filter(action="criterion.changed")
                                 .values_list("payload", flat=True))}
        transaction.set_rollback(True)
    return result


def test_page_one_states_scope_the_meaning_of_the_decision_and_that_it_is_no_conformity_assessment(issued):
    first = _pages(issued["v1"])[0]
    assert "APPROVED" in first
    assert ("the assigned reviewers accept the evidence in this report as complete and correct "
            "for the stated scope") in first
    assert "not a conformity assessment" in first
    assert "Scope of this report" in first and "Full plan." in first


def test_it_claims_contribution_never_compliance(issued):
    text = " ".join(_pages(issued["v1"]))
    assert "Serves:" not in text
    assert text.count("Contributes evidence to") >= len(SECTIONS) - 1


def test_the_coverage_matrix_names_all_nine_annex_iv_points_and_cites_provider_documents_by_hash(issued):
    pages = _pages(issued["v1"])
    matrix = _section_text(pages, "2. Coverage of the technical documentation", "3. Acceptance criteria")
    for point in range(1, 10):
        assert re.search(rf"Annex IV {point}\b", matrix), f"Annex IV point {point} missing from the matrix"
    for article in ("Art. 9", "Art. 10", "Art. 11", "Art. 12", "Art. 13", "Art. 14", "Art. 15"):
        assert article in matrix
    # The risk-management file is supplied by the provider; the declaration of conformity is not covered.
    assert "Acme risk file" in matrix and issued["document"]["sha256"][:16] in matrix.replace(" ", "")
    assert "Not covered" in matrix
    generative = " ".join(pages)
    assert "Art. 50(2)" in generative and "Annex XI" in generative


def test_findings_and_severities_come_from_the_declared_criteria_with_verdicts(issued):
    pages = _pages(issued["v1"])
    criteria = _section_text(pages, "3. Acceptance criteria and verdicts", "4. Intended purpose")
    assert "Criterion" in criteria and "Verdict" in criteria
    assert "meets" in criteria and "does not meet" in criteria
    deletion = acceptance.Spec("grounding", "deletion_auc", "below_reference", reference="random_deletion_auc")
    assert deletion.describe() in criteria  # e.g. "Deletion AUC below deletion AUC of a random order"
    assert "95% CI" in criteria  # shares of examples carry their interval
    # The admin's change and its reason are in the report, and in the audit log with before/after.
    assert "Prompts are fixed by the shop" in criteria
    assert any('"reason":"Prompts are fixed' in payload and '"before"' in payload for payload in issued["events"])
    # Open high/medium findings were acknowledged one by one; the reasons are printed.
    assert issued["blocking"] and issued["acks"] == 2 * len(issued["blocking"])
    summary = _section_text(pages, "1. Summary and review decision", "2. Coverage")
    assert "accepts it for the demo scope" in summary


def test_no_raw_metric_key_appears_in_the_report(issued):
    text = " ".join(_pages(issued["v1"]))
    keys = {k for e in issued["manifest"]["evidence"] for k in _metric_keys(e["metrics"]) if "_" in k}
    assert {"deletion_auc", "mean_corruption_accuracy_by_severity", "tcav_score"} <= keys
    shown = sorted(k for k in keys if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", text))
    assert shown == [], f"raw metric keys in the report: {shown}"
    for key in keys:
        assert glossary.meaning(key) or glossary.label(key) != key, key


def test_the_shortcut_probes_tcav_evidence_is_in_the_bias_section_and_not_called_untested(issued):
    pages = _pages(issued["v1"])
    bias = _section_text(pages, "6. Bias examination", "7. Accuracy and robustness")
    assert "Shortcut detection" in bias and "Concept influence per concept and layer" in bias
    assert "Concept tests (TCAV) ran inside another probe" in bias
    summary = _section_text(pages, "1. Summary and review decision", "2. Coverage")
    not_tested = re.search(r"Not tested in this case: ([^.]*)\.", summary)
    assert not_tested is None or "TCAV" not in not_tested.group(1)


def test_a_new_version_lists_field_level_changes(issued):
    details = [c["detail"] for c in issued["v2_changelog"]]
    assert any(d.startswith("Criterion changed from 'Deletion") and "(medium)" in d and "(high)" in d
               and "medical-grade" in d for d in details), details
    text = " ".join(_pages(issued["v2"])[:3])
    assert "Changes since v1" in text and "Criterion changed" in text


def test_approving_with_open_findings_needs_a_reason_for_each(db, test_probe_kind, settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path)
    case, actors = acme_case(("grounding",), approve=False)
    open_keys = [f["key"] for f in acceptance.open_findings(case)]
    assert open_keys  # the fixture's grounding evidence misses its criteria for some methods
    with pytest.raises(workflow.WorkflowError, match="needs a reason for each open high or medium finding"):
        workflow.sign_off(case, actors["rita"], "approve", "No high-severity finding.")
    with pytest.raises(workflow.WorkflowError, match="missing"):
        workflow.sign_off(case, actors["rita"], "approve", "", acknowledgements={open_keys[0]: "fine"})
    client = APIClient()
    client.force_authenticate(actors["rita"])
    refused = client.post(f"/api/cases/{case.pk}/signoff/", {"decision": "approve"}, format="json")
    assert refused.status_code in (400, 409) and "open high or medium finding" in refused.content.decode()
    reasons = {key: "Known limitation of rollout on synthetic data; not used for decisions." for key in open_keys}
    ok = client.post(f"/api/cases/{case.pk}/signoff/", {"decision": "approve", "acknowledgements": reasons},
                     format="json")
    assert ok.status_code == 201, ok.content
    assert FindingAcknowledgement.objects.filter(case=case, reviewer=actors["rita"]).count() == len(open_keys)
    listed = client.get(f"/api/cases/{case.pk}/criteria/").json()
    assert {f["key"] for f in listed["open_findings"]} == set(open_keys)
    assert any(v["verdict"] == "does not meet" for v in listed["verdicts"])


def test_the_workspace_approves_with_open_findings_only_with_a_reason_for_each(db, test_probe_kind, settings,
                                                                                tmp_path):
    from django.test import Client
    from django.urls import reverse

    from governance.models import Signoff

    settings.MEDIA_ROOT = str(tmp_path)
    case, actors = acme_case(("grounding",), approve=False)
    rita = actors["rita"]
    rita.is_staff = True
    rita.save(update_fields=["is_staff"])
    open_keys = [f["key"] for f in acceptance.open_findings(case)]
    assert open_keys
    client = Client()
    client.force_login(rita)
    page = client.get(reverse("admin:governance_auditcase_review", args=[case.pk])).content.decode()
    form = page[page.index('id="case-signoff"'):page.index("</form>", page.index('id="case-signoff"'))]
    for key in open_keys:  # one labelled reason field per open high/medium finding
        field = re.search(rf'<textarea name="ack:{re.escape(key)}" id="([^"]+)"', form)
        assert field and f'for="{field.group(1)}"' in form, key
    url = reverse("admin:governance_auditcase_review_signoff", args=[case.pk])
    partial = {"decision": "approve", f"ack:{open_keys[0]}": "Known limitation."}
    refused = client.post(url, partial)
    assert refused.status_code == 400 and "needs a reason for each open high or medium finding" in \
        refused.content.decode()
    assert "Known limitation." in refused.content.decode()  # what was typed is kept
    reasons = {f"ack:{key}": f"Accepted for the stated scope ({i})." for i, key in enumerate(open_keys)}
    confirm = client.post(url, {"decision": "approve", **reasons})
    assert confirm.status_code == 200 and "Accepted for the stated scope (0)." in confirm.content.decode()
    digest = workflow.case_digest(case)
    done = client.post(url, {"decision": "approve", "digest": digest, **reasons})
    assert done.status_code == 302, done.content.decode()[:2000]
    signoff = Signoff.objects.get(case=case, reviewer=rita, evidence__isnull=True)
    assert {a.finding: a.reason for a in FindingAcknowledgement.objects.filter(signoff=signoff)} == \
        {key: f"Accepted for the stated scope ({i})." for i, key in enumerate(open_keys)}


def test_only_an_admin_changes_a_criterion_and_only_with_a_reason(db, test_probe_kind, settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path)
    case, actors = acme_case(("grounding",), approve=False)
    with pytest.raises(ValidationError):
        acceptance.set_criterion(case, kind="grounding", metric="deletion_auc", by=actors["ada"], reason=" ",
                                 severity="low")
    with pytest.raises(PermissionDenied):
        acceptance.set_criterion(case, kind="grounding", metric="deletion_auc", by=actors["rita"], reason="x",
                                 severity="low")
    before = {f["key"] for f in acceptance.open_findings(case) if f["kind"] == "grounding"}
    client = APIClient()
    client.force_authenticate(actors["ada"])
    response = client.post(f"/api/cases/{case.pk}/criteria/", {"kind": "grounding", "metric": "deletion_auc",
                                                                "severity": "low", "reason": "Exploratory use only."},
                           format="json")
    assert response.status_code == 200, response.content
    after = {f["key"] for f in acceptance.open_findings(case) if f["kind"] == "grounding"}
    assert not any(":deletion_auc:" in k for k in after) and any(":deletion_auc:" in k for k in before)
    client.force_authenticate(actors["rita"])
    assert client.post(f"/api/cases/{case.pk}/criteria/", {"kind": "grounding", "metric": "deletion_auc",
                                                           "severity": "high", "reason": "x"},
                       format="json").status_code == 403


def test_provider_documents_are_typed_hashed_versioned_and_scoped(db, test_probe_kind, settings, tmp_path, make_user):
    settings.MEDIA_ROOT = str(tmp_path)
    case, actors = acme_case(("grounding",), approve=False)
    client = APIClient()
    client.force_authenticate(actors["alice"])

    def post(content: bytes, name: str, doc_type: str = "declaration"):
        upload = io.BytesIO(content)
        upload.name = name
        return client.post("/api/documents/", {"model_version": case.model_version_id, "doc_type": doc_type,
                                               "file": upload}, format="multipart")

    first, second = post(PDF_DOC, "doc.pdf"), post(PDF_DOC + b"v2", "doc.pdf")
    assert (first.status_code, second.status_code) == (201, 201)
    assert (first.json()["version"], second.json()["version"]) == (1, 2)
    import hashlib

    assert second.json()["sha256"] == hashlib.sha256(PDF_DOC + b"v2").hexdigest()
    assert post(b"<html><script>", "doc.html").status_code == 400
    assert post(b"MZ not a pdf", "doc.pdf").status_code == 400
    assert post(PDF_DOC, "doc.pdf", doc_type="nonsense").status_code == 400
    assert ProviderDocument.objects.count() == 2
    download = client.get(f"/api/documents/{first.json()['id']}/download/")
    assert download.status_code == 200 and b"".join(download.streaming_content) == PDF_DOC
    # Another organisation's submitter neither sees nor attaches.
    from governance.models import Organisation

    other = make_user("olga", "submitter", organisation=Organisation.objects.create(name="Other", slug="other"))
    client.force_authenticate(other)
    assert client.get(f"/api/documents/{first.json()['id']}/").status_code == 404
    assert post(PDF_DOC, "doc.pdf").status_code in (400, 403)
    from governance.models import ImmutableError

    with pytest.raises(ImmutableError):
        ProviderDocument.objects.filter(pk=first.json()["id"]).update(title="changed")


def test_model_card_markdown_renders_without_raw_html():
    html = str(markdown_html("# Training\n\n*Synthetic* shapes <script>alert(1)</script> "
                             "![x](https://evil.example/x.png) [link](javascript:alert(1))"))
    assert "<h1>Training</h1>" in html and "<em>Synthetic</em>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img" not in html and "<a " not in html and "href" not in html


def test_a_kind_declared_glossary_entry_wins(monkeypatch):
    from workers.probes import kinds
    from workers.probes.kinds import Metric

    glossary.cache_clear()
    monkeypatch.setattr(kinds, "glossary",
                        lambda kind=None: {"grounding": {"deletion_auc": Metric("Deletion (declared)",
                                                                                "declared meaning.")}})
    try:
        assert glossary.label("methods.deletion_auc") == "Deletion (declared)"
        assert glossary.meaning("deletion_auc") == "Declared meaning."  # capitalised like Loupe's own
        assert glossary.label("energy_pointing_game") == "Energy pointing game"  # falls back to Loupe's table
    finally:
        glossary.cache_clear()


def test_an_admin_changes_a_criterion_in_the_admin_only_with_a_reason(db, test_probe_kind, settings, tmp_path):
    from django.test import Client

    from governance.models import AcceptanceCriterion

    settings.MEDIA_ROOT = str(tmp_path)
    case, actors = acme_case(("grounding",), approve=False)
    acceptance.ensure_defaults(case)
    row = AcceptanceCriterion.objects.get(case=case, kind="grounding", metric="deletion_auc")
    client = Client()
    client.force_login(actors["ada"])
    url = f"/admin/governance/acceptancecriterion/{row.pk}/change/"
    form = {"comparator": "below_reference", "threshold": "", "reference": "random_deletion_auc", "severity": "high",
            "where": "{}"}
    assert client.post(url, form).status_code == 200  # re-shown: the reason is required
    assert AcceptanceCriterion.objects.get(pk=row.pk).severity == "medium"
    assert client.post(url, form | {"reason": "High-stakes deployment."}).status_code == 302
    row.refresh_from_db()
    assert (row.severity, row.source, row.rationale) == ("high", "admin", "High-stakes deployment.")
    event = AuditEvent.objects.filter(action="criterion.changed").latest("seq")
    assert '"reason":"High-stakes deployment."' in event.payload and '"severity":"medium"' in event.payload
    client.force_login(actors["rita"])
    assert client.post(url, form | {"reason": "x", "severity": "low"}).status_code in (302, 403)
    row.refresh_from_db()
    assert row.severity == "high"


def test_shares_of_examples_get_a_wilson_interval():
    low, high = acceptance.wilson(0.5, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    [verdict] = acceptance.evaluate(
        [acceptance.Spec("grounding", "pointing_game", "at_least", threshold=0.3)],
        [{"id": 1, "kind": "grounding", "metrics": {"n": 10, "methods": [{"method": "chefer", "pointing_game": 0.9}]}}])
    assert verdict.met is True and verdict.interval[0] < 0.9 < verdict.interval[1] and verdict.interval[1] <= 1.0


def test_per_method_values_are_judged_one_by_one_against_their_reference():
    verdicts = acceptance.evaluate(
        [s for s in acceptance.defaults("minimal") if s.kind == "token_attribution"],
        [{"id": 7, "kind": "token_attribution",
          "metrics": {"pointing": {"chefer": 0.9, "raw": 0.05}, "random_baseline": 0.07, "hallucinated_words": 2}}])
    by_subject = {(v.criterion.metric, v.subject): v.met for v in verdicts}
    assert by_subject[("pointing", "chefer")] is True and by_subject[("pointing", "raw")] is False
    assert by_subject[("hallucinated_words", "overall")] is False
    assert {f["severity"] for f in acceptance.findings(verdicts)} == {"medium"}
    high = acceptance.findings(acceptance.evaluate(
        [s for s in acceptance.defaults("high_risk", "4") if s.kind == "token_attribution"],
        [{"id": 7, "kind": "token_attribution", "metrics": {"hallucinated_words": 2}}]))
    assert [f["severity"] for f in high] == ["high"]  # one level stricter for a high-risk system


def test_bootstrap_summaries_are_not_judged_as_subjects_of_their_own():
    """Validation stores each method's value with its interval ({"mean", "low", "high", "n"}); the
    criteria table judges the value once per method, never "n", "mean", "low" and "high" as methods."""
    verdicts = acceptance.evaluate(
        [acceptance.Spec("grounding", "pointing_game", "at_least", threshold=0.3)],
        [{"id": 1, "kind": "grounding", "metrics": {
            "n": 48, "methods": [{"method": "chefer", "pointing_game": 0.9}, {"method": "flow", "pointing_game": 0.2}],
            "validation": {"methods": [{"method": "chefer",
                                        "pointing_game": {"mean": 0.9, "low": 0.8, "high": 0.95, "n": 48}}]}}}])
    assert [(v.subject, v.met) for v in verdicts] == [("chefer", True), ("flow", False)]


def test_no_page_but_the_last_is_left_near_empty(issued):
    for version in ("v1", "v2"):
        pages = PdfReader(io.BytesIO(issued[version])).pages
        fills = [_body_fill(page) for page in pages]
        sparse = [(number, round(fill, 2)) for number, fill in enumerate(fills[:-1], start=1) if fill < 0.4]
        assert sparse == [], f"{version}: pages whose text ends in the top 40% of the body: {sparse}"


def test_every_section_is_printed_once(issued):
    text = " ".join(_pages(issued["v1"]))
    for section in SECTIONS:
        lead = section.plain[:50]
        assert text.count(lead) == 1, f"section {section.title!r} printed {text.count(lead)} times"


def test_the_test_log_prints_the_dataset_fingerprint_of_every_run(issued):
    pages = _pages(issued["v1"])
    numbers = {section.key: number for number, section in enumerate(SECTIONS, start=1)}
    log = _section_text(pages, f"{numbers['testlog']}. Test log", f"{numbers['limitations']}. Limitations")
    runs = issued["manifest"]["runs"]
    assert runs
    for run in runs:
        assert re.fullmatch(r"[0-9a-f]{64}", run["dataset_hash"]), run
        assert f"Run #{run['id']}" in log and run["dataset_hash"] in log.replace(" ", ""), run["id"]


def _drawn_images(page) -> list[tuple[int, float]]:
    """``(pixel width, printed width in points)`` of every image drawn on ``page`` (its content stream
    and the form XObjects it draws), from the transformation matrix in force where it is drawn."""
    from pypdf.generic import ContentStream

    drawn: list[tuple[int, float]] = []

    def walk(stream_owner, resources, ctm):
        stack = []
        operations = ContentStream(stream_owner.get_object(), page.pdf).operations
        xobjects = (resources or {}).get("/XObject", {})
        xobjects = xobjects.get_object() if hasattr(xobjects, "get_object") else xobjects
        for operands, operator in operations:
            if operator == b"q":
                stack.append(ctm)
            elif operator == b"Q":
                ctm = stack.pop()
            elif operator == b"cm":
                a, b, c, d, e, f = (float(x) for x in operands)
                m = ctm
                ctm = (a * m[0] + b * m[2], a * m[1] + b * m[3], c * m[0] + d * m[2], c * m[1] + d * m[3],
                       e * m[0] + f * m[2] + m[4], e * m[1] + f * m[3] + m[5])
            elif operator == b"Do":
                xobject = xobjects[operands[0]].get_object()
                if xobject["/Subtype"] == "/Image":
                    drawn.append((int(xobject["/Width"]), (ctm[0] ** 2 + ctm[1] ** 2) ** 0.5))
                elif xobject["/Subtype"] == "/Form":
                    matrix = [float(x) for x in xobject.get("/Matrix", [1, 0, 0, 1, 0, 0])]
                    a, b, c, d, e, f = matrix
                    m = ctm
                    inner = (a * m[0] + b * m[2], a * m[1] + b * m[3], c * m[0] + d * m[2], c * m[1] + d * m[3],
                             e * m[0] + f * m[2] + m[4], e * m[1] + f * m[3] + m[5])
                    walk(xobject, xobject.get("/Resources", resources), inner)

    walk(page["/Contents"], page["/Resources"], (1.0, 0.0, 0.0, 1.0, 0.0, 0.0))
    return drawn


def test_every_figure_prints_its_labels_at_close_to_the_size_they_were_drawn(issued):
    from governance.evidence import FIGURE_DPI

    drawn = [image for page in PdfReader(io.BytesIO(issued["v1"])).pages for image in _drawn_images(page)]
    assert len(drawn) >= len(CASE_KINDS)  # the probes' example grids, at least
    drawn_scale = 72 / FIGURE_DPI  # points per pixel at the size matplotlib laid the figure out
    small = [(pixels, round(points)) for pixels, points in drawn if points / pixels < 0.8 * drawn_scale]
    assert small == [], f"figures printed below 80% of their drawn size (pixels, points wide): {small}"


def test_every_probe_figure_is_captioned_with_what_its_rows_and_columns_are(issued):
    text = " ".join(_pages(issued["v1"]))
    captions = re.findall(r"Figure \d+\. (.*?)Evidence #\d+, file (\S+)", text)
    grids = [(caption, name) for caption, name in captions if "-examples-" in name]
    assert len(grids) == len(CASE_KINDS), captions
    for caption, name in grids:
        assert "Rows: one example each, headed by its prompt and the model's score" in caption, name
        assert "Columns: the image in colour with the annotated object boxed in green, then chefer, gradcam, " \
               "rollout" in caption, name
        assert "colour bar on the right" in caption, name
    assert "Figure stored by the" not in text

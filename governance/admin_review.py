"""The reviewer workspace: one admin page per audit case, and its actions.

``/admin/governance/auditcase/<id>/review/`` shows the model card summary, every run's state and
progress (polled from ``.../review/status.json`` while runs are active), the evidence with heatmap
thumbnails, metric tables and findings by severity, the review status, the reports and the case's
audit log. Its forms sign off, move the case and issue reports.

Nothing here decides a rule; it only asks the modules that do, exactly as the API does:

- visibility: ``Model.objects.visible_to(user)`` (:mod:`governance.access`): a case, artifact or
  report outside the user's scope is a 404;
- who may act: the same role sets as the API's ``action_roles`` (an auditor can change nothing:
  every POST is a 403 before anything else runs);
- sign-offs, segregation of duties, transitions: :func:`governance.workflow.sign_off`,
  :func:`~governance.workflow.transition`, :func:`~governance.workflow.available_transitions`;
  starting runs: :func:`governance.pipeline.start_case`; reports: :func:`governance.reports.generate_report`
  (or the ``render_report`` task when a broker is configured).

A refused action re-renders the page with the refusal message and the status code the API would use
(403 not allowed, 409 illegal transition, 400 invalid, 503 broker down); a successful one redirects
back to the page (POST/redirect/GET). The admin wraps every view in ``admin_view`` (staff login,
CSRF protection, no caching).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.views.decorators.http import require_GET, require_POST

from governance import acceptance, access, audit_log, comments, pipeline, workflow
from governance import models as m
from governance.api.errors import domain_error
from governance.glossary import describe_metric
from governance.reports.context import flatten, record_tables

S = m.AuditCase.State
D = m.Signoff.Decision

# The API's role sets (governance/api/views.py, AuditCaseViewSet.action_roles): anyone but an auditor
# may *try* to sign off (the workflow then names the reason); reports need a reviewer or an admin.
SIGNOFF_ROLES = frozenset({access.SUBMITTER, access.REVIEWER, access.ADMIN})
REPORT_ROLES = frozenset({access.REVIEWER, access.ADMIN})
TRANSITION_ROLES = frozenset({access.SUBMITTER, access.REVIEWER, access.ADMIN})
NO_EVIDENCE_YET = (S.DRAFT, S.SUBMITTED, S.RUNNING)

# Browsers render these inline; anything else (SVG can carry script, HTML, CSV, arrays) is a download.
INLINE_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

TRANSITION_LABELS: dict[str, str] = {
    S.SUBMITTED: "Submit for probing",
    S.RUNNING: "Start probe runs",
    S.DRAFT: "Withdraw (back to draft)",
    S.EVIDENCE_READY: "Mark evidence ready",
    S.IN_REVIEW: "Open review",
    S.ARCHIVED: "Archive",
}
ACK_PREFIX = "ack:"
# Keyed by what a finding's "severity" may hold (stored JSON: possibly missing); unknown ones sort last.
SEVERITY_ORDER: dict[str | None, int] = {severity: i for i, severity in enumerate(m.FINDING_SEVERITIES)}


class Refused(Exception):
    """An action the page refuses; shown on the page with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


#: The workspace's report form carries one of these per page view (``uuid4().hex``).
REQUEST_KEY = re.compile(r"[0-9a-f]{32}")


def _refusal(exc: Exception) -> Refused:
    """The API's status code (``governance.api.errors.DOMAIN_ERRORS``) for one of the service's own
    errors; anything else is re-raised."""
    known = domain_error(exc)
    if known is None:
        raise exc
    return Refused(str(exc), known[1])


def _require_roles(user, allowed: frozenset[str], what: str) -> None:
    roles = access.roles_of(user)
    if not roles & allowed:
        if roles == {access.AUDITOR}:
            raise PermissionDenied("Auditors have read-only access: they can see everything and change nothing.")
        raise PermissionDenied(f"{what} needs one of the roles {', '.join(sorted(allowed))}; "
                               f"you have {', '.join(sorted(roles)) or 'none'}.")


def visible_case(request: HttpRequest, case_id: int) -> m.AuditCase:
    qs = m.AuditCase.objects.visible_to(request.user).select_related("model_version__ai_model__organisation")
    return get_object_or_404(qs, pk=case_id)


# --------------------------------------------------------------------------------------------------
# What the page shows
# --------------------------------------------------------------------------------------------------


@dataclass
class EvidenceView:
    evidence: m.Evidence
    run: m.ProbeRun
    images: list[m.EvidenceArtifact]
    files: list[m.EvidenceArtifact]
    metric_rows: list[dict[str, str]]
    metric_tables: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    signoffs: list[m.Signoff]


def run_rows(case: m.AuditCase) -> list[dict[str, Any]]:
    return [{"id": run.pk, "kind": run.kind, "status": run.status, "status_label": run.get_status_display(),
             "progress": round(run.progress, 4), "percent": round(100 * run.progress),
             "phase": run.phase, "device": run.device, "error": run.error,
             "active": run.status in m.ProbeRun.ACTIVE,
             "duration": run.duration_seconds}
            for run in case.runs.order_by("created_at", "pk")]


def status_payload(case: m.AuditCase) -> dict[str, Any]:
    """What the page's poller reads: the case state, overall progress and every run."""
    runs = run_rows(case)
    progress = pipeline.case_progress(case)
    return {"case": case.pk, "state": case.state, "state_label": case.get_state_display(),
            "progress": progress["progress"], "percent": round(100 * progress["progress"]),
            "partial": progress["partial"], "active": any(r["active"] for r in runs),
            "runs": [{k: r[k] for k in ("id", "kind", "status", "status_label", "progress", "percent", "phase",
                                        "error")} for r in runs]}


def evidence_views(case: m.AuditCase, user) -> list[EvidenceView]:
    evidence_qs = (m.Evidence.objects.visible_to(user).filter(run__case=case).select_related("run")
                   .prefetch_related("artifacts").order_by("run__created_at", "pk"))
    signoffs = list(m.Signoff.objects.visible_to(user).filter(case=case, evidence__isnull=False)
                    .select_related("reviewer").order_by("created_at", "pk"))
    views = []
    for evidence in evidence_qs:
        artifacts = sorted(evidence.artifacts.all(), key=lambda a: a.name)
        for artifact in artifacts:
            artifact.alt = describe_figure(artifact, evidence)
        # Each finding carries its thread key (its position in the evidence, before sorting).
        findings = sorted(({**f, "key": comments.evidence_finding_key(evidence.pk, i)}
                           for i, f in enumerate(evidence.findings or []) if isinstance(f, dict)),
                          key=lambda f: SEVERITY_ORDER.get(f.get("severity"), len(SEVERITY_ORDER)))
        views.append(EvidenceView(
            evidence=evidence, run=evidence.run,
            images=[a for a in artifacts if a.content_type in INLINE_IMAGE_TYPES],
            files=[a for a in artifacts if a.content_type not in INLINE_IMAGE_TYPES],
            metric_rows=explained_rows(evidence.kind, flatten(evidence.metrics)),
            metric_tables=explained_tables(evidence.kind, record_tables(evidence.metrics)),
            findings=findings, signoffs=[s for s in signoffs if s.evidence_id == evidence.pk]))
    return views


def explained_rows(kind: str, rows: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Metric rows with the glossary's label, meaning, baseline and criterion beside the raw key."""
    explained = []
    for key, value in rows:
        info = describe_metric(kind, key)
        explained.append({"key": key, "value": value, "label": info.label, "meaning": info.meaning,
                          "baseline": info.baseline, "criterion": info.criterion})
    return explained


def explained_tables(kind: str, tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for table in tables:
        table["headers"] = [{"key": c, **vars(describe_metric(kind, c))} for c in table["columns"]]
        table["caption"] = describe_metric(kind, table["title"]).label
    return tables


def decision_summary(case: m.AuditCase, evidence: list[EvidenceView], review, progress: dict[str, Any]
                     ) -> dict[str, Any]:
    """What a reviewer needs before anything else: the verdict so far, every finding by severity
    (each linked to its evidence), what the plan asked for that produced no evidence, and whether
    the evidence is partial."""
    findings = []
    for item in evidence:
        for finding in item.findings:
            findings.append({**finding, "evidence": item.evidence.pk, "kind": item.evidence.kind})
    findings.sort(key=lambda f: SEVERITY_ORDER.get(f.get("severity"), len(SEVERITY_ORDER)))
    counts = {sev: sum(1 for f in findings if f.get("severity") == sev) for sev in m.FINDING_SEVERITIES}
    covered = {(item.run.kind, pipeline._key(item.run.params), item.run.dataset or "") for item in evidence}
    runs_by_item: dict[tuple, m.ProbeRun] = {}
    for run in case.runs.order_by("created_at", "pk"):
        runs_by_item[(run.kind, pipeline._key(run.params), run.dataset or "")] = run
    not_tested = []
    for item in case.probe_plan or []:
        key = (item.get("kind"), pipeline._key(item.get("params") or {}), item.get("dataset") or "")
        if key in covered:
            continue
        latest = runs_by_item.get(key)
        reason = ("not run yet" if latest is None else
                  f"run #{latest.pk} {latest.get_status_display().lower()}"
                  + (f": {latest.error[:160]}" if latest.error else ""))
        not_tested.append({"kind": item.get("kind"), "dataset": item.get("dataset") or "", "reason": reason})
    top = next((sev for sev in m.FINDING_SEVERITIES if counts.get(sev)), "")
    if case.state == S.APPROVED:
        verdict, tone = "Approved", "ok"
    elif case.state == S.REJECTED:
        verdict, tone = "Rejected", "bad"
    elif case.state == S.CHANGES_REQUESTED:
        verdict, tone = "Changes requested", "warn"
    elif case.state in NO_EVIDENCE_YET:
        verdict, tone = "No decision possible yet: the evidence is not in", "neutral"
    elif not evidence:
        verdict, tone = "Nothing to review: no evidence", "bad"
    else:
        verdict = (f"Awaiting sign-off: {len(review.approved_by)} of {review.required} approvals"
                   + (f"; open objections: {len(review.open_objections)}" if review.open_objections else ""))
        tone = "warn" if top in ("critical", "high") else "neutral"
    return {"verdict": verdict, "tone": tone, "findings": findings, "counts": counts, "top_severity": top,
            "not_tested": not_tested,
            # While runs are still going, missing evidence is not yet missing: no warning until they end.
            "partial": case.state not in NO_EVIDENCE_YET
            and (bool(progress.get("partial")) or bool(not_tested and evidence))}


FIGURE_DESCRIPTIONS = {
    "examples": "example images with each method's relevance heatmap overlaid (one row per image, its prompt above, "
                "one column per method)",
    "curves": "deletion and insertion curves of each method beside the random order",
    "heads": "attention statistics per layer and head",
    "head_ablation": "score change when each attention head is ablated",
    "robustness_curves": "accuracy under each corruption at increasing severity",
    "robustness_examples": "an example image under each corruption",
    "shortcut_evidence": "relevance on the suspected shortcut and the score with it added and removed",
    "agreement": "agreement between the heatmaps of repeated, perturbed runs",
}


def describe_figure(artifact: m.EvidenceArtifact, evidence: m.Evidence) -> str:
    """Alt text that says what the figure shows, not its file name: the probe's own description
    stored in the PNG where it has one, else words chosen by the figure's name."""
    from workers.probes.captions import png_description

    try:
        with artifact.file.open("rb") as handle:
            described = png_description(handle.read())
    except (FileNotFoundError, OSError):
        described = None
    if described:
        return f"{evidence.kind} probe, run #{evidence.run_id}: {described}"
    stem = artifact.name.rsplit(".", 1)[0]
    what = next((text for key, text in FIGURE_DESCRIPTIONS.items() if stem == key or stem.startswith(key)),
                f"figure {stem.replace('_', ' ')}")
    text = f"{evidence.kind} probe, run #{evidence.run_id}: {what}."
    if "heat" in stem or stem.startswith(("examples", "caption", "localisation", "shortcut")):
        text += (" Heatmaps use the inferno scale (dark: low relevance, yellow: high); green boxes mark the annotated"
                 " object.")
    return text


def _prompts(evidence: m.Evidence) -> list[str]:
    """Prompts the evidence names (for the viewer's caption), when its metrics carry them."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key in ("prompt", "target", "prompts") and isinstance(inner, (str, list)):
                    found.extend([inner] if isinstance(inner, str) else [p for p in inner if isinstance(p, str)])
                else:
                    walk(inner)
        elif isinstance(value, list):
            for inner in value[:50]:
                walk(inner)

    walk(evidence.metrics)
    return list(dict.fromkeys(found))[:12]


def queue_row(case: m.AuditCase, user) -> dict[str, Any]:
    """One line of the review queue: is the case waiting for ``user``, how bad is it, how far is it."""
    severities = [e.max_severity for e in m.Evidence.objects.filter(run__case=case) if e.max_severity]
    top = min(severities, key=lambda sev: SEVERITY_ORDER.get(sev, 99)) if severities else ""
    status = workflow.review_status(case) if case.state in (S.EVIDENCE_READY, S.IN_REVIEW) else None
    assigned = any(r.pk == user.pk for r in case.reviewers.all())
    decided = status is not None and user.get_username() in (
        status.approved_by + status.rejected_by + status.changes_requested_by)
    return {"case": case, "model": case.model_version, "risk": case.model_version.ai_model.get_risk_category_display(),
            "risk_code": case.model_version.ai_model.risk_category, "severity": top,
            "approvals": f"{len(status.approved_by)} of {status.required}" if status else "",
            "awaiting_me": status is not None and assigned and not decided and not signoff_hint(case, user),
            "url": reverse("admin:governance_auditcase_review", args=[case.pk])}


def signoff_hint(case: m.AuditCase, user) -> str:
    """Why the sign-off forms are hidden for ``user`` (display only; ``workflow.sign_off`` decides)."""
    if case.state not in (S.EVIDENCE_READY, S.IN_REVIEW):
        return ("Sign-offs are taken while the case has evidence ready or is in review; "
                f"it is {case.get_state_display()}.")
    if not access.roles_of(user) & SIGNOFF_ROLES:
        return "Your role is read-only here."
    conflict = workflow.conflict_of(case, user)
    if conflict:
        return f"segregation of duties: {conflict}."
    if not access.has_role(user, access.REVIEWER) or not case.reviewers.filter(pk=user.pk).exists():
        return f"only reviewers assigned to case #{case.pk} may sign it off."
    return ""


def attach_threads(case: m.AuditCase, user, evidence: list[EvidenceView]) -> list[comments.Thread]:
    """Put each finding's comment thread beside it (``finding["thread"]``); returns the threads on
    findings shown elsewhere (acceptance-criterion findings, or findings no longer in the evidence)."""
    threads = comments.threads(case, user)
    for item in evidence:
        for finding in item.findings:
            finding["thread"] = threads.pop(finding["key"], None)
            finding["anchor"] = comments.anchor(finding["key"])
    # Every criterion finding gets a thread to start, not only those someone started through the API.
    criterion = [comments.Thread(key, finding) for key, finding in comments.case_findings(case).items()
                 if finding["source"] == "criterion" and key not in threads]
    return criterion + list(threads.values())


def _verbose_name(model: type[models.Model], name: str) -> str:
    field = model._meta.get_field(name)
    return str(field.verbose_name) if isinstance(field, models.Field) else name


def review_context(request: HttpRequest, case: m.AuditCase, admin_site) -> dict[str, Any]:
    user = request.user
    roles = access.roles_of(user)
    version = case.model_version
    rows = audit_log.excerpt(case)
    status = workflow.review_status(case)
    hint = signoff_hint(case, user)
    status_now = status_payload(case)
    evidence = evidence_views(case, user)
    other_threads = attach_threads(case, user, evidence)
    return {
        "decision": decision_summary(case, evidence, status, status_now),
        "other_threads": other_threads, "can_comment": comments.can_comment(case, user),
        "can_resolve": comments.can_resolve(case, user),
        **admin_site.each_context(request),
        "title": f"Review: {case.title}",
        "case": case, "version": version, "ai_model": version.ai_model,
        "card_fields": [(_verbose_name(m.ModelVersion, name), getattr(version, name))
                        for name in m.ModelVersion.CARD_FIELDS if getattr(version, name)],
        "status": status_now,
        "runs": run_rows(case),
        "evidence": evidence,
        "review": status,
        "case_signoffs": m.Signoff.objects.visible_to(user).filter(case=case, evidence__isnull=True)
        .select_related("reviewer").order_by("created_at", "pk"),
        "reviewers": case.reviewers.order_by("username"),
        "can_sign": not hint, "signoff_hint": hint, "decisions": D.choices,
        # An approval of the case must give a reason per open high/medium finding (workflow.sign_off).
        "open_findings": acceptance.open_findings(case) if not hint else [],
        "transitions": [{"to": to, "label": TRANSITION_LABELS.get(to, to)}
                        for to in workflow.available_transitions(case, user)],
        "can_report": bool(roles & REPORT_ROLES) and case.state not in NO_EVIDENCE_YET,
        # One key per rendering of the page: a double click or a resubmitted form repeats the key,
        # and report_requests.issue answers a repeated key with the version the first one issued.
        "report_request_key": uuid.uuid4().hex,
        "reports": m.Report.objects.visible_to(user).filter(case=case).select_related("author").order_by("-version"),
        "audit_rows": [{**row, "payload_text": row["payload"]} for row in rows],
        "audit_problems": audit_log.verify_excerpt(rows),
        "read_only": not roles - {access.AUDITOR},
        "opts": m.AuditCase._meta,
        "poll_url": reverse("admin:governance_auditcase_review_status", args=[case.pk]),
    }


# --------------------------------------------------------------------------------------------------
# Views (wrapped in ``admin_site.admin_view`` by :func:`urls`)
# --------------------------------------------------------------------------------------------------


class ReviewViews:
    """The workspace's views, bound to one admin site."""

    template = "admin/governance/auditcase/review.html"

    def __init__(self, admin_site) -> None:
        self.admin_site = admin_site

    def page_url(self, case: m.AuditCase) -> str:
        return reverse("admin:governance_auditcase_review", args=[case.pk])

    def render(self, request: HttpRequest, case: m.AuditCase, *, error: str = "", status: int = 200) -> HttpResponse:
        context = review_context(request, case, self.admin_site)
        context["error"] = error
        return TemplateResponse(request, self.template, context, status=status)

    def page(self, request: HttpRequest, case_id: int) -> HttpResponse:
        return self.render(request, visible_case(request, case_id))

    def status(self, request: HttpRequest, case_id: int) -> JsonResponse:
        return JsonResponse(status_payload(visible_case(request, case_id)))

    def _act(self, request: HttpRequest, case_id: int, roles: frozenset[str], what: str, action) -> HttpResponse:
        case = visible_case(request, case_id)  # 404 before 403: never confirm a case outside the user's scope
        try:
            _require_roles(request.user, roles, what)
        except PermissionDenied as exc:
            return self.render(request, case, error=str(exc), status=403)
        try:
            message = action(case)
        except Refused as exc:
            return self.render(request, visible_case(request, case_id), error=str(exc), status=exc.status)
        except Exception as exc:  # noqa: BLE001 - _refusal re-raises anything it does not know
            refused = _refusal(exc)
            return self.render(request, visible_case(request, case_id), error=str(refused), status=refused.status)
        messages.success(request, message)
        return redirect(self.page_url(case), permanent=False)

    def _signoff_target(self, request: HttpRequest, case: m.AuditCase) -> m.Evidence | None:
        evidence_id = request.POST.get("evidence", "")
        if not evidence_id:
            return None
        if not evidence_id.isdigit():
            raise Refused("evidence must be an evidence id", 400)
        evidence = m.Evidence.objects.visible_to(request.user).filter(pk=int(evidence_id), run__case=case).first()
        if evidence is None:
            raise Refused(f"evidence #{evidence_id} is not part of case #{case.pk}", 400)
        return evidence

    def signoff(self, request: HttpRequest, case_id: int) -> HttpResponse:
        """Two steps: the form's POST shows what is being signed (decision, comment and the digest of
        the evidence as it stands); only the confirmation, which carries that digest back, records
        the sign-off, and only if the evidence still has that digest."""
        case = visible_case(request, case_id)
        try:
            _require_roles(request.user, SIGNOFF_ROLES, "Signing off")
        except PermissionDenied as exc:
            return self.render(request, case, error=str(exc), status=403)
        decision = request.POST.get("decision", "")
        comment = request.POST.get("comment", "").strip()
        # One "ack:<finding key>" field per open finding; only a case-level approval carries them.
        acknowledgements = {k[len(ACK_PREFIX):]: str(v).strip() for k, v in request.POST.items()
                            if k.startswith(ACK_PREFIX)}
        try:
            evidence = self._signoff_target(request, case)
        except Refused as exc:
            return self.render(request, case, error=str(exc), status=exc.status)
        form_id = f"evidence-{evidence.pk}" if evidence else "case"
        field_errors = {}
        if decision not in D.values:
            field_errors["decision"] = ("Choose a decision." if not decision else
                                        f"unknown decision {decision!r}; choose one of {', '.join(D.labels)}.")
        elif decision != D.APPROVE and not comment:
            field_errors["comment"] = f"A '{D(decision).label}' decision needs a comment saying why."
        if form_id == "case" and decision == D.APPROVE:
            missing = [f for f in acceptance.open_findings(case) if not acknowledgements.get(f["key"])]
            if missing:
                field_errors["acknowledgements"] = (
                    "Approving needs a reason for each open high or medium finding; missing: "
                    + "; ".join(f"{f['title']} (evidence #{f['evidence']})" for f in missing) + ".")
        if field_errors:
            context = review_context(request, case, self.admin_site)
            if form_id == "case":
                context.update(error="The sign-off was not recorded: see the form.", case_errors=field_errors,
                               case_values={"decision": decision, "comment": comment},
                               open_findings=[{**f, "reason": acknowledgements.get(f["key"], "")}
                                              for f in context["open_findings"]])
            else:
                context["error"] = f"The sign-off on {form_id.replace('-', ' #')} was not recorded: " + \
                    " ".join(field_errors.values())
            return TemplateResponse(request, self.template, context, status=400)
        confirmed = request.POST.get("digest", "")
        hint = signoff_hint(case, request.user)
        if hint and not confirmed:  # no confirmation screen for a sign-off the workflow would refuse
            return self.render(request, case, error=hint,
                               status=409 if case.state not in (S.EVIDENCE_READY, S.IN_REVIEW) else 403)
        digest = workflow.evidence_digest(evidence) if evidence is not None else workflow.case_digest(case)
        if not confirmed:
            acknowledged = [{**f, "reason": acknowledgements.get(f["key"], "")}
                            for f in acceptance.open_findings(case)] \
                if evidence is None and decision == D.APPROVE else []
            context = {**self.admin_site.each_context(request), "title": f"Confirm your sign-off on case #{case.pk}",
                       "acknowledged": acknowledged,
                       "case": case, "evidence": evidence, "decision": decision,
                       "decision_label": D(decision).label, "comment": comment, "digest": digest,
                       "opts": m.AuditCase._meta, "page_url": self.page_url(case)}
            return TemplateResponse(request, "admin/governance/auditcase/confirm_signoff.html", context)

        def act(case: m.AuditCase) -> str:
            if confirmed != digest:
                raise Refused("The evidence changed after you opened the confirmation (its digest is now "
                              f"{digest[:16]}...); nothing was recorded. Review it again.", 409)
            given = {k: v for k, v in acknowledgements.items() if v} \
                if evidence is None and decision == D.APPROVE else None
            signoff = workflow.sign_off(case, request.user, decision, comment, evidence=evidence,
                                        acknowledgements=given or None)
            target = f"evidence #{evidence.pk}" if evidence else f"case #{case.pk}"
            return (f"Recorded your '{signoff.get_decision_display()}' on {target} (digest {signoff.digest[:16]}...). "
                    f"The case is now {case.get_state_display()}.")

        return self._act(request, case_id, SIGNOFF_ROLES, "Signing off", act)

    def transition(self, request: HttpRequest, case_id: int) -> HttpResponse:
        def act(case: m.AuditCase) -> str:
            to_state = request.POST.get("to", "")
            if case.state == S.SUBMITTED and to_state == S.RUNNING or \
                    case.state == S.EVIDENCE_READY and to_state == S.RUNNING:
                # Starting (or re-running) creates and dispatches the runs: the pipeline's job.
                run_ids = pipeline.start_case(case.pk, by=request.user)
                return f"Queued {len(run_ids)} probe run(s) for case #{case.pk}."
            workflow.transition(case, to_state, request.user)
            return f"Case #{case.pk} is now {case.get_state_display()}."

        return self._act(request, case_id, TRANSITION_ROLES, "Changing the case's state", act)

    def report(self, request: HttpRequest, case_id: int) -> HttpResponse:
        """Issue a report version: once per form, however often the form is sent (the page's
        ``request_key``; a form without one, e.g. a scripted POST, is a request of its own)."""
        def act(case: m.AuditCase) -> str:
            if case.state in NO_EVIDENCE_YET:
                raise Refused(f"Case #{case.pk} is '{case.state}'; a report needs the evidence first.", 409)
            sent = request.POST.get("request_key", "").strip()
            if sent and not REQUEST_KEY.fullmatch(sent):
                raise Refused("request_key must be the 32 hexadecimal digits the page gave the form", 400)
            # Namespaced by user, so that one user's key can never name another's request.
            key = f"workspace:{request.user.pk}:{sent or uuid.uuid4().hex}"
            if not pipeline.broker_is_eager():
                from workers import tasks

                pipeline.check_broker()
                tasks.enqueue_on_commit(tasks.render_report, case.pk, request.user.pk, key)
                return ("The report is being rendered by a worker (queue 'reports'); "
                        "reload this page in a minute to download it.")
            from governance import report_requests

            report, created = report_requests.issue(case.pk, request.user, key)
            if not created:
                return (f"Report v{report.version} was already issued for this request "
                        f"(SHA-256 {report.sha256[:16]}...); no other version was made.")
            return f"Issued report v{report.version} (SHA-256 {report.sha256[:16]}...)."

        return self._act(request, case_id, REPORT_ROLES, "Issuing a report", act)

    def countersign(self, request: HttpRequest, case_id: int, report_id: int) -> HttpResponse:
        def act(case: m.AuditCase) -> str:
            from governance.reports.countersign import countersign, read_upload

            report = get_object_or_404(m.Report.objects.visible_to(request.user), pk=report_id, case=case)
            row = countersign(report, request.user, read_upload(request.FILES.get("file")))
            return (f"Stored your countersignature {row.sequence} of report v{report.version} "
                    f"(SHA-256 {row.sha256[:16]}...).")

        return self._act(request, case_id, frozenset({access.REVIEWER}), "Countersigning a report", act)

    def comment(self, request: HttpRequest, case_id: int) -> HttpResponse:
        def act(case: m.AuditCase) -> str:
            row = comments.add_comment(case, request.user, request.POST.get("finding", ""),
                                       request.POST.get("body", ""), reply_to=_reply_target(request, case))
            return f"Added your comment #{row.pk} to the thread."

        return self._act(request, case_id, comments.COMMENT_ROLES, "Commenting", act)

    def resolve_comment(self, request: HttpRequest, case_id: int, comment_id: int) -> HttpResponse:
        def act(case: m.AuditCase) -> str:
            row = get_object_or_404(m.FindingComment.objects.visible_to(request.user), pk=comment_id, case=case)
            comments.resolve(row, request.user)
            return f"Marked comment #{row.pk} resolved."

        return self._act(request, case_id, comments.RESOLVE_ROLES, "Resolving a comment", act)

    def compare(self, request: HttpRequest, case_id: int) -> HttpResponse:
        """The case's model version beside another version of the same model (``?with=<version id>``)."""
        from governance import compare

        case = visible_case(request, case_id)
        version = case.model_version
        others = list(m.ModelVersion.objects.visible_to(request.user).filter(ai_model_id=version.ai_model_id)
                      .exclude(pk=version.pk).order_by("-created_at", "-pk"))
        chosen = request.GET.get("with", "")
        other = next((v for v in others if str(v.pk) == chosen), None)
        if chosen and other is None:
            raise Http404(f"no other version #{chosen} of {version.ai_model} is visible to you")
        comparison = None
        if other is not None:
            older, newer = sorted((version, other), key=lambda v: (v.created_at, v.pk))
            comparison = {"a": older, "b": newer, **compare.compare_versions(older, newer, request.user)}
        context = {**self.admin_site.each_context(request), "title": f"Compare versions of {version.ai_model}",
                   "case": case, "version": version, "others": others, "chosen": other, "comparison": comparison,
                   "opts": m.AuditCase._meta, "page_url": self.page_url(case)}
        return TemplateResponse(request, "admin/governance/auditcase/compare.html", context)

    def report_diff(self, request: HttpRequest, case_id: int) -> HttpResponse:
        """What changed between two report versions of the case (``?from=<n>&to=<n>``; by default the
        latest against the one before)."""
        from governance import compare

        case = visible_case(request, case_id)
        reports = list(m.Report.objects.visible_to(request.user).filter(case=case).order_by("version"))
        by_version = {r.version: r for r in reports}

        def pick(name: str, default: int | None) -> m.Report | None:
            raw = request.GET.get(name, "")
            if not raw:
                return by_version.get(default) if default is not None else None
            if not raw.isdigit() or int(raw) not in by_version:
                raise Http404(f"case #{case.pk} has no report v{raw}")
            return by_version[int(raw)]

        newer = pick("to", reports[-1].version if reports else None)
        older = pick("from", newer.version - 1 if newer is not None else None)
        changes = compare.report_diff(older, newer) if older is not None and newer is not None else []
        context = {**self.admin_site.each_context(request), "title": f"Report changes of case #{case.pk}",
                   "case": case, "reports": reports, "older": older, "newer": newer, "changes": changes,
                   "opts": m.AuditCase._meta, "page_url": self.page_url(case)}
        return TemplateResponse(request, "admin/governance/auditcase/report_diff.html", context)

    def queue(self, request: HttpRequest) -> HttpResponse:
        """Cases awaiting the user's sign-off first, then every other case they can see."""
        user = request.user
        cases = (m.AuditCase.objects.visible_to(user)
                 .select_related("model_version__ai_model").prefetch_related("reviewers")
                 .order_by("-state_changed_at", "-pk"))
        mine: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for case in cases:
            row = queue_row(case, user)
            (mine if row["awaiting_me"] else others).append(row)
        context = {**self.admin_site.each_context(request), "title": "Review queue", "mine": mine, "others": others,
                   "opts": m.AuditCase._meta}
        return TemplateResponse(request, "admin/governance/auditcase/queue.html", context)

    def viewer(self, request: HttpRequest, case_id: int, artifact_id: int) -> HttpResponse:
        """One figure, large: zoom, the other figures of the same evidence one click away, the colour
        scale and box legend, and the scores of the evidence it belongs to."""
        case = visible_case(request, case_id)
        artifacts = m.EvidenceArtifact.objects.visible_to(request.user).select_related("evidence__run")
        artifact = get_object_or_404(artifacts, pk=artifact_id, evidence__run__case=case,
                                     content_type__in=INLINE_IMAGE_TYPES)
        evidence = artifact.evidence
        siblings = [a for a in sorted(evidence.artifacts.all(), key=lambda a: a.name)
                    if a.content_type in INLINE_IMAGE_TYPES]
        tables = explained_tables(evidence.kind, record_tables(evidence.metrics))
        context = {**self.admin_site.each_context(request), "title": f"{artifact.name}: evidence #{evidence.pk}",
                   "case": case, "artifact": artifact, "evidence": evidence, "siblings": siblings,
                   "alt": describe_figure(artifact, evidence), "tables": tables,
                   "prompts": _prompts(evidence), "opts": m.AuditCase._meta, "page_url": self.page_url(case)}
        return TemplateResponse(request, "admin/governance/auditcase/viewer.html", context)

    def artifact(self, request: HttpRequest, case_id: int, artifact_id: int) -> FileResponse:
        case = visible_case(request, case_id)
        artifact = get_object_or_404(m.EvidenceArtifact.objects.visible_to(request.user),
                                     pk=artifact_id, evidence__run__case=case)
        inline = artifact.content_type in INLINE_IMAGE_TYPES
        try:
            handle = artifact.file.open("rb")
        except (FileNotFoundError, OSError) as exc:
            raise Http404(f"the file of artifact #{artifact.pk} is missing from storage") from exc
        response = FileResponse(handle, as_attachment=not inline, filename=artifact.name,
                                content_type=artifact.content_type if inline else "application/octet-stream")
        response["X-Content-SHA256"] = artifact.sha256
        # Evidence files are data, never active content, even if someone opens one directly.
        response["Content-Security-Policy"] = "default-src 'none'; sandbox"
        return response

    def report_download(self, request: HttpRequest, case_id: int, report_id: int) -> FileResponse:
        case = visible_case(request, case_id)
        report = get_object_or_404(m.Report.objects.visible_to(request.user), pk=report_id, case=case)
        response = FileResponse(report.pdf.open("rb"), as_attachment=True, content_type="application/pdf",
                                filename=f"loupe-case-{case.pk}-report-v{report.version}.pdf")
        response["X-Content-SHA256"] = report.sha256
        return response


def _reply_target(request: HttpRequest, case: m.AuditCase) -> m.FindingComment | None:
    raw = request.POST.get("reply_to", "")
    if not raw:
        return None
    if not raw.isdigit():
        raise Refused("reply_to must be a comment id", 400)
    row = m.FindingComment.objects.visible_to(request.user).filter(pk=int(raw), case=case).first()
    if row is None:
        raise Refused(f"comment #{raw} is not part of case #{case.pk}", 400)
    return row


def urls(admin_site) -> list:
    """URL patterns for :class:`~governance.admin.AuditCaseAdmin.get_urls`."""
    views = ReviewViews(admin_site)
    wrap = admin_site.admin_view
    prefix = "<int:case_id>/review/"
    name = "governance_auditcase_review"
    return [
        path("queue/", wrap(require_GET(views.queue)), name="governance_auditcase_queue"),
        path(prefix + "artifact/<int:artifact_id>/view/", wrap(require_GET(views.viewer)), name=f"{name}_viewer"),
        path(prefix, wrap(require_GET(views.page)), name=name),
        path(prefix + "status.json", wrap(require_GET(views.status)), name=f"{name}_status"),
        path(prefix + "signoff/", wrap(require_POST(views.signoff)), name=f"{name}_signoff"),
        path(prefix + "transition/", wrap(require_POST(views.transition)), name=f"{name}_transition"),
        path(prefix + "report/", wrap(require_POST(views.report)), name=f"{name}_report"),
        path(prefix + "compare/", wrap(require_GET(views.compare)), name=f"{name}_compare"),
        path(prefix + "reports/diff/", wrap(require_GET(views.report_diff)), name=f"{name}_report_diff"),
        path(prefix + "comments/", wrap(require_POST(views.comment)), name=f"{name}_comment"),
        path(prefix + "comments/<int:comment_id>/resolve/", wrap(require_POST(views.resolve_comment)),
             name=f"{name}_comment_resolve"),
        path(prefix + "artifact/<int:artifact_id>/", wrap(require_GET(views.artifact)), name=f"{name}_artifact"),
        path(prefix + "reports/<int:report_id>/download/", wrap(require_GET(views.report_download)),
             name=f"{name}_report_download"),
        path(prefix + "reports/<int:report_id>/countersign/", wrap(require_POST(views.countersign)),
             name=f"{name}_report_countersign"),
    ]

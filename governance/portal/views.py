"""Views of the landing page and the provider portal (see :mod:`governance.portal`)."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from governance import access, admin_review, comments, pipeline, registration, workflow
from governance import models as m
from governance.api.errors import domain_error

S = m.AuditCase.State

PLAN_TEMPLATES: dict[str, dict[str, Any]] = {
    "quick": {"label": "Quick grounding check (one method, 8 images; minutes)",
              "plan": [{"kind": "grounding", "params": {"methods": "chefer", "limit": 8}, "dataset": "zoo:heldout"}]},
    "dual_encoder": {"label": "Full audit of a dual encoder (CLIP, SigLIP): grounding, sanity, robustness, attention",
                     "plan": registration.DEFAULT_PLANS["dual_encoder"]},
    "generative_fusion": {"label": "Audit of a generative model (LLaVA, BLIP-2): token attribution, "
                                   "attention statistics",
                          "plan": registration.DEFAULT_PLANS["generative_fusion"]},
}


@require_GET
def landing(request: HttpRequest) -> HttpResponse:
    """What Loupe is and where to go next, by role."""
    roles = access.roles_of(request.user)
    return TemplateResponse(request, "portal/landing.html", {
        "roles": sorted(roles), "is_provider": access.SUBMITTER in roles,
        "is_staff": request.user.is_authenticated and request.user.is_staff})


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    models = m.AIModel.objects.visible_to(user).prefetch_related("versions").order_by("name")
    cases = (m.AuditCase.objects.visible_to(user).select_related("model_version__ai_model")
             .order_by("-state_changed_at", "-pk"))
    versions = m.ModelVersion.objects.visible_to(user).select_related("ai_model").order_by("ai_model__name", "version")
    organisation = access.organisation_of(user)
    return TemplateResponse(request, "portal/home.html", {
        "models": models, "cases": cases, "versions": versions, "organisation": organisation,
        "can_create": access.can_create_for(user, organisation),
        "plan_templates": {key: t["plan"] for key, t in PLAN_TEMPLATES.items()},
        "plan_choices": [(key, t["label"]) for key, t in PLAN_TEMPLATES.items()],
        "risk_choices": m.AIModel.RiskCategory.choices})


def _case(request: HttpRequest, case_id: int) -> m.AuditCase:
    return get_object_or_404(m.AuditCase.objects.visible_to(request.user)
                             .select_related("model_version__ai_model"), pk=case_id)


@login_required
@require_GET
def case_page(request: HttpRequest, case_id: int) -> HttpResponse:
    return _render_case(request, case_id)


def _render_case(request: HttpRequest, case_id: int, *, error: str = "", status: int = 200) -> HttpResponse:
    case = _case(request, case_id)
    user = request.user
    evidence = admin_review.evidence_views(case, user)
    other_threads = admin_review.attach_threads(case, user, evidence)
    review = workflow.review_status(case)
    progress = admin_review.status_payload(case)
    change_requests = (m.Signoff.objects.visible_to(user).filter(case=case)
                       .exclude(decision=m.Signoff.Decision.APPROVE).select_related("reviewer")
                       .order_by("-created_at", "-pk"))
    actions = []
    for to in workflow.available_transitions(case, user):
        if to == S.SUBMITTED:
            actions.append({"to": to, "label": "Resubmit with my answer" if case.state == S.CHANGES_REQUESTED
                            else "Submit for probing"})
        elif to == S.RUNNING and case.state == S.SUBMITTED:
            actions.append({"to": to, "label": "Start probe runs"})
        elif to == S.DRAFT:
            actions.append({"to": to, "label": "Withdraw (back to draft)"})
    return TemplateResponse(request, "portal/case.html", {
        "case": case, "version": case.model_version, "evidence": evidence, "status": progress,
        "runs": admin_review.run_rows(case),
        "decision": admin_review.decision_summary(case, evidence, review, progress),
        "change_requests": change_requests, "actions": actions, "error": error,
        "other_threads": other_threads, "can_comment": comments.can_comment(case, user),
        "can_resolve": comments.can_resolve(case, user),
        "poll_url": reverse("portal:case_status", args=[case.pk])}, status=status)


@login_required
@require_GET
def case_status(request: HttpRequest, case_id: int) -> JsonResponse:
    return JsonResponse(admin_review.status_payload(_case(request, case_id)))


@login_required
@require_POST
def case_transition(request: HttpRequest, case_id: int) -> HttpResponse:
    """Submit, resubmit (with an answer to the change request), start runs or withdraw: the workflow
    and the pipeline decide, as for the API."""
    case = _case(request, case_id)
    to_state = request.POST.get("to", "")
    answer = request.POST.get("answer", "").strip()
    try:
        if to_state == S.RUNNING and case.state == S.SUBMITTED:
            run_ids = pipeline.start_case(case.pk, by=request.user)
            message = f"Started {len(run_ids)} probe run(s); their progress shows below."
        elif to_state == S.SUBMITTED and case.state == S.CHANGES_REQUESTED:
            if not answer:
                return _render_case(request, case_id, error="Answer the change request before resubmitting.",
                                    status=400)
            workflow.transition(case, S.SUBMITTED, request.user, note=answer)
            message = "Resubmitted with your answer; start the probe runs when ready."
        else:
            workflow.transition(case, to_state, request.user)
            message = f"The case is now {case.get_state_display()}."
    except Exception as exc:  # noqa: BLE001 - only the service's own errors are shown; others re-raise
        known = domain_error(exc)
        if known is None:
            raise
        return _render_case(request, case_id, error=str(exc), status=known[1])
    messages.success(request, message)
    return redirect("portal:case", case_id=case.pk)


@login_required
@require_POST
def case_comment(request: HttpRequest, case_id: int) -> HttpResponse:
    """The provider answers in a finding's thread (governance/comments.py decides who may)."""
    case = _case(request, case_id)
    try:
        reply_to = None
        raw = request.POST.get("reply_to", "")
        if raw.isdigit():
            reply_to = m.FindingComment.objects.visible_to(request.user).filter(pk=int(raw), case=case).first()
        row = comments.add_comment(case, request.user, request.POST.get("finding", ""), request.POST.get("body", ""),
                                   reply_to=reply_to)
    except Exception as exc:  # noqa: BLE001 - only the service's own errors are shown; others re-raise
        known = domain_error(exc)
        if known is None:
            raise
        return _render_case(request, case_id, error=str(exc), status=known[1])
    messages.success(request, f"Added your comment #{row.pk}; the reviewers are notified.")
    return redirect(reverse("portal:case", args=[case.pk]) + f"#thread-{comments.anchor(row.finding)}")


@login_required
@require_POST
def case_comment_resolve(request: HttpRequest, case_id: int, comment_id: int) -> HttpResponse:
    case = _case(request, case_id)
    row = get_object_or_404(m.FindingComment.objects.visible_to(request.user), pk=comment_id, case=case)
    try:
        comments.resolve(row, request.user)
    except Exception as exc:  # noqa: BLE001 - only the service's own errors are shown; others re-raise
        known = domain_error(exc)
        if known is None:
            raise
        return _render_case(request, case_id, error=str(exc), status=known[1])
    return redirect("portal:case", case_id=case.pk)


@login_required
@require_GET
def artifact(request: HttpRequest, case_id: int, artifact_id: int):
    """Evidence files for the provider, through the workspace's permission-checked view."""
    return admin_review.ReviewViews(None).artifact(request, case_id, artifact_id)

"""Admin registration for every governance model.

- Every list and change page starts from :func:`governance.access.narrow` (the rule behind
  ``Model.objects.visible_to(request.user)``): the admin shows exactly what the API shows.
- Evidence, artifacts, sign-offs, reports and audit events are read-only here: no add, change or
  delete for anyone (sign-offs are made through :func:`governance.workflow.sign_off`, reports by the
  report service, evidence by workers).
- Case states are read-only fields: transitions go through :mod:`governance.workflow`. Reviewer
  assignment goes through ``workflow.assign_reviewers`` (segregation-of-duties checks).
- Every change made here is written to the audit log in the admin's own transaction.

The reviewer workspace (``<case>/review/``, :mod:`governance.admin_review`) hangs off
:class:`AuditCaseAdmin`: its URLs, a "review" column in the list and a link on the change page.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils.html import format_html

from governance import access, admin_review, audit_log, workflow
from governance import models as m

admin.site.site_header = "Loupe"
admin.site.site_title = "Loupe"
admin.site.index_title = "Loupe administration"


class VisibleToAdmin(admin.ModelAdmin):
    """Narrows the queryset centrally and logs every change made through the admin."""

    def get_queryset(self, request):
        return access.narrow(super().get_queryset(request), request.user)

    def has_change_permission(self, request, obj=None):
        if obj is not None and isinstance(obj, (m.AIModel, m.ModelVersion, m.AuditCase)) \
                and not access.can_edit(request.user, obj):
            return False
        return super().has_change_permission(request, obj)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)

        class Guarded(form):  # type: ignore[valid-type, misc]
            """Shows the model's refusal to change a frozen field on the form, instead of the
            ImmutableError its save() raises (a server error in the middle of the admin's save)."""

            def _post_clean(self) -> None:
                super()._post_clean()
                refused = getattr(self.instance, "frozen_change_refusal", None)
                refusal = refused() if refused is not None else None
                if refusal:
                    self.add_error(None, refusal)

        return Guarded

    def save_model(self, request, obj, form, change):
        if not change and hasattr(obj, "created_by_id") and obj.created_by_id is None:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)
        audit_log.record(request.user, f"{obj._meta.model_name}.{'updated' if change else 'created'}", obj,
                         {"fields": sorted(form.changed_data), "via": "admin"})

    def delete_model(self, request, obj):
        audit_log.record(request.user, f"{obj._meta.model_name}.deleted", obj, {"repr": str(obj), "via": "admin"})
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)


class ReadOnlyAdmin(VisibleToAdmin):
    """For immutable records: view only, for everyone."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(m.Organisation)
class OrganisationAdmin(VisibleToAdmin):
    list_display = ("name", "slug", "contact_email", "created_at")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}


@admin.register(m.Membership)
class MembershipAdmin(VisibleToAdmin):
    list_display = ("user", "organisation", "created_at")
    list_filter = ("organisation",)
    search_fields = ("user__username", "organisation__name")
    autocomplete_fields = ("organisation",)


@admin.register(m.AIModel)
class AIModelAdmin(VisibleToAdmin):
    list_display = ("name", "organisation", "provider_name", "risk_category", "annex_iii_area", "modality")
    list_filter = ("risk_category", "modality", "organisation")
    search_fields = ("name", "provider_name", "intended_purpose")
    readonly_fields = ("created_by", "created_at", "updated_at")


@admin.register(m.ModelVersion)
class ModelVersionAdmin(VisibleToAdmin):
    list_display = ("__str__", "source", "architecture_family", "short_manifest_hash", "created_at")
    list_filter = ("source", "architecture_family")
    search_fields = ("ai_model__name", "version", "hub_id")
    readonly_fields = ("manifest", "manifest_hash", "architecture_family", "architecture_detail", "created_by",
                       "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("ai_model", "version")}),
        ("Artifact", {"fields": ("source", "archive", "server_path", "hub_id", "hub_revision", "manifest_hash",
                                 "manifest", "architecture_family", "architecture_detail")}),
        ("Model card", {"fields": m.ModelVersion.CARD_FIELDS + ("card_metadata",)}),
        ("History", {"fields": ("created_by", "created_at", "updated_at")}),
    )

    @admin.display(description="manifest")
    def short_manifest_hash(self, obj):
        return obj.manifest_hash[:12]


class AuditCaseForm(forms.ModelForm):
    class Meta:
        model = m.AuditCase
        fields = ("model_version", "title", "scope", "probe_plan", "required_approvals", "reviewers")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        reviewers = self.fields.get("reviewers")
        if isinstance(reviewers, forms.ModelMultipleChoiceField):
            reviewers.queryset = get_user_model().objects.filter(
                groups__name=access.REVIEWER, is_active=True).distinct()

    def clean(self):
        super().clean()
        cleaned = self.cleaned_data
        reviewers = cleaned.get("reviewers")
        version = cleaned.get("model_version") or getattr(self.instance, "model_version", None)
        if reviewers and version is not None:
            case = self.instance if self.instance.pk else m.AuditCase(model_version=version, created_by=self.user)
            for user in reviewers:
                conflict = workflow.conflict_of(case, user)
                if conflict:
                    self.add_error("reviewers", f"segregation of duties: {conflict}")
        return cleaned


class RunInline(ReadOnlyInline):
    model = m.ProbeRun
    fields = ("kind", "status", "progress", "phase", "device", "started_at", "finished_at", "error")
    readonly_fields = fields


class SignoffInline(ReadOnlyInline):
    model = m.Signoff
    fields = ("reviewer", "decision", "evidence", "report_section", "comment", "digest", "review_round", "created_at")
    readonly_fields = fields


@admin.register(m.AuditCase)
class AuditCaseAdmin(VisibleToAdmin):
    form = AuditCaseForm
    # The title opens the review workspace (what people come for); "edit" opens the change form.
    list_display = ("case_link", "review_link", "model_version", "state", "required_approvals", "state_changed_at",
                    "edit_link")
    list_display_links = ("edit_link",)
    list_filter = ("state",)
    change_form_template = "admin/governance/auditcase/change_form.html"
    search_fields = ("title", "model_version__ai_model__name")
    readonly_fields = ("state", "review_round", "created_by", "submitted_by", "submitted_at", "state_changed_at",
                       "created_at", "updated_at")
    inlines = (RunInline, SignoffInline)

    def get_urls(self):
        return admin_review.urls(self.admin_site) + super().get_urls()

    @admin.display(description="case", ordering="title")
    def case_link(self, obj):
        return format_html('<a href="{}">{}</a>', reverse("admin:governance_auditcase_review", args=[obj.pk]), obj)

    @admin.display(description="edit")
    def edit_link(self, obj):
        return "Edit"

    @admin.display(description="review")
    def review_link(self, obj):
        return format_html('<a href="{}">Review workspace</a>',
                           reverse("admin:governance_auditcase_review", args=[obj.pk]))

    def get_form(self, request, obj=None, change=False, **kwargs):
        form_class = super().get_form(request, obj, change, **kwargs)
        if not access.is_admin(request.user):
            form_class.base_fields.pop("reviewers", None)

        class BoundForm(form_class):  # type: ignore[valid-type,misc]  # a class ModelAdmin builds at run time
            def __init__(self, *args, **kw):
                super().__init__(*args, user=request.user, **kw)

        return BoundForm

    def get_fields(self, request, obj=None):
        fields = list(super().get_fields(request, obj))
        if not access.is_admin(request.user) and "reviewers" in fields:
            fields.remove("reviewers")
        return fields

    def save_related(self, request, form, formsets, change):
        # Reviewer changes go through the workflow (admin-only, conflict checks, logged).
        reviewers = form.cleaned_data.pop("reviewers", None)
        super().save_related(request, form, formsets, change)
        if reviewers is not None and set(reviewers) != set(form.instance.reviewers.all()):
            workflow.assign_reviewers(form.instance, reviewers, by=request.user)


@admin.register(m.ProbeRun)
class ProbeRunAdmin(VisibleToAdmin):
    list_display = ("__str__", "case", "kind", "status", "progress", "device", "started_at", "finished_at")
    list_filter = ("status", "kind", "device")
    search_fields = ("kind", "task_id", "idempotency_key")
    readonly_fields = [f.name for f in m.ProbeRun._meta.fields]

    def has_add_permission(self, request):
        return False  # runs come from a case's probe plan

    def has_change_permission(self, request, obj=None):
        return False  # workers and the workflow change runs; a finished run is frozen

    def has_delete_permission(self, request, obj=None):
        return False


class ArtifactInline(ReadOnlyInline):
    model = m.EvidenceArtifact
    fields = ("name", "content_type", "size", "sha256")
    readonly_fields = fields


@admin.register(m.Evidence)
class EvidenceAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "run", "kind", "max_severity", "created_at")
    list_filter = ("kind",)
    readonly_fields = ("run", "kind", "metrics", "summary", "findings", "created_at")
    inlines = (ArtifactInline,)


@admin.register(m.EvidenceArtifact)
class EvidenceArtifactAdmin(ReadOnlyAdmin):
    list_display = ("name", "evidence", "content_type", "size", "sha256")
    readonly_fields = ("evidence", "name", "file", "content_type", "sha256", "size", "created_at")


@admin.register(m.Signoff)
class SignoffAdmin(ReadOnlyAdmin):
    list_display = ("case", "reviewer", "decision", "evidence", "report_section", "review_round", "created_at")
    list_filter = ("decision",)
    readonly_fields = ("case", "evidence", "report_section", "reviewer", "decision", "comment", "digest",
                       "review_round", "created_at")


@admin.register(m.Report)
class ReportAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "case", "version", "author", "sha256", "created_at")
    readonly_fields = ("case", "version", "pdf", "sha256", "manifest", "author", "created_at", "supersedes",
                       "changelog")


@admin.register(m.AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("seq", "created_at", "actor_label", "action", "object_type", "object_id", "short_row_hash")
    list_filter = ("action", "object_type")
    search_fields = ("action", "actor_label", "object_id")
    readonly_fields = ("seq", "created_at", "actor", "actor_label", "action", "object_type", "object_id",
                       "organisation", "case", "payload", "payload_hash", "prev_hash", "row_hash")

    @admin.display(description="row hash")
    def short_row_hash(self, obj):
        return format_html("<code>{}</code>", obj.row_hash[:16])


@admin.register(m.AuditChainHead)
class AuditChainHeadAdmin(ReadOnlyAdmin):
    list_display = ("seq", "row_hash", "updated_at")

    def get_queryset(self, request):
        qs = admin.ModelAdmin.get_queryset(self, request)
        return qs if access.is_admin(request.user) or access.is_auditor(request.user) else qs.none()


class CriterionForm(forms.ModelForm):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=True,
                             help_text="Why this criterion changes; recorded in the audit log and shown in the report.")

    class Meta:
        model = m.AcceptanceCriterion
        fields = ("comparator", "threshold", "reference", "severity", "where")


@admin.register(m.AcceptanceCriterion)
class AcceptanceCriterionAdmin(VisibleToAdmin):
    """Criteria change only through :func:`governance.acceptance.set_criterion` (admins, with a reason)."""

    form = CriterionForm
    list_display = ("case", "kind", "metric", "comparator", "threshold", "reference", "severity", "source",
                    "updated_at")
    list_filter = ("kind", "severity", "source")
    readonly_fields = ("case", "kind", "metric", "source", "rationale", "updated_by", "updated_at")

    def has_add_permission(self, request, obj=None):
        return False  # defaults are stored with the case; a new metric's criterion comes through the API

    def has_change_permission(self, request, obj=None):
        return access.is_admin(request.user)

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        from governance import acceptance

        data = {name: form.cleaned_data.get(name) for name in ("comparator", "threshold", "reference", "severity",
                                                               "where")}
        acceptance.set_criterion(obj.case, kind=obj.kind, metric=obj.metric, by=request.user,
                                 reason=form.cleaned_data["reason"], **data)


@admin.register(m.FindingAcknowledgement)
class FindingAcknowledgementAdmin(ReadOnlyAdmin):
    list_display = ("case", "finding", "reviewer", "review_round", "created_at")
    readonly_fields = ("case", "signoff", "finding", "reviewer", "reason", "review_round", "created_at")


@admin.register(m.ProviderDocument)
class ProviderDocumentAdmin(ReadOnlyAdmin):
    list_display = ("model_version", "doc_type", "version", "title", "sha256", "created_at")
    list_filter = ("doc_type",)
    readonly_fields = ("model_version", "doc_type", "version", "title", "file", "content_type", "sha256", "size",
                       "uploaded_by", "created_at")

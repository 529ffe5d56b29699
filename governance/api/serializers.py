"""Serializers: the API's field lists and input validation. No business logic here: model
validators (probe plan, findings, constraints) run through ``full_clean`` in the views, workflow rules
live in :mod:`governance.workflow`."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from governance import access
from governance import models as m
from governance.api.plan_schema import ProbePlanField

User = get_user_model()


class VisibleRelatedField(serializers.PrimaryKeyRelatedField):
    """A foreign key the requesting user may point at: only objects they can see (an invisible id
    reads as "does not exist", never "forbidden")."""

    def get_queryset(self):
        request = self.context.get("request")
        queryset = super().get_queryset()
        assert queryset is not None  # every VisibleRelatedField is declared with a queryset
        return access.narrow(queryset, request.user if request else None)


class ReviewerField(serializers.PrimaryKeyRelatedField):
    """A user id that must belong to an active reviewer."""

    def __init__(self, **kwargs):
        kwargs.setdefault("queryset", User.objects.all())
        super().__init__(**kwargs)

    def get_queryset(self):
        return User.objects.filter(groups__name=access.REVIEWER, is_active=True).distinct()


class OrganisationSerializer(serializers.ModelSerializer):
    class Meta:
        model = m.Organisation
        fields = ["id", "name", "slug", "contact_email", "created_at"]
        read_only_fields = fields


class AIModelSerializer(serializers.ModelSerializer):
    organisation = VisibleRelatedField(
        queryset=m.Organisation.objects.all(), required=False,
        help_text="Defaults to the submitter's own organisation; admins must name one.")

    class Meta:
        model = m.AIModel
        fields = ["id", "organisation", "name", "provider_name", "provider_contact", "intended_purpose", "modality",
                  "risk_category", "annex_iii_area", "created_by", "created_at", "updated_at"]
        read_only_fields = ["created_by", "created_at", "updated_at"]
        # The (organisation, name) uniqueness is checked by the model's full_clean in the view, after
        # the default organisation is filled in.
        validators: list[Any] = []


CARD_FIELDS = list(m.ModelVersion.CARD_FIELDS)


class ModelVersionSerializer(serializers.ModelSerializer):
    ai_model = VisibleRelatedField(queryset=m.AIModel.objects.all())
    # Every source is documented (a version read back may be 'archive'); creating one with 'archive'
    # is refused with the way to do it.
    # The model's "source" field, declared here; it shadows the Field.source attribute only for mypy.
    source = serializers.ChoiceField(  # type: ignore[assignment]
        choices=m.ModelVersion.Source.choices,
        help_text="'path' (admins: a directory below LOUPE_MODEL_ROOTS) or 'hub' (an id with a pinned 40-hex "
                  "revision). 'archive' versions are created by POST /api/versions/upload/.")
    archive_url = serializers.SerializerMethodField()

    def validate_source(self, value):
        if value == m.ModelVersion.Source.ARCHIVE:
            raise serializers.ValidationError("Upload the archive with POST /api/versions/upload/.")
        return value

    class Meta:
        model = m.ModelVersion
        fields = ["id", "ai_model", "version", "source", "server_path", "hub_id", "hub_revision", "archive_url",
                  "manifest", "manifest_hash", "architecture_family", "architecture_detail", *CARD_FIELDS,
                  "card_metadata", "created_by", "created_at", "updated_at"]
        read_only_fields = ["manifest", "manifest_hash", "architecture_family", "architecture_detail", "created_by",
                            "created_at", "updated_at"]
        validators: list[Any] = []

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_archive_url(self, obj) -> str | None:
        if not obj.archive:
            return None
        return reverse("version-archive", args=[obj.pk], request=self.context.get("request"))


class ModelVersionUpdateSerializer(ModelVersionSerializer):
    """After creation only the label and the model card change; the artifact is fixed (a different
    artifact is a different version)."""

    class Meta(ModelVersionSerializer.Meta):
        read_only_fields = [*ModelVersionSerializer.Meta.read_only_fields, "ai_model", "source", "server_path",
                            "hub_id", "hub_revision"]


class ModelVersionUploadSerializer(serializers.Serializer):
    ai_model = VisibleRelatedField(queryset=m.AIModel.objects.all())
    version = serializers.CharField(max_length=100)
    archive = serializers.FileField(help_text="A .zip or .tar.gz of a Hugging Face-format model directory: "
                                              "config.json and *.safetensors; pickled weights are refused.")


class ModelVersionUploadResultSerializer(ModelVersionSerializer):
    """The created version, plus the pickled weights found next to the safetensors and skipped."""

    ignored_files = serializers.ListField(
        child=serializers.CharField(), read_only=True,
        help_text="Pickle-format files in the archive (e.g. pytorch_model.bin) that were neither stored nor loaded.")

    class Meta(ModelVersionSerializer.Meta):
        fields = [*ModelVersionSerializer.Meta.fields, "ignored_files"]


class ModelCardImportSerializer(serializers.Serializer):
    card = serializers.CharField(max_length=1024 * 1024, trim_whitespace=False,
                                 help_text="README.md text: YAML metadata between --- lines, then ## sections.")


class AuditCaseSerializer(serializers.ModelSerializer):
    model_version = VisibleRelatedField(queryset=m.ModelVersion.objects.all())
    reviewers = ReviewerField(many=True, required=False,
                              help_text="User ids of reviewers (admins assign them; submitters cannot).")
    probe_plan = ProbePlanField(required=False, validators=[m.validate_probe_plan])
    approvals = serializers.SerializerMethodField()

    class Meta:
        model = m.AuditCase
        fields = ["id", "model_version", "title", "scope", "probe_plan", "reviewers", "required_approvals", "state",
                  "review_round", "approvals", "created_by", "submitted_by", "submitted_at", "state_changed_at",
                  "created_at", "updated_at"]
        read_only_fields = ["state", "review_round", "created_by", "submitted_by", "submitted_at", "state_changed_at",
                            "created_at", "updated_at"]

    def get_approvals(self, obj) -> int:
        return len({s.reviewer_id for s in obj.signoffs.all()
                    if s.decision == m.Signoff.Decision.APPROVE and s.review_round == obj.review_round
                    and s.is_case_level})

    def to_internal_value(self, data):
        # Segregation of duties is checked on the raw input, before the ids are looked up:
        # otherwise a reviewer's id passes the field and a non-reviewer's fails it, which would tell
        # a submitter who reviews. (validate() below repeats the check for other callers.)
        request = self.context.get("request")
        if not access.is_admin(request.user if request else None) and hasattr(data, "get"):
            errors = {}
            if data.get("reviewers") is not None:
                current = ({str(pk) for pk in self.instance.reviewers.values_list("pk", flat=True)}
                           if self.instance else set())
                given = data.getlist("reviewers") if hasattr(data, "getlist") else data.get("reviewers")
                if not isinstance(given, list) or {str(v) for v in given} != current:
                    errors["reviewers"] = ["Only an admin assigns reviewers (segregation of duties)."]
            if data.get("required_approvals") is not None:
                current_required = (self.instance.required_approvals if self.instance
                                    else m.AuditCase._meta.get_field("required_approvals").default)
                if str(data.get("required_approvals")) != str(current_required):
                    errors["required_approvals"] = ["Only an admin may change the number of required approvals."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)

    def validate(self, attrs):
        request = self.context.get("request")
        if access.is_admin(request.user if request else None):
            return attrs
        # Segregation of duties: a submitter neither picks their reviewers nor lowers the bar.
        if self.instance is not None:
            current_reviewers = set(self.instance.reviewers.all())
            current_required = self.instance.required_approvals
        else:
            current_reviewers, current_required = set(), m.AuditCase._meta.get_field("required_approvals").default
        errors = {}
        if "reviewers" in attrs and set(attrs["reviewers"]) != current_reviewers:
            errors["reviewers"] = "Only an admin assigns reviewers (segregation of duties)."
        if "required_approvals" in attrs and attrs["required_approvals"] != current_required:
            errors["required_approvals"] = "Only an admin may change the number of required approvals."
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class AuditCaseUpdateSerializer(AuditCaseSerializer):
    class Meta(AuditCaseSerializer.Meta):
        read_only_fields = [*AuditCaseSerializer.Meta.read_only_fields, "model_version"]


class ReviewerAssignmentSerializer(serializers.Serializer):
    reviewers = ReviewerField(many=True, help_text="User ids of the reviewers (replaces the current list).")


class ProbeRunSerializer(serializers.ModelSerializer):
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = m.ProbeRun
        fields = ["id", "case", "kind", "params", "dataset", "status", "progress", "phase", "created_at", "queued_at",
                  "started_at", "finished_at", "duration_seconds", "error", "task_id", "attempts", "device",
                  "model_manifest_hash", "dataset_hash", "code_version", "seed", "library_versions",
                  "heartbeat_at", "lease_expires_at"]
        read_only_fields = fields


class EvidenceArtifactSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = m.EvidenceArtifact
        fields = ["id", "evidence", "name", "content_type", "sha256", "size", "created_at", "download_url"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.URI)
    def get_download_url(self, obj) -> str:
        return reverse("artifact-download", args=[obj.pk], request=self.context.get("request"))


class EvidenceSerializer(serializers.ModelSerializer):
    case = serializers.IntegerField(source="run.case_id", read_only=True)
    artifacts = EvidenceArtifactSerializer(many=True, read_only=True)
    max_severity = serializers.CharField(read_only=True, allow_null=True)

    class Meta:
        model = m.Evidence
        fields = ["id", "run", "case", "kind", "metrics", "summary", "findings", "max_severity", "artifacts",
                  "created_at"]
        read_only_fields = fields


class SignoffSerializer(serializers.ModelSerializer):
    reviewer_username = serializers.CharField(source="reviewer.get_username", read_only=True)

    class Meta:
        model = m.Signoff
        fields = ["id", "case", "evidence", "report_section", "reviewer", "reviewer_username", "decision", "comment",
                  "digest", "review_round", "created_at"]
        read_only_fields = fields


class CaseEvidenceField(serializers.PrimaryKeyRelatedField):
    """An evidence id of the case being signed off: another case's evidence reads as "does not
    exist", exactly like a missing id."""

    def get_queryset(self):
        return m.Evidence.objects.filter(run__case=self.context["case"])


class SignoffRequestSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(choices=m.Signoff.Decision.choices)
    comment = serializers.CharField(required=False, allow_blank=True, max_length=10_000, default="")
    evidence = CaseEvidenceField(
        queryset=m.Evidence.objects.all(), required=False, allow_null=True, default=None,
        help_text="Sign off one evidence item of this case instead of the whole case.")
    report_section = serializers.CharField(required=False, allow_blank=True, max_length=100, default="")
    acknowledgements = serializers.DictField(
        child=serializers.CharField(max_length=2_000, allow_blank=False), required=False, default=dict,
        help_text="Approving with open high or medium findings: {finding key: reason} for each one "
                  "(keys from GET /api/cases/{id}/criteria/).")

    def validate_acknowledgements(self, value):
        if len(value) > 200:
            raise serializers.ValidationError("At most 200 acknowledgements per sign-off.")
        return value


class ReportSerializer(serializers.ModelSerializer):
    author_username = serializers.CharField(source="author.get_username", read_only=True)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = m.Report
        fields = ["id", "case", "version", "sha256", "author", "author_username", "created_at", "supersedes",
                  "changelog", "manifest", "download_url"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.URI)
    def get_download_url(self, obj) -> str:
        return reverse("report-download", args=[obj.pk], request=self.context.get("request"))


class CountersignatureSerializer(serializers.ModelSerializer):
    reviewer_username = serializers.CharField(source="reviewer.get_username", read_only=True)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = m.Countersignature
        fields = ["id", "report", "sequence", "reviewer", "reviewer_username", "sha256", "previous_sha256",
                  "cert_sha256", "signer", "created_at", "download_url"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.URI)
    def get_download_url(self, obj) -> str:
        return reverse("report-countersigned", args=[obj.report_id, obj.sequence], request=self.context.get("request"))


class AuditEventSerializer(serializers.ModelSerializer):
    # The event's payload, declared here; it shadows Serializer.data only for mypy.
    data = serializers.JSONField(read_only=True)  # type: ignore[assignment]

    class Meta:
        model = m.AuditEvent
        fields = ["id", "seq", "created_at", "actor", "actor_label", "action", "object_type", "object_id",
                  "organisation", "case", "data", "payload_hash", "prev_hash", "row_hash"]
        read_only_fields = fields


class ErrorSerializer(serializers.Serializer):
    """Every refusal: a stable machine code and a sentence for people (plus field errors where any)."""

    error = serializers.CharField()
    detail = serializers.JSONField()


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(min_length=1, max_length=150)
    password = serializers.CharField(min_length=1, max_length=4096, style={"input_type": "password"})


class TokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Send it as `Authorization: Token <token>`.")


class TaskQueuedSerializer(serializers.Serializer):
    detail = serializers.CharField()

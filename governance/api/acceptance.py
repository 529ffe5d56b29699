"""API for what a report's verdicts rest on: acceptance criteria per case and provider documents.

- ``GET  /api/cases/{id}/criteria/``: the case's criteria, each measured value's verdict and the open
  findings (their keys are what an approval acknowledges);
- ``POST /api/cases/{id}/criteria/`` (admins): change or add one criterion, with a reason (logged);
- ``GET  /api/documents/`` / ``GET /api/documents/{id}/`` / ``GET /api/documents/{id}/download/``;
- ``POST /api/documents/`` (multipart ``model_version``, ``doc_type``, ``title``, ``file``): attach a
  provider document as the next version of its type.

Visibility is the case's / the model version's (:mod:`governance.access`); the work is done by
:mod:`governance.acceptance` and :mod:`governance.provider_documents`.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from governance import acceptance, access, glossary, provider_documents
from governance import models as m
from governance.api.views import ADMIN, ERRORS, SUBMITTER, LoupeViewSet


class CriterionChangeSerializer(serializers.Serializer):
    kind = serializers.CharField(max_length=100)
    metric = serializers.CharField(max_length=200)
    comparator = serializers.ChoiceField(choices=m.AcceptanceCriterion.Comparator.choices, required=False)
    threshold = serializers.FloatField(required=False, allow_null=True)
    reference = serializers.CharField(max_length=200, required=False, allow_blank=True)
    severity = serializers.ChoiceField(choices=m.AcceptanceCriterion.Severity.choices, required=False)
    where = serializers.DictField(required=False)
    reason = serializers.CharField(max_length=2_000)


def _criteria_payload(case: m.AuditCase) -> dict:
    pairs = acceptance.case_specs(case)
    evidence = [{"id": e.pk, "kind": e.kind, "metrics": e.metrics}
                for e in m.Evidence.objects.filter(run__case=case).order_by("pk")]
    verdicts = acceptance.evaluate([s for s, _ in pairs], evidence)
    return {
        "criteria": [acceptance.entry_of(s, row) | {"text": s.describe(), "label": glossary.label(s.metric),
                                                    "meaning": glossary.meaning(s.metric)} for s, row in pairs],
        "stored": any(row is not None for _, row in pairs),
        "verdicts": [{"key": v.key, "criterion": v.criterion.describe(), "evidence": v.evidence, "subject": v.subject,
                      "value": v.value, "reference_value": v.reference_value, "interval": v.interval,
                      "verdict": v.verdict} for v in verdicts],
        "open_findings": [f for f in acceptance.findings(verdicts) if f["severity"] in acceptance.BLOCKING],
    }


class CaseCriteriaView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(operation_id="cases_criteria_list", summary="Acceptance criteria, verdicts and open findings",
                   responses={200: dict, **ERRORS})
    def get(self, request, pk: int):
        if not access.roles_of(request.user):
            raise PermissionDenied("Your account has no Loupe role.")
        case = get_object_or_404(m.AuditCase.objects.visible_to(request.user), pk=pk)
        return Response(_criteria_payload(case))

    @extend_schema(operation_id="cases_criteria_change",
                   summary="Change one acceptance criterion (admins, with a reason)",
                   request=CriterionChangeSerializer, responses={200: dict, **ERRORS})
    def post(self, request, pk: int):
        case = get_object_or_404(m.AuditCase.objects.visible_to(request.user), pk=pk)
        if not access.is_admin(request.user):
            raise PermissionDenied("Only an administrator may change acceptance criteria.")
        serializer = CriterionChangeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        try:
            acceptance.set_criterion(case, by=request.user, **data)
        except ValidationError as exc:
            raise DRFValidationError(exc.message_dict if hasattr(exc, "error_dict")
                                     else {"detail": exc.messages}) from None
        return Response(_criteria_payload(case))


class ProviderDocumentSerializer(serializers.ModelSerializer):
    doc_type_label = serializers.CharField(source="get_doc_type_display", read_only=True)
    uploaded_by = serializers.CharField(source="uploaded_by.get_username", read_only=True)

    class Meta:
        model = m.ProviderDocument
        fields = ["id", "model_version", "doc_type", "doc_type_label", "version", "title", "content_type", "sha256",
                  "size", "uploaded_by", "created_at"]
        read_only_fields = fields


class ProviderDocumentUploadSerializer(serializers.Serializer):
    model_version = serializers.PrimaryKeyRelatedField(queryset=m.ModelVersion.objects.all())
    doc_type = serializers.ChoiceField(choices=m.ProviderDocument.DocType.choices)
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    file = serializers.FileField()


class ProviderDocumentViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """Provider documents (append-only, versioned per type). Upload with ``POST`` (multipart)."""

    queryset = m.ProviderDocument.objects.select_related("model_version", "uploaded_by")
    serializer_class = ProviderDocumentSerializer
    filterset_fields = ["model_version", "doc_type"]
    action_roles = {"create": frozenset({SUBMITTER, ADMIN})}
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(request={"multipart/form-data": ProviderDocumentUploadSerializer},
                   responses={201: ProviderDocumentSerializer, **ERRORS})
    def create(self, request):
        if request.META.get("CONTENT_LENGTH", "0").isdigit() and \
                int(request.META["CONTENT_LENGTH"]) > provider_documents.max_bytes() + 64 * 1024:
            return Response({"detail": f"the document is larger than {provider_documents.max_bytes()} bytes; refused"},
                            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        serializer = ProviderDocumentUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        version = serializer.validated_data["model_version"]
        if not m.ModelVersion.objects.visible_to(request.user).filter(pk=version.pk).exists():
            raise DRFValidationError({"model_version": "No such model version."})
        if not access.can_create_for(request.user, version.ai_model.organisation):
            raise PermissionDenied("You may attach documents only to your own organisation's models.")
        upload = serializer.validated_data["file"]
        try:
            document = provider_documents.attach(version, doc_type=serializer.validated_data["doc_type"],
                                                 title=serializer.validated_data["title"], filename=upload.name,
                                                 stream=upload, by=request.user)
        except provider_documents.DocumentRejected as exc:
            raise DRFValidationError({"file": str(exc)}) from None
        return Response(ProviderDocumentSerializer(document).data, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Download the document", responses={200: bytes, **ERRORS})
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        document = self.get_object()
        response = FileResponse(document.file.open("rb"), content_type=document.content_type, as_attachment=True,
                                filename=document.file.name.rsplit("/", 1)[-1])
        response["X-Content-SHA256"] = document.sha256
        return response

"""Thin DRF viewsets (NetBox style). Each one:

- starts from ``Model.objects.visible_to(request.user)``: object visibility is decided once, in
  :mod:`governance.access`, so an object outside the user's scope is a 404;
- checks the role per action (:class:`~governance.api.permissions.RolePermission`) and, for edits,
  :func:`governance.access.can_edit`;
- delegates state changes to :mod:`governance.workflow`, sign-offs to ``workflow.sign_off``, reports
  to :mod:`governance.reports`, uploads to :mod:`governance.uploads`, work to :mod:`workers.tasks`.

Evidence, artifacts, sign-offs, reports and audit events are read-only here; sign-offs are created
only through ``POST /api/cases/{id}/signoff/``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from django.contrib.auth.models import User
from django.db import transaction
from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import NotAuthenticated, NotFound, PermissionDenied, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from governance import access, artifacts, audit_log, login_guard, modelcard, uploads, workflow
from governance import models as m
from governance.api import filters, serializers
from governance.api.permissions import CanEditObject, RolePermission
from governance.client_ip import LoginRateThrottle
from workers import tasks

SUBMITTER, REVIEWER, AUDITOR, ADMIN = access.SUBMITTER, access.REVIEWER, access.AUDITOR, access.ADMIN
WRITERS = frozenset({SUBMITTER, ADMIN})

ERRORS = {
    400: OpenApiResponse(serializers.ErrorSerializer, description="Invalid input (with a reason per field)."),
    403: OpenApiResponse(serializers.ErrorSerializer, description="Not allowed for this user."),
    404: OpenApiResponse(serializers.ErrorSerializer, description="No such object visible to this user."),
    409: OpenApiResponse(serializers.ErrorSerializer, description="Conflicts with the object's state."),
}


class ObtainTokenView(ObtainAuthToken):
    """Exchange a username and password for the user's API token (``Authorization: Token <key>``).

    Throttled per client address, and refused while that address is locked out after repeated
    failures (django-axes, shared with the admin login: governance/login_guard.py)."""

    throttle_classes = [LoginRateThrottle]

    @extend_schema(request=serializers.TokenRequestSerializer,
                   responses={200: serializers.TokenSerializer, 400: ERRORS[400],
                              429: OpenApiResponse(serializers.ErrorSerializer,
                                                   description="Too many attempts from this address.")})
    def post(self, request, *args, **kwargs):
        from axes.handlers.proxy import AxesProxyHandler

        # A body that is JSON but not an object (a number, a list) names no user; the serializer refuses it.
        username = request.data.get("username") if isinstance(request.data, Mapping) else None
        if not AxesProxyHandler.is_allowed(request._request, {"username": username}):
            return Response({"error": "locked_out", "detail": login_guard.MESSAGE}, status=429)
        return super().post(request, *args, **kwargs)


class Pagination(PageNumberPagination):
    """``?page=`` (from 1) and ``?page_size=`` (1 to 500); a page size outside that is refused, not
    silently replaced by the default."""

    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_number(self, request, paginator):
        raw = request.query_params.get(self.page_query_param)
        if raw is None:
            return 1
        if raw in self.last_page_strings:
            return raw
        if not raw.isdigit() or int(raw) < 1:
            raise ValidationError({self.page_query_param: ["A whole number from 1."]})
        return raw

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not raw.isdigit() or not 1 <= int(raw) <= self.max_page_size:
            raise ValidationError({self.page_size_query_param: [
                f"A whole number from 1 to {self.max_page_size}."]})
        return int(raw)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1}
            elif parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters


class LoupeViewSet(viewsets.GenericViewSet):
    """Common plumbing: central narrowing, role checks, pagination, one error shape."""

    permission_classes = [RolePermission, CanEditObject]
    pagination_class = Pagination
    # Ids are whole numbers below 2**63: anything else is not a route (a JSON 404).
    lookup_value_regex = "[0-9]{1,18}"
    action_roles: dict[str, frozenset[str]] = {}
    ordering = ["-pk"]

    def get_queryset(self):
        return access.narrow(super().get_queryset(), self.request.user)


def _signed_in(request: Request) -> User:
    """The request's user, for the rows it creates (RolePermission lets no anonymous request this far)."""
    if not isinstance(request.user, User):
        raise NotAuthenticated()
    return request.user


def _full_clean_and_save(instance, *, exclude: list[str] | None = None) -> None:
    # Model validators (probe plan, constraints, server-path roots) run here, so the API refuses
    # what the admin refuses, with the same messages.
    instance.full_clean(exclude=exclude)
    instance.save()


def _changes(instance, data: dict) -> dict:
    return {k: v for k, v in data.items() if getattr(instance, k, None) != v}


# --------------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------------


@extend_schema_view(list=extend_schema(summary="Organisations you can see"))
class OrganisationViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    queryset = m.Organisation.objects.all()
    serializer_class = serializers.OrganisationSerializer
    filterset_fields = ["slug"]
    ordering_fields = ["name", "created_at"]


@extend_schema_view(create=extend_schema(responses={201: serializers.AIModelSerializer, **ERRORS}),
                    update=extend_schema(responses={200: serializers.AIModelSerializer, **ERRORS}),
                    partial_update=extend_schema(responses={200: serializers.AIModelSerializer, **ERRORS}))
class AIModelViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                     mixins.UpdateModelMixin):
    """The model inventory: one entry per AI system, with its EU AI Act risk category."""

    queryset = m.AIModel.objects.select_related("organisation")
    serializer_class = serializers.AIModelSerializer
    filterset_class = filters.AIModelFilter
    ordering_fields = ["name", "created_at", "risk_category"]
    action_roles = {"create": WRITERS, "update": WRITERS, "partial_update": WRITERS}

    def perform_create(self, serializer):
        user = _signed_in(self.request)
        organisation = serializer.validated_data.get("organisation") or access.organisation_of(user)
        if organisation is None:
            raise PermissionDenied("Name the organisation this model belongs to.")
        if not access.can_create_for(user, organisation):
            raise PermissionDenied("You may register models only for your own organisation.")
        with transaction.atomic():
            instance = m.AIModel(**{**serializer.validated_data, "organisation": organisation}, created_by=user)
            _full_clean_and_save(instance)
            audit_log.record(user, "ai_model.created", instance, {"name": instance.name,
                                                                  "risk_category": instance.risk_category})
        serializer.instance = instance

    def perform_update(self, serializer):
        user = self.request.user
        organisation = serializer.validated_data.get("organisation")
        if organisation is not None and organisation != serializer.instance.organisation:
            raise PermissionDenied("A model cannot move to another organisation; register it there instead.")
        with transaction.atomic():
            instance = serializer.instance
            changed = _changes(instance, serializer.validated_data)
            for name, value in serializer.validated_data.items():
                setattr(instance, name, value)
            _full_clean_and_save(instance)
            audit_log.record(user, "ai_model.updated", instance, {"fields": sorted(changed)})


@extend_schema_view(create=extend_schema(responses={201: serializers.ModelVersionSerializer, **ERRORS}),
                    update=extend_schema(request=serializers.ModelVersionUpdateSerializer,
                                         responses={200: serializers.ModelVersionSerializer, **ERRORS}),
                    partial_update=extend_schema(request=serializers.ModelVersionUpdateSerializer,
                                                 responses={200: serializers.ModelVersionSerializer, **ERRORS}))
class ModelVersionViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                          mixins.UpdateModelMixin):
    """Model versions: the artifact (uploaded archive, server path or pinned hub id), its SHA-256
    manifest and detected architecture, and the model card."""

    queryset = m.ModelVersion.objects.select_related("ai_model__organisation")
    serializer_class = serializers.ModelVersionSerializer
    filterset_class = filters.ModelVersionFilter
    ordering_fields = ["created_at", "version"]
    action_roles = {"create": WRITERS, "update": WRITERS, "partial_update": WRITERS, "upload": WRITERS,
                    "manifest": WRITERS, "model_card": WRITERS}

    def get_serializer_class(self):
        if self.action in {"update", "partial_update"}:
            return serializers.ModelVersionUpdateSerializer
        if self.action == "upload":
            return serializers.ModelVersionUploadSerializer
        return super().get_serializer_class()

    def _check_can_add(self, ai_model: m.AIModel) -> None:
        if not access.can_create_for(self.request.user, ai_model.organisation):
            raise PermissionDenied("You may add versions only to your own organisation's models.")

    def perform_create(self, serializer):
        user = _signed_in(self.request)
        data = serializer.validated_data
        self._check_can_add(data["ai_model"])
        if data["source"] == m.ModelVersion.Source.PATH and not access.is_admin(user):
            # A server path reads files on Loupe's own disk: an operator decision, not a provider's.
            raise PermissionDenied("Only admins register server paths; upload an archive with /api/versions/upload/.")
        with transaction.atomic():
            instance = m.ModelVersion(**data, created_by=user)
            _full_clean_and_save(instance)
            audit_log.record(user, "model_version.created", instance, {
                "version": instance.version, "source": instance.source, "server_path": instance.server_path,
                "hub_id": instance.hub_id, "hub_revision": instance.hub_revision})
            if instance.source == m.ModelVersion.Source.PATH:
                tasks.enqueue_on_commit(tasks.compute_manifest, instance.pk)
        serializer.instance = instance

    def perform_update(self, serializer):
        with transaction.atomic():
            instance = serializer.instance
            changed = _changes(instance, serializer.validated_data)
            for name, value in serializer.validated_data.items():
                setattr(instance, name, value)
            _full_clean_and_save(instance)
            audit_log.record(self.request.user, "model_version.updated", instance, {"fields": sorted(changed)})

    @extend_schema(summary="Upload a model archive (.zip or .tar.gz of a Hugging Face-format directory)",
                   request={"multipart/form-data": serializers.ModelVersionUploadSerializer},
                   responses={201: serializers.ModelVersionUploadResultSerializer, 413: ERRORS[400], **ERRORS})
    @action(detail=False, methods=["post"], parser_classes=[MultiPartParser, FormParser])
    def upload(self, request):
        """Validate the archive (safetensors + config.json; no pickles, links, traversal or bombs), then
        create the version, move the unpacked directory into storage and log it, all or nothing. The
        manifest is computed by a worker after commit."""
        limit = uploads.UploadLimits.from_settings().max_archive_bytes
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit + 1024 * 1024:  # refuse before Django spools the body to disk
            return Response({"error": "archive_too_large",
                             "detail": f"the request is {declared} bytes; archives may be at most {limit} bytes"},
                            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        ai_model, label, upload = (serializer.validated_data[k] for k in ("ai_model", "version", "archive"))
        self._check_can_add(ai_model)
        if m.ModelVersion.objects.filter(ai_model=ai_model, version=label).exists():
            return Response({"error": "invalid", "detail": f"{ai_model} already has a version {label!r}.",
                             "fields": {"version": ["This version label is taken."]}}, status=400)
        archive_sha256 = hashlib.sha256()
        for chunk in upload.chunks():
            archive_sha256.update(chunk)
        upload.seek(0)
        destination: Path | None = None
        stored_name = ""
        limits = uploads.limits_for(ai_model.organisation)
        try:
            with (uploads.extracted_model_archive(upload.file, size=upload.size, limits=limits) as extracted,
                  transaction.atomic()):
                version = m.ModelVersion(ai_model=ai_model, version=label, source=m.ModelVersion.Source.ARCHIVE,
                                         created_by=request.user)
                version.archive.save(Path(upload.name).name[-100:] or "model.zip", upload, save=False)
                stored_name = version.archive.name or ""
                _full_clean_and_save(version)
                destination = artifacts.uploaded_model_directory(version)
                uploads.install_model_directory(extracted, destination)
                audit_log.record(request.user, "model_version.uploaded", version, {
                    "version": label, "archive": stored_name, "archive_sha256": archive_sha256.hexdigest(),
                    "archive_bytes": upload.size, "files": extracted.files,
                    "unpacked_bytes": extracted.unpacked_bytes, "ignored_files": extracted.ignored})
                if "README.md" in extracted.files:  # the Hugging Face model card travels with the model
                    modelcard.import_card(version, (destination / "README.md").read_bytes(), by=request.user)
                tasks.enqueue_on_commit(tasks.compute_manifest, version.pk)
        except BaseException:
            # Nothing half-written: the transaction rolled back, so remove what reached the disk.
            if destination is not None:
                uploads.remove_tree(destination)
            if stored_name:
                m.ModelVersion._meta.get_field("archive").storage.delete(stored_name)
            raise
        data = serializers.ModelVersionSerializer(version, context=self.get_serializer_context()).data
        return Response({**data, "ignored_files": extracted.ignored}, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Recompute the SHA-256 manifest and architecture family (on a worker)", request=None,
                   responses={202: serializers.TaskQueuedSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def manifest(self, request, pk=None):
        version = self.get_object()
        if not access.can_edit(request.user, version):
            raise PermissionDenied("You may not change this model version.")
        artifacts.model_directory(version)  # refuse now (409) rather than fail later on the worker
        tasks.enqueue_on_commit(tasks.compute_manifest, version.pk)
        return Response({"detail": f"manifest of {version} queued"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="The version as a Hugging Face model card (README.md with YAML metadata)",
                   responses={(200, "text/markdown"): OpenApiTypes.STR, 404: ERRORS[404]}, methods=["GET"])
    @extend_schema(summary="Replace the model-card fields from a Hugging Face model card",
                   request=serializers.ModelCardImportSerializer,
                   responses={200: serializers.ModelVersionSerializer, **ERRORS}, methods=["PUT"])
    @action(detail=True, methods=["get", "put"], url_path="model-card", url_name="model-card")
    def model_card(self, request, pk=None):
        version = self.get_object()
        if request.method == "GET":
            return HttpResponse(modelcard.export_card(version), content_type="text/markdown; charset=utf-8")
        if not access.can_edit(request.user, version):
            raise PermissionDenied("You may not change this model version.")
        serializer = serializers.ModelCardImportSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        modelcard.import_card(version, serializer.validated_data["card"], by=request.user)
        return Response(serializers.ModelVersionSerializer(version, context=self.get_serializer_context()).data)

    @extend_schema(summary="Download the uploaded archive",
                   responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, 404: ERRORS[404]})
    @action(detail=True, methods=["get"], url_path="archive", url_name="archive")
    def download(self, request, pk=None):
        version = self.get_object()
        if not version.archive:
            raise NotFound("This version was not uploaded as an archive.")
        return FileResponse(version.archive.open("rb"), as_attachment=True, filename=Path(version.archive.name).name,
                            content_type="application/octet-stream")


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def _start_case(case: m.AuditCase, user) -> list[int]:
    """Start a submitted case's probe runs (or re-run the failed ones): see governance/pipeline.py."""
    from governance import pipeline

    return pipeline.start_case(case.pk, by=user)


@extend_schema_view(create=extend_schema(responses={201: serializers.AuditCaseSerializer, **ERRORS}),
                    update=extend_schema(request=serializers.AuditCaseUpdateSerializer,
                                         responses={200: serializers.AuditCaseSerializer, **ERRORS}),
                    partial_update=extend_schema(request=serializers.AuditCaseUpdateSerializer,
                                                 responses={200: serializers.AuditCaseSerializer, **ERRORS}))
class AuditCaseViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                       mixins.UpdateModelMixin):
    """Audit cases and their workflow: submit, start runs, sign off, request reports."""

    queryset = m.AuditCase.objects.select_related("model_version__ai_model__organisation").prefetch_related(
        "reviewers", "signoffs")
    serializer_class = serializers.AuditCaseSerializer
    filterset_class = filters.AuditCaseFilter
    ordering_fields = ["created_at", "state", "state_changed_at"]
    action_roles = {
        "create": WRITERS, "update": WRITERS, "partial_update": WRITERS, "submit": WRITERS,
        "start": WRITERS, "reviewers": frozenset({ADMIN}),
        # Anyone but an auditor may try: the workflow then names the reason (e.g. segregation of duties).
        "signoff": frozenset({SUBMITTER, REVIEWER, ADMIN}),
        "request_report": frozenset({REVIEWER, ADMIN}), "rerun": WRITERS,
    }

    def get_serializer_class(self):
        if self.action in {"update", "partial_update"}:
            return serializers.AuditCaseUpdateSerializer
        if self.action == "signoff":
            return serializers.SignoffRequestSerializer
        if self.action == "reviewers":
            return serializers.ReviewerAssignmentSerializer
        return super().get_serializer_class()

    def get_serializer_context(self):
        context = dict(super().get_serializer_context())
        if self.action == "signoff" and self.kwargs.get("pk"):
            context["case"] = self.get_object()
        return context

    def _respond(self, case: m.AuditCase, http_status: int = status.HTTP_200_OK) -> Response:
        case = self.get_queryset().get(pk=case.pk)
        return Response(serializers.AuditCaseSerializer(case, context=self.get_serializer_context()).data,
                        status=http_status)

    def perform_create(self, serializer):
        user = _signed_in(self.request)
        data = dict(serializer.validated_data)
        reviewers = data.pop("reviewers", None)
        if not access.can_create_for(user, data["model_version"].ai_model.organisation):
            raise PermissionDenied("You may open cases only for your own organisation's models.")
        with transaction.atomic():
            case = m.AuditCase(**data, created_by=user)
            _full_clean_and_save(case)
            audit_log.record(user, "case.created", case, {"title": case.title, "probes": len(case.probe_plan)})
            if reviewers:
                workflow.assign_reviewers(case, reviewers, by=user)
        serializer.instance = case

    def perform_update(self, serializer):
        user = self.request.user
        data = dict(serializer.validated_data)
        reviewers = data.pop("reviewers", None)
        with transaction.atomic():
            case = workflow.lock_case(serializer.instance.pk)
            if not access.can_edit(user, case):  # re-checked under the lock: the state may have moved on
                raise PermissionDenied(f"Case #{case.pk} is '{case.state}' and can no longer be edited.")
            changed = _changes(case, data)
            for name, value in data.items():
                setattr(case, name, value)
            _full_clean_and_save(case)
            audit_log.record(user, "case.updated", case, {"fields": sorted(changed)})
            if reviewers is not None and set(reviewers) != set(case.reviewers.all()):
                workflow.assign_reviewers(case, reviewers, by=user)
        serializer.instance = case

    @extend_schema(summary="Assign the case's reviewers (admins; checked for conflicts of interest)",
                   request=serializers.ReviewerAssignmentSerializer,
                   responses={200: serializers.AuditCaseSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def reviewers(self, request, pk=None):
        case = self.get_object()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        workflow.assign_reviewers(case, serializer.validated_data["reviewers"], by=request.user)
        return self._respond(case)

    @extend_schema(summary="Submit the case for probing (draft or changes requested -> submitted)", request=None,
                   responses={200: serializers.AuditCaseSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def submit(self, request, pk=None):
        case = self.get_object()
        workflow.submit(case, by=request.user)
        return self._respond(case)

    @extend_schema(summary="Start the case's probe runs (submitted -> running)", request=None,
                   responses={202: serializers.AuditCaseSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        case = self.get_object()
        _start_case(case, request.user)
        return self._respond(case, status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Run the failed probes of a case again (evidence ready -> running; admins)", request=None,
                   responses={202: serializers.AuditCaseSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def rerun(self, request, pk=None):
        case = self.get_object()
        if case.state != m.AuditCase.State.EVIDENCE_READY:
            return Response({"error": "not_rerunnable",
                             "detail": f"Case #{case.pk} is '{case.state}'; failed probes are re-run once its "
                                       "evidence is ready."}, status=status.HTTP_409_CONFLICT)
        _start_case(case, request.user)
        return self._respond(case, status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Sign off the case (or one evidence item / report section)",
                   request=serializers.SignoffRequestSerializer,
                   responses={201: serializers.SignoffSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def signoff(self, request, pk=None):
        case = self.get_object()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        signoff = workflow.sign_off(case, request.user, **serializer.validated_data)
        return Response(serializers.SignoffSerializer(signoff, context=self.get_serializer_context()).data,
                        status=status.HTTP_201_CREATED)

    @extend_schema(summary="Issue the next report version of this case (rendered now, immutable afterwards)",
                   description="Send an `Idempotency-Key` header (any unique string, e.g. a UUID) to make the "
                               "request safe to repeat: the same key returns the version it issued (200) "
                               "instead of issuing another.",
                   parameters=[OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)],
                   request=None, responses={201: serializers.ReportSerializer, 200: serializers.ReportSerializer,
                                            **ERRORS})
    @action(detail=True, methods=["post"], url_path="reports")
    def request_report(self, request, pk=None):
        import uuid

        from governance import report_requests

        case = self.get_object()
        if case.state in (m.AuditCase.State.DRAFT, m.AuditCase.State.SUBMITTED, m.AuditCase.State.RUNNING):
            return Response({"error": "no_evidence_yet",
                             "detail": f"Case #{case.pk} is '{case.state}'; a report needs the evidence first."},
                            status=status.HTTP_409_CONFLICT)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key.strip()) <= report_requests.MAX_KEY_LENGTH:
            return Response({"error": "bad_idempotency_key",
                             "detail": f"Idempotency-Key must be 1 to {report_requests.MAX_KEY_LENGTH} characters."},
                            status=status.HTTP_400_BAD_REQUEST)
        key = f"api:{request.user.pk}:{key.strip()}" if key else f"api:{uuid.uuid4()}"
        report, created = report_requests.issue(case.pk, request.user, key)
        return Response(serializers.ReportSerializer(report, context=self.get_serializer_context()).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


# --------------------------------------------------------------------------------------------------
# Read-only records
# --------------------------------------------------------------------------------------------------


class ReadOnlyViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    pass


class ProbeRunViewSet(ReadOnlyViewSet):
    """Probe runs with status, progress and provenance (created by the pipeline, never by the API)."""

    queryset = m.ProbeRun.objects.all()
    serializer_class = serializers.ProbeRunSerializer
    filterset_class = filters.ProbeRunFilter
    ordering_fields = ["created_at", "status", "progress"]


class EvidenceViewSet(ReadOnlyViewSet):
    """Evidence: metrics, summary, findings and artifact checksums. Read-only and immutable."""

    queryset = m.Evidence.objects.select_related("run").prefetch_related("artifacts")
    serializer_class = serializers.EvidenceSerializer
    filterset_class = filters.EvidenceFilter
    ordering_fields = ["created_at", "kind"]


def hashed_download(field_file, filename: str, content_type: str, sha256: str) -> FileResponse:
    """A stored file as an attachment, with the SHA-256 recorded at storage time so a client can check
    what it received against the evidence or report manifest."""
    response = FileResponse(field_file.open("rb"), as_attachment=True, filename=filename, content_type=content_type)
    response["X-Content-SHA256"] = sha256
    return response


class EvidenceArtifactViewSet(ReadOnlyViewSet):
    """Evidence files (figures, arrays, CSV) with their SHA-256."""

    queryset = m.EvidenceArtifact.objects.select_related("evidence__run")
    serializer_class = serializers.EvidenceArtifactSerializer
    filterset_class = filters.EvidenceArtifactFilter
    ordering_fields = ["created_at", "name"]

    @extend_schema(summary="Download the artifact file (served with the content type it was stored with)",
                   responses={(200, "*/*"): OpenApiTypes.BINARY, 404: ERRORS[404]})
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        artifact = self.get_object()
        return hashed_download(artifact.file, artifact.name, artifact.content_type or "application/octet-stream",
                               artifact.sha256)


class SignoffViewSet(ReadOnlyViewSet):
    """Sign-offs (append-only). Create them with ``POST /api/cases/{id}/signoff/``."""

    queryset = m.Signoff.objects.select_related("reviewer")
    serializer_class = serializers.SignoffSerializer
    filterset_class = filters.SignoffFilter
    ordering_fields = ["created_at"]


class ReportViewSet(ReadOnlyViewSet):
    """Issued report versions (immutable). Request one with ``POST /api/cases/{id}/reports/``."""

    queryset = m.Report.objects.select_related("author")
    serializer_class = serializers.ReportSerializer
    filterset_class = filters.ReportFilter
    ordering_fields = ["created_at", "version"]

    @extend_schema(summary="Download the report PDF",
                   responses={(200, "application/pdf"): OpenApiTypes.BINARY, 404: ERRORS[404]})
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        report = self.get_object()
        return hashed_download(report.pdf, f"loupe-case-{report.case_id}-report-v{report.version}.pdf",
                               "application/pdf", report.sha256)

    action_roles = {"countersign": frozenset({REVIEWER}),
                    "countersigned": frozenset({SUBMITTER, REVIEWER, AUDITOR, ADMIN})}

    @extend_schema(summary="Countersign: upload the report (or its latest countersigned file) with your signature "
                           "appended", request={"multipart/form-data": {"type": "object", "properties": {
                               "file": {"type": "string", "format": "binary"}}}},
                   responses={201: serializers.CountersignatureSerializer, **ERRORS})
    @action(detail=True, methods=["post"], parser_classes=[MultiPartParser])
    def countersign(self, request, pk=None):
        from governance.reports.countersign import countersign, read_upload

        row = countersign(self.get_object(), request.user, read_upload(request.FILES.get("file")))
        return Response(serializers.CountersignatureSerializer(row, context=self.get_serializer_context()).data,
                        status=status.HTTP_201_CREATED)

    @extend_schema(summary="Download countersigned file n of the report",
                   responses={(200, "application/pdf"): OpenApiTypes.BINARY, 404: ERRORS[404]})
    @action(detail=True, methods=["get"], url_path=r"countersigned/(?P<sequence>[0-9]+)", url_name="countersigned")
    def countersigned(self, request, pk=None, sequence=None):
        row = self.get_object().countersignatures.filter(sequence=int(sequence)).first()
        if row is None:
            raise NotFound("no such countersigned file")
        return hashed_download(row.pdf, row.pdf.name.rsplit("/", 1)[-1], "application/pdf", row.sha256)


class AuditEventViewSet(ReadOnlyViewSet):
    """The hash-chained audit log (append-only), narrowed to what you may see."""

    queryset = m.AuditEvent.objects.all()
    serializer_class = serializers.AuditEventSerializer
    filterset_class = filters.AuditEventFilter
    ordering_fields = ["seq"]
    ordering = ["-seq"]

"""One JSON shape for every refusal: ``{"error": "<stable code>", "detail": "<sentence>", ...}``.

Validation errors add ``"fields": {field: [messages]}``; illegal transitions add ``from_state``,
``to_state`` and ``allowed``. Clients branch on ``error``; people read ``detail``.
"""

from __future__ import annotations

from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from governance import pipeline, workflow
from governance.artifacts import ArtifactUnavailable
from governance.modelcard import ModelCardError
from governance.models import ImmutableError
from governance.uploads import UploadRejected
from workers.probes.errors import ProbeInputError

#: The service's own errors: (class, stable code, HTTP status). The API's exception handler and the
#: admin review page (``admin_review``) both answer with these; subclasses come before their bases.
DOMAIN_ERRORS: tuple[tuple[type[Exception], str, int], ...] = (
    (workflow.NotAllowed, "not_allowed", status.HTTP_403_FORBIDDEN),
    (workflow.TransitionError, "illegal_transition", status.HTTP_409_CONFLICT),
    (workflow.WorkflowError, "workflow_error", status.HTTP_400_BAD_REQUEST),
    (ImmutableError, "immutable", status.HTTP_409_CONFLICT),
    (pipeline.BrokerUnavailable, "broker_unavailable", status.HTTP_503_SERVICE_UNAVAILABLE),
    (pipeline.PipelineError, "cannot_start", status.HTTP_400_BAD_REQUEST),
    (ArtifactUnavailable, "artifact_unavailable", status.HTTP_409_CONFLICT),
    (ModelCardError, "bad_model_card", status.HTTP_400_BAD_REQUEST),
    (ProbeInputError, "probe_input", status.HTTP_400_BAD_REQUEST),
)


def domain_error(exc: Exception) -> tuple[str, int] | None:
    """``(code, HTTP status)`` for one of the service's own errors, ``None`` for anything else."""
    for cls, code, http_status in DOMAIN_ERRORS:
        if isinstance(exc, cls):
            return code, http_status
    return None


def _error(code: str, detail, http_status: int, **extra) -> Response:
    return Response({"error": code, "detail": detail, **extra}, status=http_status)


def _django_validation_detail(exc: DjangoValidationError) -> tuple[str, dict | None]:
    if hasattr(exc, "error_dict"):
        fields = {name: [m for e in errors for m in e.messages] for name, errors in exc.error_dict.items()}
        sentence = "; ".join(f"{name}: {' '.join(msgs)}" if name != "__all__" else " ".join(msgs)
                             for name, msgs in fields.items())
        return sentence, fields
    return "; ".join(exc.messages), None


def exception_handler(exc, context):
    if isinstance(exc, (RequestDataTooBig, TooManyFieldsSent)):
        return _error("request_too_large", "The request body is larger than this endpoint accepts "
                      "(DATA_UPLOAD_MAX_MEMORY_SIZE); model archives go to /api/versions/upload/.",
                      status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, SuspiciousOperation):
        return _error("bad_request", "The request is malformed.", status.HTTP_400_BAD_REQUEST)
    # Django's own 404/403 (get_object_or_404, a non-numeric id) take DRF's shapes below; the
    # service's own errors (some subclass PermissionDenied) keep their codes.
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied) and domain_error(exc) is None:
        exc = exceptions.PermissionDenied()
    if isinstance(exc, UploadRejected):
        return Response(exc.as_dict(), status=exc.status)
    if isinstance(exc, DjangoValidationError):
        sentence, fields = _django_validation_detail(exc)
        return _error("invalid", sentence, status.HTTP_400_BAD_REQUEST, **({"fields": fields} if fields else {}))
    if isinstance(exc, (ProtectedError, RestrictedError)):
        blockers = sorted({type(o).__name__ for o in exc.protected_objects}) if isinstance(exc, ProtectedError) else []
        by = f" by {', '.join(blockers)}" if blockers else ""
        return _error("protected", f"This object is still referenced{by}; archive it instead of deleting it.",
                      status.HTTP_409_CONFLICT)
    known = domain_error(exc)
    if known is not None:
        code, http_status = known
        extra = {}
        if isinstance(exc, workflow.TransitionError):
            extra = {"from_state": exc.from_state, "to_state": exc.to_state, "allowed": list(exc.allowed)}
        refusal = _error(code, str(exc), http_status, **extra)
        if isinstance(exc, pipeline.BrokerUnavailable):
            refusal["Retry-After"] = "30"
        return refusal
    if isinstance(exc, IntegrityError):
        return _error("conflict", "The request conflicts with existing data (a duplicate or a rule the database "
                                  "enforces).", status.HTTP_409_CONFLICT)

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        data = response.data
        if isinstance(data, dict):
            sentence = "; ".join(f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                 for k, v in data.items())
            response.data = {"error": "invalid", "detail": sentence or "Invalid input.", "fields": data}
        else:
            detail = " ".join(map(str, data)) if isinstance(data, list) else str(data)
            response.data = {"error": "invalid", "detail": detail}
        return response
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else getattr(exc, "default_code", "error")
        detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        response.data = {"error": code, "detail": detail}
    return response


# --------------------------------------------------------------------------------------------------
# Errors that happen outside a DRF view: unmatched URLs, request bodies refused by Django, crashes
# --------------------------------------------------------------------------------------------------

#: Stable codes for the statuses Django itself answers with (DRF's own codes match these).
STATUS_CODES = {400: "bad_request", 401: "not_authenticated", 403: "permission_denied", 404: "not_found",
                405: "method_not_allowed", 413: "request_too_large", 429: "throttled", 500: "server_error"}


def api_error_response(http_status: int, detail: str | None = None) -> JsonResponse:
    code = STATUS_CODES.get(http_status, "server_error" if http_status >= 500 else "error")
    try:
        phrase = HTTPStatus(http_status).phrase
    except ValueError:
        phrase = "Error"
    return JsonResponse({"error": code, "detail": detail or f"{phrase}."}, status=http_status)


class ApiErrorMiddleware:
    """Below ``/api/``, every error response is ``{"error", "detail"}`` JSON: Django's HTML pages
    (an unmatched URL, a body over the size limit, a debug page for a crash, even with ``DEBUG``)
    are replaced, and nothing of a crash's internals is shown (Django has logged it already)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if not request.path.startswith("/api/") or response.status_code < 400:
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        if response.status_code == 400 and _body_too_large(request):
            return api_error_response(413, "The request body is larger than this endpoint accepts.")
        replacement = api_error_response(response.status_code)
        for header in ("Allow", "Retry-After"):
            if response.has_header(header):
                replacement[header] = response[header]
        return replacement


def _body_too_large(request) -> bool:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    return length > (settings.DATA_UPLOAD_MAX_MEMORY_SIZE or float("inf"))

"""``GET /api/cases/{id}/export``: the case's export bundle as a zip.

Same visibility as the case itself: the case is looked up in ``AuditCase.objects.visible_to(user)``,
so a user who may not see it gets a 404, exactly as for ``GET /api/cases/{id}/``.
"""

from __future__ import annotations

import hashlib

from django.db import transaction
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import IsAuthenticated
from rest_framework.views import APIView

from governance.api.views import ERRORS
from governance.models import AuditCase


class CaseExportView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="cases_export",
        summary="Download the case's export bundle (zip)",
        description="The latest report, its manifest, every evidence artifact, the model card in Hugging Face "
                    "format and the case's audit-log excerpt with its hash chain.",
        responses={(200, "application/zip"): OpenApiResponse(response=OpenApiTypes.BINARY),
                   403: ERRORS[403], 404: ERRORS[404]},
    )
    def get(self, request, pk: int):
        from governance import audit_log
        from governance.reports import export_case_zip
        from governance.reports.export import bundle_filename

        case = get_object_or_404(AuditCase.objects.visible_to(request.user), pk=pk)
        data = export_case_zip(case)
        with transaction.atomic():
            audit_log.record(request.user, "case.exported", case, {"sha256": hashlib.sha256(data).hexdigest(),
                                                                   "bytes": len(data)})
        response = HttpResponse(data, content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="{bundle_filename(case)}"'
        return response

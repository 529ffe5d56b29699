"""The OpenAPI schema says what the API does, including how it refuses.

drf-spectacular documents the success response of each operation; this AutoSchema adds the refusals
every operation can answer with (``{"error", "detail"}``, :class:`~governance.api.serializers.ErrorSerializer`):
400 (invalid input), 401 (no credentials), 403 (role or object rule), 404 (no such object visible
to you, or no such page), 413 (a body over the limit, where there is a body). Ids in paths are
whole numbers. ``.ci/schemathesis`` checks the schema against a live server.
"""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse

#: Ids route only as 1-18 digits (below 2**63, what every supported database stores).
MAX_PATH_ID = 10**18 - 1

_REFUSALS = {
    "400": "Invalid input (a reason per field), or a malformed request.",
    "401": "No or invalid credentials.",
    "403": "Not allowed for this user.",
    "404": "No such object (or page) visible to this user.",
}


class LoupeAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction="response"):
        from governance.api.serializers import ErrorSerializer

        responses = super()._get_response_bodies(direction)
        refusals = dict(_REFUSALS)
        if self.method in ("POST", "PUT", "PATCH"):
            refusals["413"] = "The request body is larger than the limit."
        for code, description in refusals.items():
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(ErrorSerializer, description=description), code, direction=direction)
        return responses

    def _resolve_path_parameters(self, variables):
        parameters = super()._resolve_path_parameters(variables)
        for parameter in parameters:
            pattern = parameter.get("schema", {}).get("pattern", "")
            if parameter.get("name") in ("id", "pk") or pattern.startswith("^[0-9]"):
                parameter["schema"] = {"type": "integer", "minimum": 0, "maximum": MAX_PATH_ID}
        return parameters

"""The OpenAPI schema of a case's ``probe_plan``, derived from the probe kinds' declarations.

Each item is one of the declared kinds, with that kind's parameter schema
(``workers.probes.kinds``), so API clients see every kind's parameters, types, limits and defaults.
The server checks the same schemas (``governance.models.validate_probe_plan``).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers


def _openapi_30(schema: Any) -> Any:
    """JSON Schema as pydantic writes it -> the OpenAPI 3.0 dialect drf-spectacular serves:
    ``anyOf [X, {type: null}]`` becomes ``X`` with ``nullable``, ``const`` an ``enum``, numeric
    exclusive bounds the 3.0 flag form, and titles go."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _openapi_30(value) for key, value in schema.items() if key != "title"}
    if "properties" in schema:  # property names are data, not keywords: keep a property called "title"
        out["properties"] = {name: _openapi_30(value) for name, value in schema["properties"].items()}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in out and not isinstance(out[bound], bool):
            out[inclusive], out[bound] = out[bound], True
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        out.pop("anyOf")
        if len(rest) == 1:
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    return out


def probe_plan_schema() -> dict[str, Any]:
    """``{"type": "array", "items": {"oneOf": [one object schema per kind]}}``."""
    from governance.models import MAX_PROBE_PLAN_ITEMS
    from workers.probes import kinds

    items = []
    for spec in kinds.all_kinds():
        params = _openapi_30(spec.params.model_json_schema())
        params["description"] = f"Parameters of the {spec.name} probe kind."
        items.append({
            "type": "object",
            "title": spec.name,
            "description": f"{spec.title}: {spec.help}.",
            "properties": {
                "kind": {"type": "string", "enum": [spec.name]},
                "params": params,
                "dataset": {"type": "string", "minLength": 1, "maxLength": 1024, "nullable": True,
                            "description": spec.dataset.help},
            },
            "required": ["kind"],
            "additionalProperties": False,
        })
    return {"type": "array", "maxItems": MAX_PROBE_PLAN_ITEMS, "items": {"oneOf": items},
            "description": "The probes to run: each item names a probe kind, its parameters and its dataset."}


class ProbePlanField(serializers.JSONField):
    """A case's probe plan; validated by the model field (``validate_probe_plan``)."""


class ProbePlanFieldExtension(OpenApiSerializerFieldExtension):
    """Tells drf-spectacular the schema of :class:`ProbePlanField` (computed when the OpenAPI
    document is generated, once every kind is declared)."""

    target_class = ProbePlanField

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return probe_plan_schema()

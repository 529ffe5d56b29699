"""Filters for list endpoints (``?state=in_review&model_version=3``), one FilterSet per resource.

Every filter on a related object is a plain id (:class:`IdFilter`), never a choice checked against
the table: the list is already narrowed to what the user may see, so ``?case=<another
organisation's case>`` and ``?case=<an id that does not exist>`` both answer an empty page. A
choice filter would answer 400 for a missing id and 200 for a foreign one, which tells an outsider
which ids exist.
"""

from __future__ import annotations

import django_filters
from django import forms
from django.db import models
from drf_spectacular.utils import extend_schema_field

from governance import models as m

#: The largest id any supported database stores (a signed 64-bit integer).
MAX_ID = 2**63 - 1


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": MAX_ID})
class IdFilter(django_filters.NumberFilter):
    """A filter on an id reached through a relation (``?ai_model=3``): a whole number in the
    databases' id range. NumberFilter alone takes any decimal, and SQLite cannot even bind an
    integer beyond 64 bits, so ``?ai_model=-10**30`` was a server error instead of a 400."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


@extend_schema_field({"type": "integer", "minimum": -MAX_ID - 1, "maximum": MAX_ID})
class IntegerFilter(django_filters.NumberFilter):
    """A whole-number field (``?version=2``): ``2.5`` is refused, not rounded or matched as a decimal."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", -MAX_ID - 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


_INTEGER_FIELDS = (models.AutoField, models.BigAutoField, models.IntegerField, models.BigIntegerField,
                   models.SmallIntegerField, models.PositiveIntegerField, models.PositiveSmallIntegerField,
                   models.PositiveBigIntegerField)


class LoupeFilterSet(django_filters.FilterSet):
    """Foreign keys (and one-to-ones) filter by id, without an existence check (see the module
    docstring); integer fields take whole numbers only."""

    FILTER_DEFAULTS = {
        **django_filters.FilterSet.FILTER_DEFAULTS,
        **{field: {"filter_class": IntegerFilter} for field in _INTEGER_FIELDS},
        models.ForeignKey: {"filter_class": IdFilter},
        models.OneToOneField: {"filter_class": IdFilter},
    }


class AIModelFilter(LoupeFilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = m.AIModel
        fields = ["organisation", "name", "modality", "risk_category", "annex_iii_area"]


class ModelVersionFilter(LoupeFilterSet):
    class Meta:
        model = m.ModelVersion
        fields = ["ai_model", "version", "source", "architecture_family", "manifest_hash"]


class AuditCaseFilter(LoupeFilterSet):
    ai_model = IdFilter(field_name="model_version__ai_model")

    class Meta:
        model = m.AuditCase
        fields = ["model_version", "ai_model", "state"]


class ProbeRunFilter(LoupeFilterSet):
    class Meta:
        model = m.ProbeRun
        fields = ["case", "kind", "status"]


class EvidenceFilter(LoupeFilterSet):
    case = IdFilter(field_name="run__case")

    class Meta:
        model = m.Evidence
        fields = ["run", "case", "kind"]


class EvidenceArtifactFilter(LoupeFilterSet):
    class Meta:
        model = m.EvidenceArtifact
        fields = ["evidence", "content_type"]


class SignoffFilter(LoupeFilterSet):
    class Meta:
        model = m.Signoff
        fields = ["case", "reviewer", "decision", "review_round"]


class ReportFilter(LoupeFilterSet):
    class Meta:
        model = m.Report
        fields = ["case", "version"]


class AuditEventFilter(LoupeFilterSet):
    class Meta:
        model = m.AuditEvent
        fields = ["action", "object_type", "object_id", "case", "organisation", "actor"]

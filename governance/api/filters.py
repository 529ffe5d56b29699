"""Filters for list endpoints (``?state=in_review&model_version=3``), one FilterSet per resource."""

from __future__ import annotations

import django_filters
from django import forms

from governance import models as m

#: The largest id any supported database stores (a signed 64-bit integer).
MAX_ID = 2**63 - 1


class IdFilter(django_filters.NumberFilter):
    """A filter on an id reached through a relation (``?ai_model=3``): a whole number in the
    databases' id range. NumberFilter alone takes any decimal, and SQLite cannot even bind an
    integer beyond 64 bits, so ``?ai_model=-10**30`` was a server error instead of a 400."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


class AIModelFilter(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = m.AIModel
        fields = ["organisation", "name", "modality", "risk_category", "annex_iii_area"]


class ModelVersionFilter(django_filters.FilterSet):
    class Meta:
        model = m.ModelVersion
        fields = ["ai_model", "version", "source", "architecture_family", "manifest_hash"]


class AuditCaseFilter(django_filters.FilterSet):
    ai_model = IdFilter(field_name="model_version__ai_model")

    class Meta:
        model = m.AuditCase
        fields = ["model_version", "ai_model", "state"]


class ProbeRunFilter(django_filters.FilterSet):
    class Meta:
        model = m.ProbeRun
        fields = ["case", "kind", "status"]


class EvidenceFilter(django_filters.FilterSet):
    case = IdFilter(field_name="run__case")

    class Meta:
        model = m.Evidence
        fields = ["run", "case", "kind"]


class EvidenceArtifactFilter(django_filters.FilterSet):
    class Meta:
        model = m.EvidenceArtifact
        fields = ["evidence", "content_type"]


class SignoffFilter(django_filters.FilterSet):
    class Meta:
        model = m.Signoff
        fields = ["case", "reviewer", "decision", "review_round"]


class ReportFilter(django_filters.FilterSet):
    class Meta:
        model = m.Report
        fields = ["case", "version"]


class AuditEventFilter(django_filters.FilterSet):
    class Meta:
        model = m.AuditEvent
        fields = ["action", "object_type", "object_id", "case", "organisation", "actor"]

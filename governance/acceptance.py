"""Declared acceptance criteria: what a case accepts per metric, and the verdicts and findings they give.

A criterion names a probe kind, a metric key and the line the measured value must stay on (a
threshold, or a reference measure recorded beside it such as the random baseline). Defaults depend
on the system's risk category and high-risk area (:func:`defaults`); an admin changes one only
through :func:`set_criterion`, which records the reason in the audit log. :func:`evaluate` turns
criteria and evidence (plain manifest data) into one verdict per measured value; a value that does
not meet its criterion is a finding with the criterion's severity. Severities therefore come from
the criteria a case declared, never from the probe that measured.

Approving a case while high or medium findings are open needs one reason per finding
(:func:`check_acknowledged`, called from the workflow's approval path).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from governance import glossary

BLOCKING = ("high", "medium")
# Rows that are the comparison itself (a random ranking), not something the case accepts or rejects.
BASELINES = ("random",)
# Record fields that name what a row of a metrics table is about (a method, a concept, a probe).
SUBJECT_FIELDS = ("method", "concept", "probe", "family", "layer", "severity", "head", "word")


@dataclass(frozen=True)
class Spec:
    """A criterion as plain data (a default, an unsaved row, or a manifest entry)."""

    kind: str
    metric: str
    comparator: str
    threshold: float | None = None
    reference: str = ""
    severity: str = "medium"
    where: Mapping[str, Any] = field(default_factory=dict)
    rationale: str = ""
    source: str = "default"

    def describe(self) -> str:
        """The criterion in words: "Deletion score below Deletion score of a random order"."""
        name = glossary.label(self.metric, self.kind)
        scope = "".join(f", {glossary.label(k, self.kind).lower()} {v}" for k, v in sorted(self.where.items())
                        if v != "*")
        if self.comparator == "at_most":
            text = f"{name} at most {self.threshold:g}"
        elif self.comparator == "at_least":
            text = f"{name} at least {self.threshold:g}"
        elif self.comparator == "below_reference":
            text = f"{name} below {glossary.label(self.reference, self.kind).lower()}"
        else:
            text = f"{name} above {glossary.label(self.reference, self.kind).lower()}"
        return text + (f" ({scope[2:]})" if scope else "")


# Defaults: kind, metric, comparator, threshold or reference, severity, where, rationale.
_DEFAULTS: tuple[Spec, ...] = (
    Spec("grounding", "deletion_auc", "below_reference", reference="random_deletion_auc", severity="medium",
         rationale="An explanation whose ranking removes evidence no faster than a random order does not show "
                   "what the model uses."),
    Spec("grounding", "insertion_auc", "above_reference", reference="random_insertion_auc", severity="medium",
         rationale="Adding the regions an explanation ranks highest must restore the score faster than chance."),
    Spec("grounding", "pointing_game", "above_reference", reference="random_pointing_game", severity="low",
         rationale="A heatmap should point at the named object more often than a random one."),
    Spec("sanity", "rank_correlation", "at_most", threshold=0.5, severity="high", where={"method": "*"},
         rationale="An explanation that survives randomising the model's weights does not depend on what the "
                   "model learned (Adebayo et al., 2018)."),
    Spec("stability", "rank_correlation", "at_least", threshold=0.5, severity="medium",
         rationale="Imperceptible noise that does not change the decision should not change the explanation."),
    Spec("robustness", "accuracy_drop", "at_most", threshold=0.2, severity="medium",
         where={"family": "corruption", "severity": 3},
         rationale="Moderate, everyday image degradation should cost at most a fifth of the accuracy."),
    Spec("robustness", "flip_rate", "at_most", threshold=0.2, severity="medium", where={"family": "prompt"},
         rationale="Rewording the prompt with a synonym should rarely change the decision."),
    Spec("robustness", "flip_rate", "at_most", threshold=0.1, severity="medium", where={"probe": "typographic"},
         rationale="Text written into the image should not steer decisions (typographic attack)."),
    Spec("token_attribution", "pointing", "above_reference", reference="random_baseline", severity="medium",
         rationale="A generated word's attribution should point at the object it names more often than chance."),
    Spec("token_attribution", "hallucinated_words", "at_most", threshold=0, severity="medium",
         rationale="A description should not name objects that are not in the image."),
    Spec("attention", "aligned", "at_least", threshold=1, severity="low",
         rationale="At least one attention head should concentrate on the objects the text is about."),
    Spec("intervention", "object_swap_changed", "above_reference", reference="background_swap_changed",
         severity="medium",
         rationale="Swapping the object's own features should change the output more than swapping background "
                   "features; otherwise the output does not follow the object."),
    Spec("tcav", "cav_accuracy", "at_least", threshold=0.7, severity="low",
         rationale="A concept the model cannot separate from random images gives an unreliable concept test."),
    Spec("shortcut", "flagged", "at_most", threshold=0, severity="high",
         rationale="The probe's combined tests (significant concept influence, score change when the feature is "
                   "added or removed, relevance on the feature) show the model relies on a feature that is not the "
                   "intended cause."),
)

# Metric keys that get a criterion per kind but are keyed differently inside the metrics dict.
_STRICTER = {"high_risk": 0.5, "gpai": 0.75}  # factor applied to allowed losses/flip rates
_SEVERITY_UP = {"low": "medium", "medium": "high", "high": "high"}


def defaults(risk_category: str, annex_iii_area: str = "", intended_purpose: str = "") -> list[Spec]:
    """Default criteria for a system: stricter allowed losses and one severity higher when high-risk.

    ``intended_purpose``: a purpose that describes generating text or content adds no threshold Loupe
    could justify in general; it is kept for the defaults' signature so that a purpose-specific table
    can be added without changing callers.
    """
    factor = _STRICTER.get(risk_category, 1.0)
    out = []
    for spec in _DEFAULTS:
        threshold = spec.threshold
        severity = spec.severity
        if risk_category == "high_risk":
            severity = _SEVERITY_UP[severity]
        if threshold is not None and spec.metric in ("accuracy_drop", "flip_rate"):
            threshold = round(threshold * factor, 4)
        note = spec.rationale
        if risk_category == "high_risk":
            note += f" Stricter for a high-risk system{f' ({annex_iii_area})' if annex_iii_area else ''}."
        out.append(Spec(spec.kind, spec.metric, spec.comparator, threshold, spec.reference, severity,
                        dict(spec.where), note, "default"))
    return out


# ----------------------------------------------------------------------------------------- database


def spec_of(row) -> Spec:
    return Spec(row.kind, row.metric.split("@", 1)[0], row.comparator, row.threshold, row.reference, row.severity,
                dict(row.where or {}), row.rationale, row.source)


def entry_of(spec: Spec, row=None) -> dict[str, Any]:
    """A criterion as the manifest records it."""
    data = asdict(spec) | {"where": dict(spec.where)}
    if row is not None:
        data |= {"id": row.pk, "updated_by": row.updated_by.get_username() if row.updated_by_id else None}
    return data


def case_specs(case) -> list[tuple[Spec, Any]]:
    """The case's criteria: its rows, or (none stored yet) the defaults for its model, unsaved."""
    rows = list(case.criteria.select_related("updated_by").order_by("kind", "metric", "pk"))
    if rows:
        return [(spec_of(r), r) for r in rows]
    model = case.model_version.ai_model
    return [(s, None) for s in defaults(model.risk_category, model.annex_iii_area, model.intended_purpose)]


def ensure_defaults(case) -> None:
    """Store the default criteria of ``case`` if it has none (idempotent; inside the caller's transaction)."""
    from governance.models import AcceptanceCriterion

    if case.criteria.exists():
        return
    for spec, _ in case_specs(case):
        AcceptanceCriterion.objects.create(case=case, kind=spec.kind, metric=_row_metric(spec),
                                           comparator=spec.comparator, threshold=spec.threshold,
                                           reference=spec.reference, severity=spec.severity, where=dict(spec.where),
                                           rationale=spec.rationale)


def _row_metric(spec: Spec) -> str:
    # Two robustness defaults share a metric key; the unique (case, kind, metric) key tells them
    # apart by their scope ("flip_rate@family=prompt").
    if not spec.where:
        return spec.metric
    return spec.metric + "@" + ",".join(f"{k}={v}" for k, v in sorted(spec.where.items()))


def set_criterion(case, *, kind: str, metric: str, by, reason: str, comparator: str | None = None,
                  threshold: float | None = None, reference: str | None = None, severity: str | None = None,
                  where: Mapping[str, Any] | None = None):
    """Create or change one criterion of ``case`` as an admin, with a reason; logged. Returns the row."""
    from django.core.exceptions import ValidationError
    from django.db import transaction

    from governance import access, audit_log
    from governance.models import AcceptanceCriterion

    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Changing an acceptance criterion needs a reason."})
    if not access.is_admin(by):
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied("only an administrator may change acceptance criteria")
    with transaction.atomic():
        ensure_defaults(case)
        row = AcceptanceCriterion.objects.select_for_update().filter(case=case, kind=kind, metric=metric).first()
        before = None if row is None else entry_of(spec_of(row))
        if row is None:
            row = AcceptanceCriterion(case=case, kind=kind, metric=metric)
        for name, value in (("comparator", comparator), ("threshold", threshold), ("reference", reference),
                            ("severity", severity)):
            if value is not None:
                setattr(row, name, value)
        if where is not None:
            row.where = dict(where)
        if row.comparator in ("at_most", "at_least"):
            row.reference = ""
        row.source, row.rationale, row.updated_by = AcceptanceCriterion.Source.ADMIN, reason, by
        row.full_clean()
        row.save()
        audit_log.record(by, "criterion.changed", row, {"case": case.pk, "kind": kind, "metric": metric,
                                                       "before": before, "after": entry_of(spec_of(row)),
                                                       "reason": reason})
    return row


# ----------------------------------------------------------------------------------------- verdicts


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


#: The keys of a bootstrap summary (``validation.bootstrap_ci``): ``{"mean", "low", "high", "n"}``.
INTERVAL_KEYS = frozenset({"mean", "low", "high", "n"})


def _is_interval_summary(value: Any) -> bool:
    """A confidence-interval summary of a metric, not one value per method or variant: its keys would
    otherwise be judged as subjects ("n", "mean", "low", "high")."""
    return isinstance(value, Mapping) and "mean" in value and set(value) <= INTERVAL_KEYS


def _records(metrics: Any, trail: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Every dict in a metrics tree with the path of keys that leads to it."""
    if isinstance(metrics, Mapping):
        yield trail, metrics
        for key, value in metrics.items():
            if isinstance(value, (Mapping, list)):
                yield from _records(value, trail + (str(key),))
    elif isinstance(metrics, list):
        for value in metrics:
            if isinstance(value, (Mapping, list)):
                yield from _records(value, trail)


def _subject(trail: tuple[str, ...], record: Mapping[str, Any], metric: str) -> str:
    parts = [f"{record[f]}" if f in ("method", "concept", "probe") else f"{glossary.label(f).lower()} {record[f]}"
             for f in SUBJECT_FIELDS
             if f in record and record[f] is not None and not isinstance(record[f], (dict, list))]
    if not parts:
        skipped = ("methods", "results", "probes", "perturbation")
        parts = [glossary.label(t).lower() for t in trail if t not in skipped][-1:]
    return ", ".join(parts) or "overall"


def _matches(record: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for key, wanted in where.items():
        have = record.get(key)
        if wanted == "*":  # the record names this field (e.g. the probe's result, not one cascade step)
            if key not in record:
                return False
            continue
        if isinstance(wanted, bool) or isinstance(have, bool):
            if bool(have) != bool(wanted):
                return False
        elif (wanted_number := _number(wanted)) is not None and (have_number := _number(have)) is not None:
            if have_number != wanted_number:
                return False
        elif str(have) != str(wanted):
            return False
    return True


# Metrics that are shares of examples: where the probe recorded no interval, a Wilson score interval
# from the share and the number of examples is exact enough to show how far one run can be trusted.
PROPORTIONS = ("pointing_game", "accuracy", "clean_accuracy", "flip_rate", "attack_success")


def wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``share`` observed on ``n`` examples."""
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(record: Mapping[str, Any], metric: str, n: Any = None) -> tuple[float, float] | None:
    ci = record.get(f"{metric}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        return float(ci[0]), float(ci[1])
    low, high = _number(record.get(f"{metric}_ci_low")), _number(record.get(f"{metric}_ci_high"))
    if low is not None and high is not None:
        return low, high
    share, count = _number(record.get(metric)), record.get("n", n)
    if metric in PROPORTIONS and share is not None and 0 <= share <= 1 and isinstance(count, int) \
            and not isinstance(count, bool) and count > 0:
        return wilson(share, count)
    return None


def _embedded_kinds(evidence: Mapping[str, Any]) -> set[str]:
    """Kinds whose measurements an evidence item carries inside another kind (TCAV inside shortcut)."""
    kinds = {str(evidence.get("kind"))}
    for _, record in _records(evidence.get("metrics") or {}):
        for value in record.values():
            if isinstance(value, list) and value and all(isinstance(r, Mapping) and "tcav_score" in r for r in value):
                kinds.add("tcav")
    return kinds


@dataclass
class Verdict:
    criterion: Spec
    evidence: int | None
    subject: str
    value: float | None
    reference_value: float | None = None
    interval: tuple[float, float] | None = None
    met: bool | None = None  # None: not measured

    @property
    def key(self) -> str:
        return f"{self.criterion.kind}:{_row_metric(self.criterion)}:{self.subject}#{self.evidence}"

    @property
    def verdict(self) -> str:
        return {True: "meets", False: "does not meet", None: "not measured"}[self.met]


def evaluate(specs: Iterable[Spec], evidence: Iterable[Mapping[str, Any]]) -> list[Verdict]:
    """One verdict per criterion and measured value (``not measured`` where no evidence has the metric)."""
    evidence = list(evidence)
    verdicts: list[Verdict] = []
    for spec in specs:
        found = False
        for entry in evidence:
            if spec.kind not in _embedded_kinds(entry):
                continue
            metrics = entry.get("metrics")
            top: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}
            for trail, record in _records(entry.get("metrics") or {}):
                if not _matches(record, spec.where) or record.get("method") in BASELINES:
                    continue
                raw = record.get(spec.metric)
                if _is_interval_summary(raw):
                    continue  # a bootstrap summary of a value judged where it is reported (validation)
                # One value, or one value per method/variant (``{"pointing": {"chefer": 0.9, "raw": 0.95}}``).
                values: list[tuple[str | None, float]]
                if isinstance(raw, Mapping):
                    values = [(str(k), number) for k, v in raw.items()
                              if k not in BASELINES and (number := _number(v)) is not None]
                else:
                    number = _number(raw)
                    values = [(None, number)] if number is not None else []
                for name, value in values:
                    found = True
                    subject = name or _subject(trail, record, spec.metric)
                    verdict = Verdict(spec, entry.get("id"), subject, value,
                                      interval=None if name else _interval(record, spec.metric, top.get("n")))
                    if spec.comparator in ("at_most", "at_least"):
                        threshold = float(spec.threshold if spec.threshold is not None else math.nan)
                        verdict.met = value <= threshold if spec.comparator == "at_most" else value >= threshold
                    else:
                        reference = _number(record.get(spec.reference))
                        verdict.reference_value = reference
                        if reference is not None:
                            below = spec.comparator == "below_reference"
                            verdict.met = value < reference if below else value > reference
                    verdicts.append(verdict)
        if not found:
            verdicts.append(Verdict(spec, None, "", None))
    return verdicts


def findings(verdicts: Iterable[Verdict]) -> list[dict[str, Any]]:
    """Criteria not met, as findings with the criterion's severity, in plain words."""
    out = []
    for v in verdicts:
        if v.met is not False:
            continue
        shown = f"{v.value:.3g}"
        against = f"{v.reference_value:.3g}" if v.reference_value is not None else f"{v.criterion.threshold:g}"
        out.append({"key": v.key, "severity": v.criterion.severity, "kind": v.criterion.kind, "evidence": v.evidence,
                    "title": f"{glossary.label(v.criterion.metric, v.criterion.kind)} for {v.subject} does not meet "
                             f"the criterion",
                    "detail": f"Measured {shown}; the case accepts {v.criterion.describe().lower()} ({against}). "
                              f"{glossary.meaning(v.criterion.metric, v.criterion.kind)}",
                    "criterion": v.criterion.describe()})
    order = {"high": 0, "medium": 1, "low": 2}
    return sorted(out, key=lambda f: (order.get(f["severity"], 9), f["evidence"] or 0, f["key"]))


def open_findings(case) -> list[dict[str, Any]]:
    """High and medium findings of the case's current evidence (what an approval must acknowledge)."""
    from governance.models import Evidence

    evidence = [{"id": e.pk, "kind": e.kind, "metrics": e.metrics}
                for e in Evidence.objects.filter(run__case=case).order_by("pk")]
    specs = [s for s, _ in case_specs(case)]
    return [f for f in findings(evaluate(specs, evidence)) if f["severity"] in BLOCKING]


class AcknowledgementError(ValueError):
    """An approval's acknowledgements do not match the case's open findings.

    Defined here rather than raised as ``workflow.WorkflowError`` because the workflow calls this
    module; :func:`governance.workflow.sign_off` turns it into its own error for callers.
    """


def check_acknowledged(case, acknowledgements: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """The open findings with their reasons; raises :class:`AcknowledgementError` naming any left
    unacknowledged or any acknowledgement of a finding that is not open."""
    given = {str(k): (v or "").strip() for k, v in (acknowledgements or {}).items()}
    blocking = open_findings(case)
    missing = [f for f in blocking if not given.get(f["key"])]
    if missing:
        listed = "; ".join(f"{f['key']} ({f['severity']}: {f['title']})" for f in missing[:20])
        raise AcknowledgementError(f"approving needs a reason for each open high or medium finding; missing: {listed}")
    unknown = sorted(set(given) - {f["key"] for f in blocking})
    if unknown:
        raise AcknowledgementError(f"acknowledgements name findings that are not open: {', '.join(unknown[:20])}")
    return [f | {"reason": given[f["key"]]} for f in blocking]


def record_acknowledgements(signoff, acknowledged: list[dict[str, Any]]) -> None:
    from governance.models import FindingAcknowledgement

    for finding in acknowledged:
        FindingAcknowledgement.objects.create(case_id=signoff.case_id, signoff=signoff, finding=finding["key"],
                                              reviewer=signoff.reviewer, reason=finding["reason"],
                                              review_round=signoff.review_round)

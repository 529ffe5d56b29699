"""Loupe's data model: inventory, audit cases, probe runs, evidence, sign-offs, reports, audit log.

Who may see what is decided centrally in :mod:`governance.access`; every model's default manager has
``visible_to(user)`` (``AIModel.objects.visible_to(request.user)``), which the API and the admin use.

How rows change is decided by service modules, not by callers poking fields:

- case states change only through :mod:`governance.workflow` (``AuditCase.save()`` refuses a state it
  did not load unless the workflow is driving it);
- the audit log is appended only through :func:`governance.audit_log.record`;
- evidence (once its run finished), evidence artifacts, sign-offs, reports and audit events are
  immutable: ``save()`` on an existing row, ``delete()`` and queryset ``update()``/``delete()`` raise
  :class:`ImmutableError`. A finished probe run is frozen the same way (so its evidence cannot be
  reopened). On PostgreSQL, triggers (migrations ``0002`` and ``0004``) refuse the same at the SQL
  level, so a raw ``UPDATE`` from a shell is refused too.
- ``AuditCase.objects.update(state=...)`` is refused like a direct state change.

Foreign keys into the records an auditor relies on are ``PROTECT``: a case with runs, sign-offs,
reports or audit events cannot be deleted, it is archived instead.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from governance.canonical import canonical_json, digest
from governance.scope import Scope

if TYPE_CHECKING:
    from governance.apps import GovernanceConfig

SHA256_VALIDATOR = RegexValidator(r"^[0-9a-f]{64}$", "Expected a lowercase hex SHA-256 digest (64 characters).")
GIT_REVISION_VALIDATOR = RegexValidator(
    r"^[0-9a-f]{40}$", "Pin the hub revision to a full 40-character commit hash, not a branch or tag.")

MAX_PROBE_PLAN_ITEMS = 200
FINDING_SEVERITIES = ("high", "medium", "low", "info")


class ImmutableError(Exception):
    """Raised when code tries to change or delete a record that is append-only or already issued."""


# --------------------------------------------------------------------------------------------------
# QuerySets
# --------------------------------------------------------------------------------------------------


class GovernanceQuerySet(models.QuerySet):
    """Every Loupe queryset can be narrowed to what a user may see (see :mod:`governance.access`)."""

    def visible_to(self, user) -> GovernanceQuerySet:
        # The narrowing rules live in governance.access, which imports these models; the app
        # config hands them over, so this module never imports access.
        from django.apps import apps

        config = cast("GovernanceConfig", apps.get_app_config("governance"))
        return config.narrow(self, user)


class AppendOnlyQuerySet(GovernanceQuerySet):
    """Rows can be added, never changed or removed in bulk."""

    def update(self, **kwargs):
        raise ImmutableError(f"{self.model.__name__} rows are append-only; update() is refused.")

    def delete(self):
        raise ImmutableError(f"{self.model.__name__} rows are append-only; delete() is refused.")

    # bulk_update() goes through update(); _raw_delete is what the deletion collector uses.
    def _raw_delete(self, using):
        raise ImmutableError(f"{self.model.__name__} rows are append-only; delete() is refused.")


class AuditEventQuerySet(AppendOnlyQuerySet):
    def bulk_create(self, *args, **kwargs):
        raise ImmutableError("Audit events are written one at a time through governance.audit_log.record().")


class EvidenceQuerySet(GovernanceQuerySet):
    """Evidence of finished runs is frozen; evidence of a run still in progress may be completed."""

    def _refuse_if_finished(self, verb: str) -> None:
        if self.filter(run__status__in=ProbeRun.FINISHED).exists():
            raise ImmutableError(f"Evidence of a finished probe run is immutable; {verb}() is refused.")

    def update(self, **kwargs):
        self._refuse_if_finished("update")
        return super().update(**kwargs)

    def delete(self):
        self._refuse_if_finished("delete")
        return super().delete()


class AuditCaseQuerySet(GovernanceQuerySet):
    def update(self, **kwargs):
        if "state" in kwargs:
            raise ValueError("Case states change one case at a time through governance.workflow.transition().")
        return super().update(**kwargs)


class ProbeRunQuerySet(GovernanceQuerySet):
    """A finished run (succeeded, failed, cancelled) is part of the record: bulk changes to it are refused."""

    def _refuse_if_finished(self, verb: str) -> None:
        if self.filter(status__in=ProbeRun.FINISHED).exists():
            raise ImmutableError(f"A finished probe run is part of the record; {verb}() is refused.")

    def update(self, **kwargs):
        self._refuse_if_finished("update")
        return super().update(**kwargs)

    def delete(self):
        self._refuse_if_finished("delete")
        return super().delete()


class AppendOnlyModel(models.Model):
    """A model whose rows are written once: ``save()`` of an existing row and ``delete()`` raise."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableError(f"{type(self).__name__} #{self.pk} is immutable; it cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableError(f"{type(self).__name__} #{self.pk} is immutable; it cannot be deleted.")


# --------------------------------------------------------------------------------------------------
# Organisations and inventory
# --------------------------------------------------------------------------------------------------


class Organisation(models.Model):
    """A model provider. Submitters belong to one (via :class:`Membership`) and see only its models."""

    access_scope = Scope(org="", via_cases="model_version__ai_model__organisation")

    name = models.CharField(max_length=200, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    contact_email = models.EmailField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """Ties a user to the one organisation they act for."""

    access_scope = Scope(org="organisation", own_user="user")

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="membership")
    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["organisation__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} @ {self.organisation}"


class AIModel(models.Model):
    """An inventory entry: one AI system as the provider describes it (EU AI Act Art. 11, Annex IV 1)."""

    access_scope = Scope(org="organisation", via_cases="model_version__ai_model")

    class Modality(models.TextChoices):
        IMAGE_TEXT = "image-text", "Vision-language (image and text)"
        IMAGE = "image", "Image"
        TEXT = "text", "Text"
        OTHER = "other", "Other"

    class RiskCategory(models.TextChoices):
        PROHIBITED = "prohibited", "Prohibited practice (Art. 5)"
        HIGH_RISK = "high_risk", "High-risk (Art. 6)"
        LIMITED = "limited", "Limited risk: transparency obligations (Art. 50)"
        MINIMAL = "minimal", "Minimal risk"
        GENERAL_PURPOSE = "gpai", "General-purpose AI model (Art. 51-55)"

    class AnnexIIIArea(models.TextChoices):
        # Art. 6(1): a safety component of a product covered by Annex I harmonisation law.
        ANNEX_I = "annex_i", "Annex I product safety component (Art. 6(1))"
        BIOMETRICS = "1", "Annex III 1: Biometrics"
        CRITICAL_INFRASTRUCTURE = "2", "Annex III 2: Critical infrastructure"
        EDUCATION = "3", "Annex III 3: Education and vocational training"
        EMPLOYMENT = "4", "Annex III 4: Employment, workers management, access to self-employment"
        ESSENTIAL_SERVICES = "5", "Annex III 5: Access to essential private and public services and benefits"
        LAW_ENFORCEMENT = "6", "Annex III 6: Law enforcement"
        MIGRATION = "7", "Annex III 7: Migration, asylum and border control management"
        JUSTICE = "8", "Annex III 8: Administration of justice and democratic processes"

    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="ai_models")
    name = models.CharField(max_length=200)
    provider_name = models.CharField(max_length=200)
    provider_contact = models.CharField(max_length=254, help_text="E-mail address or postal contact of the provider.")
    intended_purpose = models.TextField()
    modality = models.CharField(max_length=20, choices=Modality.choices, default=Modality.IMAGE_TEXT)
    risk_category = models.CharField(max_length=20, choices=RiskCategory.choices)
    annex_iii_area = models.CharField(
        "high-risk area", max_length=10, choices=AnnexIIIArea.choices, blank=True,
        help_text="Required for high-risk systems, empty otherwise.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                   null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = GovernanceQuerySet.as_manager()

    # What a case's conclusions rest on (they are part of workflow.case_digest): frozen while a case of
    # one of the model's versions is being audited or was decided, like the version's card.
    FROZEN_FIELDS = ("provider_name", "intended_purpose", "modality", "risk_category", "annex_iii_area")

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance._loaded_frozen = {name: instance.__dict__[name] for name in cls.FROZEN_FIELDS
                                   if name in instance.__dict__}
        return instance

    def frozen_change_refusal(self) -> str | None:
        """Why this unsaved change cannot be saved (a frozen field changed while a case is audited), or None."""
        loaded = getattr(self, "_loaded_frozen", None)
        if self._state.adding or not loaded:
            return None
        changed = [name for name, value in loaded.items() if self.__dict__.get(name) != value]
        if not changed:
            return None
        busy = (AuditCase.objects.filter(model_version__ai_model_id=self.pk, state__in=AuditCase.AUDITED_STATES)
                .order_by("pk").values_list("pk", flat=True).first())
        if busy is None:
            return None
        return (f"{self} is under audit in case #{busy}, whose conclusions rest on its {', '.join(changed)}; these "
                "cannot change until the case is closed (archived) or sent back for changes. Register a new model "
                "instead if the system itself changed.")

    def save(self, *args, **kwargs):
        refusal = self.frozen_change_refusal()
        if refusal:
            raise ImmutableError(refusal)
        super().save(*args, **kwargs)
        self._loaded_frozen = {name: self.__dict__.get(name) for name in self.FROZEN_FIELDS}

    class Meta:
        verbose_name = "AI model"
        ordering = ["organisation__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["organisation", "name"], name="aimodel_unique_name_per_organisation"),
            models.CheckConstraint(
                condition=(Q(risk_category="high_risk") & ~Q(annex_iii_area=""))
                | (~Q(risk_category="high_risk") & Q(annex_iii_area="")),
                name="aimodel_high_risk_has_area",
                violation_error_message=("A high-risk system needs its high-risk area; "
                                         "other categories must leave it empty."),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """One version of an :class:`AIModel`: its artifact, fingerprint and model card.

    The artifact is a Hugging Face-format directory, either uploaded as an archive or registered by a
    server path below ``settings.LOUPE_MODEL_ROOTS``, or a hub id pinned to a commit. ``manifest`` maps
    every file's relative path to its SHA-256; ``manifest_hash`` fingerprints the whole directory and
    is what evidence provenance, sign-offs and reports refer to.
    """

    access_scope = Scope(org="ai_model__organisation", via_cases="model_version")

    class Source(models.TextChoices):
        ARCHIVE = "archive", "Uploaded archive"
        PATH = "path", "Server path"
        HUB = "hub", "Hub id at a pinned revision"

    class Architecture(models.TextChoices):
        DUAL_ENCODER = "dual_encoder", "Dual encoder (CLIP-like)"
        GENERATIVE_FUSION = "generative_fusion", "Generative fusion (LLaVA/BLIP-like)"
        UNKNOWN = "unknown", "Not detected yet"

    # Model-card sections, in the order of the Hugging Face model card template.
    CARD_FIELDS = ("model_details", "intended_uses", "out_of_scope_uses", "training_data", "evaluation_data",
                   "metrics", "limitations", "ethical_considerations", "caveats")

    ai_model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=100)
    source = models.CharField(max_length=10, choices=Source.choices)
    archive = models.FileField(upload_to="models/archives/%Y/%m/", blank=True, max_length=500)
    server_path = models.CharField(max_length=1024, blank=True)
    hub_id = models.CharField(max_length=200, blank=True)
    hub_revision = models.CharField(max_length=40, blank=True, validators=[GIT_REVISION_VALIDATOR])
    manifest = models.JSONField(default=dict, blank=True, help_text="{relative path: sha256} of every file.")
    manifest_hash = models.CharField(max_length=64, blank=True, validators=[SHA256_VALIDATOR])
    architecture_family = models.CharField(max_length=20, choices=Architecture.choices, default=Architecture.UNKNOWN)
    architecture_detail = models.CharField(max_length=200, blank=True,
                                           help_text="What detection saw, e.g. config model_type and architectures.")

    model_details = models.TextField(blank=True)
    intended_uses = models.TextField(blank=True)
    out_of_scope_uses = models.TextField(blank=True)
    training_data = models.TextField(blank=True)
    evaluation_data = models.TextField(blank=True)
    metrics = models.TextField(blank=True)
    limitations = models.TextField(blank=True)
    ethical_considerations = models.TextField(blank=True)
    caveats = models.TextField(blank=True)
    card_metadata = models.JSONField(default=dict, blank=True,
                                     help_text="Model-card YAML metadata (license, language, tags, ...).")

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                   null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["ai_model__name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["ai_model", "version"], name="modelversion_unique_label"),
            models.CheckConstraint(
                condition=(Q(source="archive") & ~Q(archive=""))
                | (Q(source="path") & ~Q(server_path=""))
                | (Q(source="hub") & ~Q(hub_id="") & ~Q(hub_revision="")),
                name="modelversion_source_complete",
                violation_error_message="An archive version needs its archive, a path version its server path, "
                                        "a hub version its id and pinned revision.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.ai_model} {self.version}"

    # What a reviewer judged: frozen while a case of this version is being audited or was decided.
    ARTIFACT_FIELDS = ("source", "archive", "server_path", "hub_id", "hub_revision", "manifest", "manifest_hash")
    FROZEN_FIELDS = ARTIFACT_FIELDS + CARD_FIELDS + ("card_metadata",)

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance._loaded_frozen = {name: instance._frozen_value(name) for name in cls.FROZEN_FIELDS
                                   if name in instance.__dict__}
        return instance

    def _frozen_value(self, name: str) -> Any:
        value = self.__dict__.get(name)
        return value.name if name == "archive" and value is not None and hasattr(value, "name") else value

    def frozen_change_refusal(self) -> str | None:
        """Why this unsaved change cannot be saved (a frozen field changed while a case is audited), or None."""
        loaded = getattr(self, "_loaded_frozen", None)
        if self._state.adding or not loaded:
            return None
        changed = [name for name, value in loaded.items() if self._frozen_value(name) != value]
        if not loaded.get("manifest_hash"):
            # The first manifest (computed by a worker after upload) is not a change.
            changed = [name for name in changed if name not in ("manifest", "manifest_hash")]
        if not changed:
            return None
        busy = self.cases.filter(state__in=AuditCase.AUDITED_STATES).values_list("pk", flat=True).first()
        if busy is None:
            return None
        return (f"Model version {self} is under audit in case #{busy}; {', '.join(changed)} cannot change. "
                "Register a new version instead.")

    def save(self, *args, **kwargs):
        refusal = self.frozen_change_refusal()
        if refusal:
            raise ImmutableError(refusal)
        super().save(*args, **kwargs)
        self._loaded_frozen = {name: self._frozen_value(name) for name in self.FROZEN_FIELDS}

    def clean(self) -> None:
        super().clean()
        if self.source == self.Source.PATH and self.server_path:
            validate_server_path(self.server_path)

    def set_manifest(self, manifest: dict[str, str]) -> None:
        """Store a ``{relative path: sha256}`` manifest and its hash (does not save)."""
        self.manifest = dict(manifest)
        self.manifest_hash = manifest_hash(self.manifest)

    def card_dict(self) -> dict[str, str]:
        """The model-card sections as a plain dict (field name -> text)."""
        return {name: getattr(self, name) for name in self.CARD_FIELDS}


def manifest_hash(manifest: dict[str, str]) -> str:
    """The SHA-256 fingerprint of a model-directory manifest (canonical JSON of the mapping)."""
    for path, value in manifest.items():
        if not isinstance(path, str) or not re.fullmatch(r"[0-9a-f]{64}", str(value)):
            raise ValueError(f"manifest entry {path!r}: expected a hex SHA-256, got {value!r}")
    return digest(manifest)


def validate_server_path(path: str) -> None:
    """Refuse server paths outside ``settings.LOUPE_MODEL_ROOTS`` (after resolving symlinks and ``..``)."""
    resolved = Path(path).resolve()
    for root in settings.LOUPE_MODEL_ROOTS:
        if resolved.is_relative_to(Path(root).resolve()):
            return
    raise ValidationError({"server_path": f"{path!r} is not below an allowed model root "
                                          f"({', '.join(settings.LOUPE_MODEL_ROOTS)})."})


# --------------------------------------------------------------------------------------------------
# Audit cases
# --------------------------------------------------------------------------------------------------


def validate_probe_plan(plan: Any) -> None:
    """Check a probe plan's structure: ``[{"kind": str, "params": {...}, "dataset": str | None}, ...]``.

    Kinds and their parameter schemas come from their declarations (``workers.probes.kinds``).
    Raises ``ValidationError`` naming the offending item, e.g. ``probe_plan[2].kind: unknown probe
    kind`` or ``probe_plan[0].params.limit: input should be greater than or equal to 1 (got 0)``.
    An empty plan is valid for a draft; :func:`governance.workflow.submit` requires at least one probe.
    """
    from workers.probes import kinds  # plain library; governance may import it (never the reverse)

    if not isinstance(plan, list):
        raise ValidationError(f"probe plan must be a JSON list of probes, got {type(plan).__name__}")
    if len(plan) > MAX_PROBE_PLAN_ITEMS:
        raise ValidationError(f"probe plan has {len(plan)} probes; at most {MAX_PROBE_PLAN_ITEMS} are allowed")
    known = set(kinds.names())
    errors = []
    for i, item in enumerate(plan):
        where = f"probe_plan[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected an object with 'kind', 'params', 'dataset', got {type(item).__name__}")
            continue
        unknown_keys = set(item) - {"kind", "params", "dataset"}
        if unknown_keys:
            errors.append(f"{where}: unknown keys {sorted(unknown_keys)}; allowed: kind, params, dataset")
        kind = item.get("kind")
        if not isinstance(kind, str) or not kind:
            errors.append(f"{where}.kind: required, a probe kind name")
        elif kind not in known:
            errors.append(f"{where}.kind: unknown probe kind {kind!r}; known: {', '.join(sorted(known)) or 'none'}")
        params = item.get("params", {})
        if not isinstance(params, dict):
            errors.append(f"{where}.params: expected an object, got {type(params).__name__}")
        else:
            try:
                canonical_json(params)
            except (TypeError, ValueError) as exc:
                errors.append(f"{where}.params: not plain JSON ({exc})")
            else:
                if kind in known:
                    errors += [f"{where}.params.{problem}" for problem in kinds.param_problems(kind, params)]
        dataset = item.get("dataset")
        if dataset is not None and (not isinstance(dataset, str) or not dataset or len(dataset) > 1024):
            errors.append(f"{where}.dataset: expected a dataset name or path (1-1024 characters) or null")
    if errors:
        raise ValidationError(errors)


class AuditCase(models.Model):
    """A model version under audit: what to probe, who reviews, and where the case stands.

    ``state`` changes only through :mod:`governance.workflow` (which checks the transition, the actor
    and writes the audit log in the same transaction); saving a changed state directly raises.
    """

    access_scope = Scope(org="model_version__ai_model__organisation", via_cases="")

    class State(models.TextChoices):
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Submitted"
        RUNNING = "running", "Running probes"
        EVIDENCE_READY = "evidence_ready", "Evidence ready"
        IN_REVIEW = "in_review", "In review"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        CHANGES_REQUESTED = "changes_requested", "Changes requested"
        ARCHIVED = "archived", "Archived"

    # The submitter may edit title, scope, plan and settings only while the case is in these states.
    EDITABLE_STATES = (State.DRAFT, State.CHANGES_REQUESTED)
    # While a case is in one of these states, its model version's artifact and card are frozen.
    AUDITED_STATES = (State.SUBMITTED, State.RUNNING, State.EVIDENCE_READY, State.IN_REVIEW, State.APPROVED,
                      State.REJECTED)

    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="cases")
    title = models.CharField(max_length=200)
    scope = models.TextField(blank=True)
    probe_plan = models.JSONField(default=list, blank=True, validators=[validate_probe_plan])
    reviewers = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="review_cases", blank=True)
    required_approvals = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text="Distinct reviewer approvals needed before the case is approved.")
    state = models.CharField(max_length=20, choices=State.choices, default=State.DRAFT, db_index=True, editable=False)
    review_round = models.PositiveIntegerField(
        default=0, editable=False, help_text="Incremented each time the case enters review; only sign-offs of the "
                                             "current round count.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                   null=True, blank=True)
    submitted_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                     null=True, blank=True, editable=False)
    submitted_at = models.DateTimeField(null=True, blank=True, editable=False)
    state_changed_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = AuditCaseQuerySet.as_manager()
    # True only while governance.workflow saves the state change it checked and logs.
    _workflow_transition: bool = False
    _loaded_state: str | None = None  # the state as read from the database (from_db)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("sign_off_auditcase", "Can sign off audit cases it is assigned to")]
        constraints = [
            models.CheckConstraint(condition=Q(required_approvals__gte=1) & Q(required_approvals__lte=10),
                                   name="auditcase_required_approvals_range"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance._loaded_state = instance.__dict__.get("state")
        return instance

    def save(self, *args, **kwargs):
        # State changes must go through governance.workflow, which checks and logs them.
        if not self._workflow_transition:
            if self._state.adding and self.state != self.State.DRAFT:
                raise ValueError(f"A new audit case starts as 'draft', not {self.state!r}; "
                                 "use governance.workflow to move it on.")
            loaded = getattr(self, "_loaded_state", None)
            if not self._state.adding and loaded is not None and self.state != loaded:
                raise ValueError(f"Audit case #{self.pk}: state changes from {loaded!r} to {self.state!r} go "
                                 "through governance.workflow.transition(), which checks and logs them.")
        super().save(*args, **kwargs)
        self._loaded_state = self.state

    @property
    def organisation(self) -> Organisation:
        return self.model_version.ai_model.organisation

    @property
    def is_editable(self) -> bool:
        return self.state in self.EDITABLE_STATES


# --------------------------------------------------------------------------------------------------
# Probe runs and evidence
# --------------------------------------------------------------------------------------------------


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


class ProbeRun(models.Model):
    """One probe of a case's plan executed (or to be executed) by a worker, with its provenance."""

    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    ACTIVE = (Status.PENDING, Status.QUEUED, Status.RUNNING)

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="runs")
    kind = models.CharField(max_length=100)
    params = models.JSONField(default=dict, blank=True)
    dataset = models.CharField(max_length=1024, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    progress = models.FloatField(default=0.0, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    phase = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    idempotency_key = models.CharField(max_length=200, unique=True, default=new_idempotency_key)
    attempts = models.PositiveIntegerField(default=0)
    device = models.CharField(max_length=100, blank=True)
    # Provenance: enough to reproduce the run.
    model_manifest_hash = models.CharField(max_length=64, blank=True)
    dataset_hash = models.CharField(max_length=64, blank=True)
    code_version = models.CharField(max_length=100, blank=True)
    seed = models.BigIntegerField(null=True, blank=True)
    library_versions = models.JSONField(default=dict, blank=True)
    # The lease (workers/tasks.py): the delivery that claimed the run holds ``lease_token`` and renews
    # ``lease_expires_at`` with a heartbeat while it works. A run whose lease lapsed lost its worker;
    # the sweeper (governance/pipeline.py ``recover_runs``) dispatches it again. ``dispatched_at`` is
    # when its latest task message was sent, so a message the broker lost is noticed too.
    lease_token = models.CharField(max_length=64, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)

    objects = ProbeRunQuerySet.as_manager()
    _loaded_status: str | None = None  # the status as read from the database (from_db)

    class Meta:
        ordering = ["case", "created_at", "pk"]
        constraints = [
            models.CheckConstraint(condition=Q(progress__gte=0.0) & Q(progress__lte=1.0),
                                   name="proberun_progress_0_1"),
        ]

    def __str__(self) -> str:
        return f"run #{self.pk} {self.kind} ({self.status})"

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance._loaded_status = instance.__dict__.get("status")
        return instance

    def save(self, *args, **kwargs):
        # Once finished, a run (and so its evidence) is frozen: a finished run set back to "running"
        # would make its evidence editable again.
        if not self._state.adding and getattr(self, "_loaded_status", None) in self.FINISHED:
            raise ImmutableError(f"Probe run #{self.pk} finished ({self._loaded_status}); it cannot be changed.")
        super().save(*args, **kwargs)
        self._loaded_status = self.status

    def delete(self, *args, **kwargs):
        if ProbeRun.objects.filter(pk=self.pk, status__in=self.FINISHED).exists():
            raise ImmutableError(f"Probe run #{self.pk} finished; it is part of the record and cannot be deleted.")
        return super().delete(*args, **kwargs)

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


def validate_findings(findings: Any) -> None:
    """Findings are ``[{"severity": "high"|"medium"|"low"|"info", "title": str, "detail": str}, ...]``."""
    if not isinstance(findings, list):
        raise ValidationError("findings must be a JSON list")
    for i, finding in enumerate(findings):
        if not isinstance(finding, dict):
            raise ValidationError(f"findings[{i}]: expected an object")
        if finding.get("severity") not in FINDING_SEVERITIES:
            raise ValidationError(f"findings[{i}].severity: expected one of {', '.join(FINDING_SEVERITIES)}")
        if not isinstance(finding.get("title"), str) or not finding["title"]:
            raise ValidationError(f"findings[{i}].title: required text")
        if not isinstance(finding.get("detail", ""), str):
            raise ValidationError(f"findings[{i}].detail: expected text")


class Evidence(models.Model):
    """What one probe run produced: metrics, a summary, findings and artifact files.

    One per run (so a redelivered task can never add a second set). Immutable once the run finished.
    """

    access_scope = Scope(org="run__case__model_version__ai_model__organisation", case="run__case")

    run = models.OneToOneField(ProbeRun, on_delete=models.PROTECT, related_name="evidence")
    kind = models.CharField(max_length=100)
    metrics = models.JSONField(default=dict, blank=True)
    summary = models.TextField(blank=True)
    findings = models.JSONField(default=list, blank=True, validators=[validate_findings])
    created_at = models.DateTimeField(auto_now_add=True)

    objects = EvidenceQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "evidence"
        ordering = ["run__case", "run__created_at", "pk"]

    def __str__(self) -> str:
        return f"evidence #{self.pk} {self.kind}"

    def _run_finished(self) -> bool:
        # Ask the database, not a possibly stale run instance.
        return ProbeRun.objects.filter(pk=self.run_id, status__in=ProbeRun.FINISHED).exists()

    def save(self, *args, **kwargs):
        if not self._state.adding and self._run_finished():
            raise ImmutableError(f"Evidence #{self.pk} belongs to a finished run and cannot be changed.")
        validate_findings(self.findings)
        canonical_json(self.metrics)  # refuse NaN/Infinity and non-JSON values early
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        if self._run_finished():
            raise ImmutableError(f"Evidence #{self.pk} belongs to a finished run and cannot be deleted.")
        return super().delete(*args, **kwargs)

    @property
    def max_severity(self) -> str | None:
        present = {f.get("severity") for f in self.findings or []}
        return next((s for s in FINDING_SEVERITIES if s in present), None)


def artifact_upload_to(instance: EvidenceArtifact, filename: str) -> str:
    run = instance.evidence.run
    return f"evidence/case-{run.case_id}/run-{run.pk}/{filename}"


class EvidenceArtifact(AppendOnlyModel):
    """A file (figure, array, CSV) attached to evidence, stored through Django's storage API."""

    access_scope = Scope(org="evidence__run__case__model_version__ai_model__organisation",
                         case="evidence__run__case")

    evidence = models.ForeignKey(Evidence, on_delete=models.PROTECT, related_name="artifacts")
    name = models.CharField(max_length=200)
    file = models.FileField(upload_to=artifact_upload_to, max_length=500)
    content_type = models.CharField(max_length=100)
    sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["evidence", "name"]
        constraints = [models.UniqueConstraint(fields=["evidence", "name"], name="artifact_unique_name")]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if self._state.adding and ProbeRun.objects.filter(
                pk=self.evidence.run_id, status__in=ProbeRun.FINISHED).exists():
            raise ImmutableError("Evidence of a finished run is immutable; no artifact can be added to it.")
        super().save(*args, **kwargs)

    @classmethod
    def from_bytes(cls, evidence: Evidence, name: str, content: bytes, content_type: str) -> EvidenceArtifact:
        """Store ``content`` through the default storage and create the row with its SHA-256 and size."""
        if "/" in name or "\\" in name or name in {"", ".", ".."}:
            raise ValueError(f"artifact name {name!r} must be a plain file name")
        from governance import blobs

        artifact = cls(evidence=evidence, name=name, content_type=content_type,
                       sha256=hashlib.sha256(content).hexdigest(), size=len(content))
        # Content-addressed (governance/blobs.py): a retried transaction rewrites no copies.
        run = evidence.run
        artifact.file.name = blobs.store_blob(blobs.run_directory(run.case_id, run.pk), content,
                                              artifact.sha256, Path(name).suffix[:20])
        artifact.save()
        return artifact


# --------------------------------------------------------------------------------------------------
# Sign-offs and reports
# --------------------------------------------------------------------------------------------------


class Signoff(AppendOnlyModel):
    """A reviewer's decision on a case (or on one evidence item / report section). Append-only.

    ``digest`` is the SHA-256 of what the reviewer saw (:func:`governance.workflow.case_digest` or
    :func:`governance.workflow.evidence_digest`), so a later change to the evidence is visible.
    Create sign-offs with :func:`governance.workflow.sign_off`, which enforces segregation of duties.
    """

    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"
        REQUEST_CHANGES = "request_changes", "Request changes"

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="signoffs")
    evidence = models.ForeignKey(Evidence, on_delete=models.PROTECT, related_name="signoffs", null=True, blank=True)
    report_section = models.CharField(max_length=100, blank=True)
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="signoffs")
    decision = models.CharField(max_length=20, choices=Decision.choices)
    comment = models.TextField(blank=True)
    digest = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    review_round = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        verbose_name = "sign-off"
        ordering = ["case", "created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.reviewer}: {self.decision} on case #{self.case_id}"

    @property
    def is_case_level(self) -> bool:
        return self.evidence_id is None and not self.report_section


def report_upload_to(instance: Report, filename: str) -> str:
    return f"reports/case-{instance.case_id}/v{instance.version}/{filename}"


class Report(AppendOnlyModel):
    """An issued report version. Immutable: a new generation creates version n+1 that supersedes n."""

    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="reports")
    version = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    pdf = models.FileField(upload_to=report_upload_to, max_length=500)
    sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    manifest = models.JSONField(default=dict)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reports")
    created_at = models.DateTimeField(auto_now_add=True)
    supersedes = models.OneToOneField("self", on_delete=models.PROTECT, null=True, blank=True,
                                      related_name="superseded_by")
    changelog = models.JSONField(default=list, blank=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["case", "version"]
        constraints = [
            models.UniqueConstraint(fields=["case", "version"], name="report_unique_version_per_case"),
            models.CheckConstraint(condition=Q(version__gte=1), name="report_version_positive"),
        ]

    def __str__(self) -> str:
        return f"report v{self.version} of case #{self.case_id}"

    def save(self, *args, **kwargs):
        if self._state.adding:
            if self.supersedes_id is not None:
                previous = Report.objects.filter(pk=self.supersedes_id).values("case_id", "version").first()
                if previous is None or previous["case_id"] != self.case_id or previous["version"] != self.version - 1:
                    raise ValidationError("A report supersedes the previous version of the same case.")
            elif self.version != 1:
                raise ValidationError(f"Report v{self.version} must name the version it supersedes.")
        super().save(*args, **kwargs)


def countersignature_upload_to(instance: Countersignature, filename: str) -> str:
    report = instance.report
    return f"reports/case-{report.case_id}/v{report.version}/countersigned/{filename}"


class Countersignature(AppendOnlyModel):
    """A reviewer's countersignature on an issued report: the whole countersigned PDF, stored as is.

    Each one extends the issued file (``sequence`` 1) or the previous countersigned file by one
    incremental revision holding the reviewer's signature; ``previous_sha256`` names the file it
    extends. Accepted by :func:`governance.reports.countersign.countersign`, recorded in the audit log
    (``report.countersigned``) with its content digest, and exported with the report.
    """

    report = models.ForeignKey(Report, on_delete=models.PROTECT, related_name="countersignatures")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="countersignatures")
    sequence = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    pdf = models.FileField(upload_to=countersignature_upload_to, max_length=500)
    sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR], unique=True)
    previous_sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    cert_sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    signer = models.CharField(max_length=300, help_text="The signing certificate's subject.")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["report", "sequence"]
        constraints = [models.UniqueConstraint(fields=["report", "sequence"], name="countersignature_unique_sequence")]

    def __str__(self) -> str:
        return f"countersignature {self.sequence} of {self.report} by {self.reviewer}"

    @property
    def case_id(self) -> int:  # the audit log attributes the row to the report's case
        return self.report.case_id

    @property
    def case(self) -> AuditCase:
        return self.report.case


class ReportRequest(models.Model):
    """One request for a report version, keyed by the client's request id (idempotency key).

    The request and the version it produced are linked in the transaction that issues the version,
    so a repeated request (a client retry, or the ``render_report`` task delivered again after its
    commit) finds the link and returns the same version instead of issuing another.
    """

    key = models.CharField(max_length=200, unique=True)
    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="report_requests")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    report = models.OneToOneField(Report, on_delete=models.PROTECT, null=True, blank=True, related_name="request")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"report request {self.key} for case #{self.case_id}"


# --------------------------------------------------------------------------------------------------
# Audit log
# --------------------------------------------------------------------------------------------------


class AuditEvent(AppendOnlyModel):
    """One row of the append-only, hash-chained audit log. Write with :func:`governance.audit_log.record`.

    ``payload`` is stored as canonical JSON *text* so its hash is over the exact stored bytes.
    ``row_hash`` covers every other column and ``prev_hash``, chaining each row to the one before.
    """

    access_scope = Scope(org="organisation", case="case")

    GENESIS_HASH = "0" * 64

    seq = models.PositiveBigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                              related_name="+")
    actor_label = models.CharField(max_length=150, help_text="Username at the time, or 'system'.")
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64, blank=True)
    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, null=True, blank=True,
                                     related_name="audit_events")
    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, null=True, blank=True,
                             related_name="audit_events")
    payload = models.TextField(help_text="Canonical JSON.")
    payload_hash = models.CharField(max_length=64)
    prev_hash = models.CharField(max_length=64, unique=True)
    row_hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()
    # True only on the rows governance.audit_log.record() chains and saves.
    _via_record: bool = False

    class Meta:
        ordering = ["seq"]
        indexes = [models.Index(fields=["object_type", "object_id"], name="auditevent_object_idx")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_type}:{self.object_id} by {self.actor_label}"

    def save(self, *args, **kwargs):
        if self._state.adding and not self._via_record:
            raise ImmutableError("Audit events are written only through governance.audit_log.record(), "
                                 "which chains them.")
        super().save(*args, **kwargs)

    @property
    def data(self) -> Any:
        import json

        return json.loads(self.payload)


class AuditChainHead(models.Model):
    """The chain's tip (last seq and row hash), locked by every writer so concurrent writers cannot fork
    the chain; verification compares it with the last row, which detects a deleted tail."""

    seq = models.PositiveBigIntegerField(default=0)
    row_hash = models.CharField(max_length=64, default=AuditEvent.GENESIS_HASH)
    updated_at = models.DateTimeField(auto_now=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        verbose_name = "audit chain head"

    def __str__(self) -> str:
        return f"head at #{self.seq}"


# --------------------------------------------------------------------------------------------------
# Acceptance criteria, acknowledged findings and provider documents (report content, issue 24)
# --------------------------------------------------------------------------------------------------


class AcceptanceCriterion(models.Model):
    """What a case accepts for one metric of one probe kind: the line between "meets" and a finding.

    Defaults come from :mod:`governance.acceptance` (per risk category and intended purpose); an
    admin may change one only through :func:`governance.acceptance.set_criterion`, which logs the
    reason. Findings and their severities in the report derive from these rows, not from the probes.
    """

    class Comparator(models.TextChoices):
        AT_MOST = "at_most", "at most the threshold"
        AT_LEAST = "at_least", "at least the threshold"
        BELOW_REFERENCE = "below_reference", "below the reference measure"
        ABOVE_REFERENCE = "above_reference", "above the reference measure"

    class Severity(models.TextChoices):
        HIGH = "high", "High"
        MEDIUM = "medium", "Medium"
        LOW = "low", "Low"

    class Source(models.TextChoices):
        DEFAULT = "default", "Default for the risk category"
        ADMIN = "admin", "Changed by an administrator"

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="criteria")
    kind = models.CharField(max_length=100)
    metric = models.CharField(max_length=200, help_text="Metric key as the probe records it (see the glossary); "
                              "criteria scoped by ``where`` add '@field=value' to keep keys unique.")
    comparator = models.CharField(max_length=20, choices=Comparator.choices)
    threshold = models.FloatField(null=True, blank=True)
    reference = models.CharField(max_length=200, blank=True,
                                 help_text="For *_reference comparators: the metric compared against.")
    where = models.JSONField(default=dict, blank=True,
                             help_text='Only rows of the metrics that match, '
                                       'e.g. {"family": "corruption", "severity": 3}.')
    severity = models.CharField(max_length=10, choices=Severity.choices,
                                help_text="Severity of the finding when the criterion is not met.")
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.DEFAULT)
    rationale = models.TextField(blank=True, help_text="Why this line: the default's reason or the admin's.")
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                                   related_name="+")
    updated_at = models.DateTimeField(auto_now=True)

    objects = GovernanceQuerySet.as_manager()
    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    class Meta:
        verbose_name_plural = "acceptance criteria"
        ordering = ["case", "kind", "metric"]
        constraints = [models.UniqueConstraint(fields=["case", "kind", "metric"], name="criterion_unique_metric"),
                       models.CheckConstraint(
                           condition=Q(comparator__in=["at_most", "at_least"], threshold__isnull=False)
                           | Q(comparator__in=["below_reference", "above_reference"]) & ~Q(reference=""),
                           name="criterion_has_threshold_or_reference")]

    def __str__(self) -> str:
        bound = self.threshold if self.threshold is not None else self.reference
        return f"{self.kind} {self.metric} {self.comparator} {bound}"


class FindingAcknowledgement(AppendOnlyModel):
    """A reviewer's reason for approving despite one open high or medium finding. Append-only."""

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="acknowledgements")
    signoff = models.ForeignKey(Signoff, on_delete=models.PROTECT, related_name="acknowledgements")
    finding = models.CharField(max_length=300, help_text="The finding's key (see governance.acceptance).")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    reason = models.TextField()
    review_round = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()
    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    class Meta:
        ordering = ["case", "created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.reviewer}: {self.finding}"


def provider_document_upload_to(instance: ProviderDocument, filename: str) -> str:
    return (f"provider-documents/version-{instance.model_version_id}/{instance.doc_type}/"
            f"v{instance.version}/{filename}")


class ProviderDocument(AppendOnlyModel):
    """A document only the provider can supply (risk-management file, declaration of conformity...).

    Typed, hashed and versioned: a new upload of the same type is version n+1; earlier versions stay.
    The report's coverage matrix cites the latest version of each type with its SHA-256.
    """

    class DocType(models.TextChoices):
        RISK_MANAGEMENT = "risk_management", "Risk-management file (Art. 9)"
        QMS = "qms", "Quality-management system (Art. 17)"
        STANDARDS = "standards", "Harmonised standards and specifications applied"
        POST_MARKET = "post_market", "Post-market monitoring plan (Art. 72)"
        DECLARATION = "declaration", "EU declaration of conformity (Art. 47)"
        DATA_SHEET = "data_sheet", "Data sheet (training, validation and test data)"
        INSTRUCTIONS = "instructions", "Instructions for use (Art. 13)"
        OVERSIGHT = "oversight", "Human-oversight measures (Art. 14)"
        CYBERSECURITY = "cybersecurity", "Cybersecurity measures (Art. 15)"
        SYSTEM_DESCRIPTION = "system_description", "System description: hardware, deployment forms, versions"
        CHANGE_LOG = "change_log", "Changes made through the life cycle"
        SYNTHETIC_CONTENT = "synthetic_content", "Marking and disclosure of synthetic content (Art. 50)"
        GPAI_DOCUMENTATION = "gpai_documentation", "General-purpose model documentation (Art. 53, Annex XI)"
        COPYRIGHT_POLICY = "copyright_policy", "Copyright policy and training-content summary (Art. 53(1)(c)-(d))"

    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="provider_documents")
    doc_type = models.CharField(max_length=30, choices=DocType.choices)
    version = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    title = models.CharField(max_length=200)
    file = models.FileField(upload_to=provider_document_upload_to, max_length=500)
    content_type = models.CharField(max_length=100)
    sha256 = models.CharField(max_length=64, validators=[SHA256_VALIDATOR])
    size = models.PositiveBigIntegerField()
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()
    access_scope = Scope(org="model_version__ai_model__organisation", via_cases="model_version__provider_documents")

    class Meta:
        ordering = ["model_version", "doc_type", "version"]
        constraints = [models.UniqueConstraint(fields=["model_version", "doc_type", "version"],
                                               name="provider_document_unique_version")]

    def __str__(self) -> str:
        return f"{self.get_doc_type_display()} v{self.version}"


# --------------------------------------------------------------------------------------------------
# Comment threads on findings and notifications (issue 25)
# --------------------------------------------------------------------------------------------------


class FindingComment(models.Model):
    """One comment in the thread on one finding of a case. Part of the review's record.

    Append-only: the text, author and target never change (a correction is a new comment). The one
    change allowed is marking the comment resolved, once, with who and when
    (:func:`governance.comments.resolve`); the audit log records both the comment and its resolution.
    ``finding`` is the finding's key (see :func:`governance.comments.case_findings`).
    """

    access_scope = Scope(org="case__model_version__ai_model__organisation", case="case")

    MUTABLE_FIELDS = ("resolved_by", "resolved_at")

    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, related_name="comments")
    finding = models.CharField(max_length=300, db_index=True)
    evidence = models.ForeignKey(Evidence, on_delete=models.PROTECT, related_name="comments", null=True, blank=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    body = models.TextField()
    reply_to = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="replies")
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                                    related_name="+")
    resolved_at = models.DateTimeField(null=True, blank=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["case", "created_at", "pk"]
        constraints = [models.CheckConstraint(
            condition=Q(resolved_by__isnull=True, resolved_at__isnull=True)
            | Q(resolved_by__isnull=False, resolved_at__isnull=False),
            name="findingcomment_resolved_who_and_when")]

    def __str__(self) -> str:
        return f"comment #{self.pk} on {self.finding} of case #{self.case_id}"

    @classmethod
    def from_db(cls, db: str | None, field_names: Collection[str], values: Collection[Any],
                **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance._loaded = dict(zip(field_names, values, strict=True))
        return instance

    def save(self, *args, **kwargs):
        loaded = getattr(self, "_loaded", None)
        if not self._state.adding and loaded is not None:
            changed = [f.attname for f in self._meta.concrete_fields
                       if f.attname in loaded and getattr(self, f.attname) != loaded[f.attname]]
            frozen = [name for name in changed if name not in ("resolved_by_id", "resolved_at")]
            if frozen or (changed and (loaded.get("resolved_at") is not None)):
                raise ImmutableError(f"Comment #{self.pk} is part of the review record; only marking it resolved "
                                     "(once) is allowed. Add a new comment instead.")
        super().save(*args, **kwargs)
        self._loaded = {f.attname: getattr(self, f.attname) for f in self._meta.concrete_fields}

    def delete(self, *args, **kwargs):
        raise ImmutableError(f"Comment #{self.pk} is part of the review record and cannot be deleted.")

    @property
    def is_resolved(self) -> bool:
        return self.resolved_at is not None


class WebhookEndpoint(models.Model):
    """Where an organisation wants its cases' events POSTed, signed with ``secret`` (HMAC-SHA256).

    ``events`` lists the event names to send (empty: all). See :mod:`governance.notifications`.
    """

    access_scope = Scope(org="organisation")

    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="webhooks")
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=200)
    events = models.JSONField(default=list, blank=True)
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+",
                                   null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        ordering = ["organisation", "pk"]

    def __str__(self) -> str:
        return f"webhook #{self.pk} of {self.organisation_id}: {self.url}"

    def wants(self, event: str) -> bool:
        return self.is_active and (not self.events or event in self.events)


class WebhookDelivery(models.Model):
    """One event sent (or being sent) to one endpoint: the exact body, and how delivery went."""

    access_scope = Scope(org="endpoint__organisation")

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.PROTECT, related_name="deliveries")
    event = models.CharField(max_length=64)
    case = models.ForeignKey(AuditCase, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    delivery_id = models.CharField(max_length=64, unique=True, default=new_idempotency_key)
    body = models.TextField(help_text="The JSON body as sent (its bytes are what the signature covers).")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    response_status = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    objects = GovernanceQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.event} to webhook #{self.endpoint_id} ({self.status})"

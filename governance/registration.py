"""Registering a model directory that lives on the server (``manage.py submit_model``, the demo).

Uploads through the API go through :mod:`governance.uploads`; an operator with shell access instead
points Loupe at a Hugging Face-format directory below ``LOUPE_MODEL_ROOTS``. Either way the version
gets its SHA-256 manifest from the ``compute_manifest`` task and its card from the provider's README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from governance import audit_log, modelcard
from governance.models import AIModel, AuditCase, ModelVersion, Organisation

# A plan that suits each architecture family, used when a case is created without an explicit plan.
# Small sample sizes: a first look in minutes; a full audit raises ``limit`` in its own plan.
DEFAULT_PLANS: dict[str, list[dict[str, Any]]] = {
    "dual_encoder": [
        {"kind": "grounding", "params": {"methods": "all", "limit": 64}, "dataset": "zoo:heldout"},
        # 32, not 16: one randomised network's pointing on the decoy scenes varies a lot between
        # draws (0.00-0.41 at 32 examples), and the verdict averages only three
        {"kind": "sanity", "params": {"method": "chefer", "limit": 32}, "dataset": "zoo:heldout-decoys"},
        {"kind": "robustness", "params": {"limit": 32}, "dataset": "zoo:heldout"},
        {"kind": "attention", "params": {"limit": 32}, "dataset": "zoo:heldout"},
    ],
    # No dataset: these kinds caption the zoo's own generated scenes, whose objects they know.
    "generative_fusion": [
        {"kind": "token_attribution", "params": {"limit": 24}},
        {"kind": "attention", "params": {"limit": 16}},
    ],
}


class RegistrationError(Exception):
    """The directory or card cannot be registered (the message says why)."""


def check_model_directory(directory: Path) -> Path:
    """A directory below ``LOUPE_MODEL_ROOTS`` with ``config.json`` and safetensors weights only."""
    from governance.uploads import PICKLE_SUFFIXES

    directory = directory.resolve()
    roots = [Path(r).resolve() for r in settings.LOUPE_MODEL_ROOTS]
    if not any(directory.is_relative_to(root) for root in roots):
        raise RegistrationError(f"{directory} is not below an allowed model root ({', '.join(map(str, roots))}); "
                                "copy it there or add its parent to LOUPE_MODEL_ROOTS")
    if not (directory / "config.json").is_file():
        raise RegistrationError(f"{directory} has no config.json: not a Hugging Face-format model directory")
    pickled = sorted(p.name for p in directory.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise RegistrationError(f"{directory} contains pickled weights ({', '.join(pickled[:5])}); Loupe loads "
                                "safetensors only, because unpickling runs code. Convert them with safetensors")
    if not any(directory.rglob("*.safetensors")):
        raise RegistrationError(f"{directory} has no .safetensors weights")
    return directory


@transaction.atomic
def register_directory(directory: Path, *, organisation: Organisation, submitter, name: str, version: str,
                       card_text: str | None = None, risk_category: str = AIModel.RiskCategory.MINIMAL,
                       intended_purpose: str = "", provider_contact: str = "") -> ModelVersion:
    """Create (or reuse, by name) the inventory entry and a new version for ``directory``; import the
    card; queue the manifest on commit. Raises :class:`RegistrationError` or ``ModelCardError``."""
    from workers import tasks

    directory = check_model_directory(directory)
    parsed = modelcard.parse(card_text) if card_text else None
    ai_model, created = AIModel.objects.get_or_create(
        organisation=organisation, name=name,
        defaults={"provider_name": organisation.name, "provider_contact": provider_contact or submitter.email or "-",
                  "intended_purpose": intended_purpose or (parsed.fields.get("intended_uses") if parsed else "")
                  or "(not stated)", "risk_category": risk_category, "created_by": submitter})
    if created:
        audit_log.record(submitter, "ai_model.created", ai_model, {"name": name})
    if ModelVersion.objects.filter(ai_model=ai_model, version=version).exists():
        raise RegistrationError(f"{name} already has a version {version!r}; versions are immutable records, "
                                "pick a new version label")
    model_version = ModelVersion(ai_model=ai_model, version=version, source=ModelVersion.Source.PATH,
                                 server_path=str(directory), created_by=submitter)
    model_version.full_clean(exclude=["manifest_hash"])
    model_version.save()
    audit_log.record(submitter, "model_version.registered", model_version, {"server_path": str(directory)})
    if card_text:
        modelcard.import_card(model_version, card_text, by=submitter)
    tasks.enqueue_on_commit(tasks.compute_manifest, model_version.pk)
    return model_version


@transaction.atomic
def create_case(version: ModelVersion, *, submitter, title: str, plan: list[dict[str, Any]] | None = None,
                reviewers=(), assigned_by=None, scope: str = "") -> AuditCase:
    """A draft case for ``version`` with ``plan`` (or the family's default plan)."""
    from governance import workflow

    if plan is None:
        family = version.architecture_family
        if family not in DEFAULT_PLANS:
            raise RegistrationError(f"no default probe plan for architecture family {family!r}; pass a plan")
        plan = DEFAULT_PLANS[family]
    case = AuditCase(model_version=version, title=title, scope=scope, probe_plan=plan, created_by=submitter)
    case.full_clean()
    case.save()
    audit_log.record(submitter, "case.created", case, {"title": title, "probes": len(plan)})
    if reviewers:
        workflow.assign_reviewers(case, reviewers, by=assigned_by)
    return case

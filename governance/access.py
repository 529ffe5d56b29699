"""Roles and object-level visibility, decided in one place.

Roles are Django groups, created by migration ``0003_roles`` and kept in sync after every
``migrate`` (see :func:`sync_roles`):

============  ========================================================================================
submitter     A model provider's engineer. Belongs to one :class:`~governance.models.Organisation`
              (via ``Membership``). Sees and edits only that organisation's models, versions and cases.
reviewer      Independent reviewer. Sees only the cases they are *assigned to* (``AuditCase.reviewers``)
              and what hangs off them (model, version, runs, evidence, sign-offs, reports, audit events).
              Least privilege: a reviewer has no business reading other providers' unreleased models.
              Signs off through :func:`governance.workflow.sign_off`; never edits.
auditor       Read-only, everything (e.g. a regulator or notified body). Can change nothing.
admin         Everything (also Django superusers). Assigns reviewers, archives cases.
============  ========================================================================================

A user may hold several roles; visibility is the union. A user with no role sees nothing.

Querysets are narrowed here and only here: ``Model.objects.visible_to(user)`` (defined on every
governance model's manager) calls :func:`narrow`. The API viewsets and the admin both start from it,
so an object a user may not see is a 404 everywhere, never a 403 that leaks its existence.

Public functions: ``roles_of(user)``, ``has_role(user, role)``, ``is_admin(user)``, ``is_auditor(user)``,
``organisation_of(user)``, ``narrow(qs, user)``, ``register_scope(model, ...)``, ``can_edit(user, obj)``,
``can_create_for(user, organisation)``, ``sync_roles(apps)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.db.models import Model, Q, QuerySet

from governance.scope import Scope

QS = TypeVar("QS", bound=QuerySet[Any])

SUBMITTER = "submitter"
REVIEWER = "reviewer"
AUDITOR = "auditor"
ADMIN = "admin"
ROLES = (SUBMITTER, REVIEWER, AUDITOR, ADMIN)

VIEW = ("view",)
ALL = ("add", "change", "delete", "view")

# Model permissions per role (Django "<action>_<model>" codenames in the governance app). Object-level
# narrowing comes on top of these; workflow rules (who may submit, sign off, ...) on top of both.
# Immutable records get no change/delete permission for anyone: the models refuse it anyway.
ROLE_PERMISSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    SUBMITTER: {
        "organisation": VIEW, "membership": VIEW,
        "aimodel": ("add", "change", "view"), "modelversion": ("add", "change", "view"),
        "auditcase": ("add", "change", "view"),
        "proberun": VIEW, "evidence": VIEW, "evidenceartifact": VIEW, "signoff": VIEW, "report": VIEW,
        "auditevent": VIEW, "acceptancecriterion": VIEW, "findingacknowledgement": VIEW,
        "providerdocument": ("add", "view"), "findingcomment": ("add", "view"),
        "webhookendpoint": ("add", "view"), "webhookdelivery": VIEW,
    },
    REVIEWER: {
        "organisation": VIEW, "membership": VIEW, "aimodel": VIEW, "modelversion": VIEW,
        "auditcase": ("view", "sign_off"),
        "proberun": VIEW, "evidence": VIEW, "evidenceartifact": VIEW,
        "signoff": ("add", "view"), "report": ("add", "view"), "auditevent": VIEW,
        "acceptancecriterion": VIEW, "findingacknowledgement": VIEW, "providerdocument": VIEW,
        "findingcomment": ("add", "view"),
    },
    AUDITOR: {
        "organisation": VIEW, "membership": VIEW, "aimodel": VIEW, "modelversion": VIEW, "auditcase": VIEW,
        "proberun": VIEW, "evidence": VIEW, "evidenceartifact": VIEW, "signoff": VIEW, "report": VIEW,
        "auditevent": VIEW, "auditchainhead": VIEW,
        "acceptancecriterion": VIEW, "findingacknowledgement": VIEW, "providerdocument": VIEW,
        "findingcomment": VIEW, "webhookendpoint": VIEW, "webhookdelivery": VIEW,
    },
    ADMIN: {
        "organisation": ALL, "membership": ALL, "aimodel": ALL, "modelversion": ALL,
        "auditcase": ALL + ("sign_off",), "proberun": ALL,
        "evidence": VIEW, "evidenceartifact": VIEW, "signoff": VIEW, "report": ("add", "view"),
        "auditevent": VIEW, "auditchainhead": VIEW,
        "acceptancecriterion": ("change", "view"), "findingacknowledgement": VIEW, "providerdocument": ("add", "view"),
        "findingcomment": ("add", "view"), "webhookendpoint": ALL, "webhookdelivery": VIEW,
    },
}
# Admins also manage accounts (app label "auth").
ADMIN_AUTH_PERMISSIONS = ("add_user", "change_user", "view_user", "add_group", "change_group", "view_group")


# --------------------------------------------------------------------------------------------------
# Roles of a user
# --------------------------------------------------------------------------------------------------


def roles_of(user) -> frozenset[str]:
    """The Loupe roles a user holds (superusers are admins). Cached on the user object per request."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return frozenset()
    cached = getattr(user, "_loupe_roles", None)
    if cached is None:
        names = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        if user.is_superuser:
            names.add(ADMIN)
        cached = frozenset(names)
        user._loupe_roles = cached
    return cached


def has_role(user, role: str) -> bool:
    return role in roles_of(user)


def is_admin(user) -> bool:
    return ADMIN in roles_of(user)


def is_auditor(user) -> bool:
    return AUDITOR in roles_of(user)


def organisation_of(user):
    """The user's :class:`~governance.models.Organisation`, or ``None``."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    from governance.models import Membership

    membership = Membership.objects.filter(user=user).select_related("organisation").first()
    return membership.organisation if membership else None


def organisation_id_of(user) -> int | None:
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    cached = getattr(user, "_loupe_org_id", False)
    if cached is False:
        from governance.models import Membership

        cached = Membership.objects.filter(user=user).values_list("organisation_id", flat=True).first()
        user._loupe_org_id = cached
    return cached


# --------------------------------------------------------------------------------------------------
# Queryset narrowing
# --------------------------------------------------------------------------------------------------


def scope_of(model: type[Model]) -> Scope | None:
    """How ``model`` is narrowed, as the model declares it (``access_scope``). Models without a
    scope are visible to admins and auditors only."""
    return getattr(model, "access_scope", None)


def _lookup(path: str, suffix: str) -> str:
    return f"{path}__{suffix}" if path else suffix


def narrow(qs: QS, user: Any) -> QS:
    """``qs`` restricted to the rows ``user`` may see (see the module docstring for the rules)."""
    roles = roles_of(user)
    if not roles:
        return qs.none()
    if ADMIN in roles or AUDITOR in roles:
        return qs
    scope = scope_of(qs.model)
    if scope is None:
        return qs.none()
    from governance.models import AuditCase

    allowed = Q(pk__in=[])
    org_id = organisation_id_of(user)
    if SUBMITTER in roles and org_id is not None and scope.org is not None:
        allowed |= Q(**{scope.org: org_id}) if scope.org else Q(pk=org_id)
    if REVIEWER in roles:
        assigned = AuditCase.objects.filter(reviewers=user)
        if scope.case is not None:
            allowed |= Q(**{f"{scope.case}__in": assigned.values("pk")})
        if scope.via_cases is not None:
            allowed |= Q(pk__in=assigned.values(_lookup(scope.via_cases, "pk") if scope.via_cases else "pk"))
    if scope.own_user is not None:
        allowed |= Q(**{scope.own_user: user.pk})
    return qs.filter(allowed)


# --------------------------------------------------------------------------------------------------
# Write checks (object level)
# --------------------------------------------------------------------------------------------------


def can_create_for(user, organisation) -> bool:
    """May ``user`` register models (and versions and cases) for ``organisation``?"""
    if is_admin(user):
        return True
    return has_role(user, SUBMITTER) and organisation is not None and organisation_id_of(user) == organisation.pk


def can_edit(user, obj) -> bool:
    """May ``user`` change ``obj`` (an organisation's model, version or case)?

    Admins may; submitters may change their own organisation's models and versions, and their cases
    while the case is editable (draft or changes requested). Reviewers and auditors never edit;
    sign-offs and transitions go through :mod:`governance.workflow`, which has its own rules.
    """
    from governance import models as m

    if isinstance(obj, m.AuditCase) and not obj.is_editable:
        return False
    if is_admin(user):
        return isinstance(obj, (m.Organisation, m.Membership, m.AIModel, m.ModelVersion, m.AuditCase))
    if not has_role(user, SUBMITTER):
        return False
    org_id = organisation_id_of(user)
    if isinstance(obj, m.AIModel):
        return obj.organisation_id == org_id
    if isinstance(obj, m.ModelVersion):
        return obj.ai_model.organisation_id == org_id
    if isinstance(obj, m.AuditCase):
        return obj.model_version.ai_model.organisation_id == org_id
    return False


# --------------------------------------------------------------------------------------------------
# Groups and their permissions
# --------------------------------------------------------------------------------------------------


def _codename(action: str, model_name: str) -> str:
    # Custom permissions are named "<action>_<model>" too (e.g. sign_off_auditcase).
    return f"{action}_{model_name}"


def sync_roles(apps=None, verbosity: int = 0) -> None:
    """Create the four groups and set exactly their permissions from :data:`ROLE_PERMISSIONS`.

    Idempotent. Called by migration ``0003_roles`` (with the historical app registry) and after
    every ``migrate`` (``post_migrate``), so models added later get their permissions too.
    """
    from django.apps import apps as global_apps
    from django.contrib.auth.management import create_permissions

    apps = apps or global_apps
    for label in ("auth", "governance"):
        config = apps.get_app_config(label)
        if getattr(config, "models_module", None) is None:  # historical app configs in migrations
            config.models_module = True
        create_permissions(config, apps=apps, verbosity=verbosity)

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, table in ROLE_PERMISSIONS.items():
        wanted = Q(pk__in=[])
        for model_name, actions in table.items():
            codenames = [_codename(action, model_name) for action in actions]
            wanted |= Q(content_type__app_label="governance", content_type__model=model_name,
                        codename__in=codenames)
        if role == ADMIN:
            wanted |= Q(content_type__app_label="auth", codename__in=ADMIN_AUTH_PERMISSIONS)
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.set(Permission.objects.filter(wanted))


def sync_roles_after_migrate(sender, app_config=None, using="default", apps=None, verbosity=0, **kwargs) -> None:
    """``post_migrate`` receiver (connected in ``GovernanceConfig.ready``)."""
    if apps is None:
        # ``flush`` (and so every transactional test's teardown) emits post_migrate without ``apps``;
        # the groups must come back after it too.
        from django.apps import apps as global_apps

        apps = global_apps
    try:
        apps.get_model("auth", "Group")
        apps.get_model("governance", "AuditCase")
    except LookupError:  # migrating backwards below our tables
        return
    sync_roles(apps, verbosity=verbosity)

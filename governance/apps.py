from typing import Any, TypeVar

from django.apps import AppConfig
from django.db.models import QuerySet
from django.db.models.signals import post_migrate

QS = TypeVar("QS", bound=QuerySet[Any])


class GovernanceConfig(AppConfig):
    name = "governance"
    verbose_name = "Loupe governance"
    default_auto_field = "django.db.models.BigAutoField"

    def narrow(self, queryset: QS, user: Any) -> QS:
        """``queryset`` narrowed to what ``user`` may see (``GovernanceQuerySet.visible_to``)."""
        from governance.access import narrow

        return narrow(queryset, user)

    def ready(self) -> None:
        from governance.access import sync_roles_after_migrate

        # Keep the role groups' permissions in step with the models after every migrate.
        post_migrate.connect(sync_roles_after_migrate, sender=self, dispatch_uid="loupe-sync-roles")
        # The pipeline's signal receivers (revoking a withdrawn case's tasks).
        # System checks of the task settings (visibility timeout vs. hard time limit).
        from governance import (
            checks,  # noqa: F401
            notifications,  # noqa: F401  (e-mail and webhooks on state changes)
            pipeline,  # noqa: F401
        )

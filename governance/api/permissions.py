"""API permissions: who may call which action. *What* a user may see is decided elsewhere, once:
every viewset starts from ``Model.objects.visible_to(user)`` (:mod:`governance.access`), so an object
outside a user's scope is a 404, never a 403 that leaks its existence.

Here only the role per action is checked (NetBox style: thin views, central rules). Object-level
write rules (may this submitter edit this case now?) come from :func:`governance.access.can_edit`;
workflow rules (segregation of duties, legal transitions) from :mod:`governance.workflow`.
"""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from governance import access

READ_ACTIONS = frozenset({"list", "retrieve", "metadata", "download", "model_card"})


class RolePermission(BasePermission):
    """``view.action_roles``: ``{action: set of roles}``; reads need any Loupe role.

    A user without a role may authenticate but sees nothing and may do nothing (403).
    """

    message = "You do not have a Loupe role that allows this action."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not user or not user.is_authenticated:
            return False
        roles = access.roles_of(user)
        if not roles:
            self.message = "Your account has no Loupe role (submitter, reviewer, auditor or admin); ask an admin."
            return False
        if view.action is None:
            return True  # a method this endpoint doesn't have: let DRF answer 405
        if request.method in SAFE_METHODS and view.action in READ_ACTIONS:
            return True
        allowed = getattr(view, "action_roles", {}).get(view.action)
        if allowed is None:
            self.message = f"The action {view.action!r} is not available through the API."
            return False
        if roles & allowed:
            return True
        self.message = (f"This action needs one of the roles {', '.join(sorted(allowed))}; "
                        f"you have {', '.join(sorted(roles))}.")
        return False


class CanEditObject(BasePermission):
    """Updates and deletes need :func:`governance.access.can_edit` on the object."""

    message = "You may not change this object (it belongs to another organisation or is no longer editable)."

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in SAFE_METHODS or view.action not in {"update", "partial_update", "destroy"}:
            return True
        return access.can_edit(request.user, obj)

"""``manage.py create_user NAME --role ROLE [--organisation SLUG]``: an account that can log in.

The role is one of Loupe's groups (:data:`governance.access.ROLES`). A submitter belongs to a provider
organisation (created from the slug if missing); reviewers, auditors and admins get staff status so
they can open the review workspace in the admin. The password comes from ``LOUPE_NEW_PASSWORD`` or
is generated and printed once: Loupe never stores or prints it again.
"""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils.text import slugify

from governance import access
from governance.models import Membership, Organisation

STAFF_ROLES = frozenset({access.REVIEWER, access.AUDITOR, access.ADMIN})


def new_password() -> str:
    """A random password that passes Django's validators (URL-safe, 16 characters)."""
    return secrets.token_urlsafe(12)


class Command(BaseCommand):
    help = "Create a user with a Loupe role (and a provider organisation for submitters)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=access.ROLES)
        parser.add_argument("--organisation", metavar="SLUG",
                            help="provider organisation (created if missing); required for submitters")
        parser.add_argument("--email", default="", help="e-mail address (for notifications)")

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        username, role, slug = options["username"], options["role"], options["organisation"]
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            raise CommandError(f"user {username!r} already exists; change a password with "
                               f"`manage.py changepassword {username}`")
        if role == access.SUBMITTER and not slug:
            raise CommandError("a submitter belongs to a provider organisation: pass --organisation SLUG")
        if slug and slugify(slug) != slug:
            raise CommandError(f"{slug!r} is not a slug (lower-case letters, digits and hyphens)")
        supplied = os.environ.get("LOUPE_NEW_PASSWORD", "")
        password = supplied or new_password()
        user = User(username=username, email=options["email"], is_staff=role in STAFF_ROLES)
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError("LOUPE_NEW_PASSWORD is refused: " + " ".join(exc.messages)) from None
        user.set_password(password)
        user.save()
        user.groups.add(Group.objects.get(name=role))
        created_org = False
        if slug:
            organisation, created_org = Organisation.objects.get_or_create(
                slug=slug, defaults={"name": slug.replace("-", " ").title()})
            Membership.objects.create(user=user, organisation=organisation)
        where = f" in organisation {slug!r}" + (" (created)" if created_org else "") if slug else ""
        self.stdout.write(f"created {role} {username!r}{where}")
        if not supplied:
            self.stdout.write(f"password for {username}: {password}  (shown once; store it now)")

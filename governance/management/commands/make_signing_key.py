"""Create development signing keys: ``manage.py make_signing_key [--name NAME --slug SLUG]``.

Writes a development CA (``dev-ca-*.pem``, self-signed) and a signer key + certificate issued by it
into ``LOUPE_SIGNING_DIR``. Without arguments it creates the service's issuer key at the paths the
default settings use, so reports are signed at issue (its certificate carries the Loupe issuer
policy). For a reviewer's countersignatures: ``--name "Rita Reviewer" --slug rita --username rita``
(a reviewer certificate names the Loupe username it belongs to; ``--username`` defaults to the slug).
Certificates carry the document-signing extended key usage. Never use these in production.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Generate a development CA and a signer key + certificate (NOT for production)."

    def add_arguments(self, parser):
        parser.add_argument("--dir", default=None, help="output directory (default: LOUPE_SIGNING_DIR)")
        parser.add_argument("--name", default="Loupe report issuer (development)")
        parser.add_argument("--slug", default="issuer", help="file prefix: <slug>-key.pem, <slug>-cert.pem")
        parser.add_argument("--role", choices=["issuer", "reviewer"], default=None,
                            help="issuer (default for --slug issuer) or reviewer (default otherwise)")
        parser.add_argument("--username", default=None, help="reviewer's Loupe username (default: the slug)")
        parser.add_argument("--force", action="store_true", help="replace an existing key with this prefix")
        parser.add_argument("--passphrase-env", help="encrypt the key with the passphrase in this env variable")

    def handle(self, *args, **options):
        from governance.reports.signing import make_development_signer

        directory = Path(options["dir"] or settings.LOUPE_SIGNING_DIR)
        slug = options["slug"]
        if not slug.replace("-", "").replace("_", "").isalnum():
            raise CommandError("--slug may contain letters, digits, '-' and '_' only")
        if (directory / f"{slug}-key.pem").exists() and not options["force"]:
            raise CommandError(f"{directory / (slug + '-key.pem')} exists; pass --force to replace it")
        passphrase = None
        if options["passphrase_env"]:
            value = os.environ.get(options["passphrase_env"])
            if not value:
                raise CommandError(f"environment variable {options['passphrase_env']} is empty")
            passphrase = value.encode()
        role = options["role"] or ("issuer" if slug == "issuer" else "reviewer")
        username = options["username"] or (slug if role == "reviewer" else None)
        key, cert = make_development_signer(directory, options["name"], slug=slug, passphrase=passphrase,
                                            role=role, username=username)
        self.stdout.write(f"key:  {key}\ncert: {cert}\nCA:   {directory / 'dev-ca-cert.pem'} "
                          "(trust root for verify_report)\nDevelopment only: do not use in production.")

"""Countersign a report PDF: ``manage.py sign_report IN.pdf OUT.pdf --key K --cert C --role reviewer``.

Adds a PAdES signature as an incremental update, so the issuer's and earlier reviewers'
signatures stay valid. The input must already verify (signatures and manifest) unless
``--skip-check`` is given: nobody should sign a report that has been altered.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Add a reviewer's or approver's PAdES signature to a report without invalidating earlier ones."

    def add_arguments(self, parser):
        parser.add_argument("input")
        parser.add_argument("output")
        parser.add_argument("--key", required=True)
        parser.add_argument("--cert", required=True)
        parser.add_argument("--role", required=True, help="e.g. reviewer, approver")
        parser.add_argument("--reason", default=None)
        parser.add_argument("--skip-check", action="store_true")

    def handle(self, *args, **options):
        from governance.reports import manifest as mf
        from governance.reports import signing

        logging.getLogger("pyhanko").setLevel(logging.CRITICAL)
        pdf = Path(options["input"]).read_bytes()
        if not options["skip_check"]:
            problems = [p for c in signing.verify_signatures(pdf) for p in c.problems]
            try:
                problems += mf.check_against_database(mf.extract_from_pdf(pdf))[0]
            except mf.ManifestError as exc:
                problems.append(str(exc))
            if problems:
                raise CommandError("refusing to sign a report that does not verify: " + "; ".join(problems))
        try:
            signer = signing.load_signer(options["key"], options["cert"])
        except signing.SigningError as exc:
            raise CommandError(str(exc)) from exc
        signed = signing.sign_pdf(pdf, signer, role=options["role"],
                                  reason=options["reason"] or f"Loupe report {options['role']} sign-off")
        Path(options["output"]).write_bytes(signed)
        self.stdout.write(f"signed as {options['role']}: {options['output']}")

"""Verify a report PDF: ``manage.py verify_report FILE``.

Checks that the file is what Loupe issued (revision 1 hashes to the stored report and its
``report.issued`` event; the issuer signature uses the issuer's certificate), that every later
signature is a recorded countersignature of a reviewer who approved the case and that later
revisions added nothing but signatures, every signature's chain to ``LOUPE_SIGNING_TRUST_ROOTS``,
and that the embedded manifest matches the database, evidence files and audit log
(:mod:`governance.reports.verification`). Names each signer and role. Exits 0 only if all pass;
otherwise prints each reason and exits 1.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Check a report's signatures and that its embedded manifest matches the stored evidence."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--trust-root", action="append", default=[],
                            help="trust this CA certificate (PEM/DER) instead of LOUPE_SIGNING_TRUST_ROOTS")
        parser.add_argument("--allow-unsigned", action="store_true",
                            help="accept a PDF with no signature if it is byte-identical to a stored report")

    def handle(self, *args, **options):
        from governance.reports import signing
        from governance.reports.verification import verify_report_pdf

        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        roots = (signing.load_certificates(options["trust_root"]) if options["trust_root"] else signing.trust_roots())
        result = verify_report_pdf(path.read_bytes(), roots, allow_unsigned=options["allow_unsigned"])
        for line in result.lines:
            self.stdout.write(line)
        for note in result.notes:
            self.stdout.write(f"note: {note}")
        if result.problems:
            for problem in result.problems:
                self.stderr.write(f"FAIL: {problem}")
            raise CommandError(f"{path}: report verification failed ({len(result.problems)} problem(s))", returncode=1)
        count = len(result.pdf.signatures) if result.pdf else 0
        self.stdout.write(self.style.SUCCESS(f"{path}: all {count} signature(s) and the manifest verify"))

"""Verify a report PDF: ``manage.py verify_report FILE``.

Checks every PAdES signature (integrity, validity, chain to ``LOUPE_SIGNING_TRUST_ROOTS``, nothing
but further signatures added after it) and that the embedded manifest matches the report version
stored in the database, the evidence records and the evidence files. Exits 0 only if all pass;
otherwise prints each reason and exits 1.
"""

from __future__ import annotations

import logging
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
        import hashlib

        from governance.models import Report
        from governance.reports import manifest as mf
        from governance.reports import signing

        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        pdf = path.read_bytes()
        problems: list[str] = []
        # pyHanko logs a traceback for every untrusted chain; the reasons are reported below instead.
        logging.getLogger("pyhanko").setLevel(logging.CRITICAL)
        logging.getLogger("pyhanko_certvalidator").setLevel(logging.CRITICAL)

        roots = (signing.load_certificates(options["trust_root"]) if options["trust_root"] else signing.trust_roots())
        try:
            checks = signing.verify_signatures(pdf, roots)
        except Exception as exc:  # a damaged file can fail anywhere inside pyHanko's parser
            checks = []
            problems.append(f"signatures: the PDF could not be parsed ({type(exc).__name__}: {exc})")
        sha = hashlib.sha256(pdf).hexdigest()
        stored = Report.objects.filter(sha256=sha).first()
        if stored is not None and checks:
            self.stdout.write(f"note: byte-identical to stored report v{stored.version} of case #{stored.case_id}")
        if not checks and not problems:
            if options["allow_unsigned"] and stored is not None:
                self.stdout.write(f"unsigned, byte-identical to stored report v{stored.version} of case #{stored.case_id}")
            elif options["allow_unsigned"]:
                problems.append("unsigned, and not byte-identical to any stored report")
            else:
                problems.append("the PDF carries no signature (use --allow-unsigned to check an unsigned issue)")
        if not roots and checks:
            problems.append("no trust root configured (LOUPE_SIGNING_TRUST_ROOTS or --trust-root)")
        for check in checks:
            status = "OK" if check.ok else "FAILED"
            self.stdout.write(f"signature {check.field_name}: {status} · {check.signer} · signed {check.signed_at}")
            problems += [f"signature {check.field_name}: {p}" for p in check.problems]

        try:
            manifest = mf.extract_from_pdf(pdf)
        except mf.ManifestError as exc:
            problems.append(f"manifest: {exc}")
        else:
            ref = manifest["report"]
            self.stdout.write(f"manifest: case #{ref['case_id']} report v{ref['version']}, "
                              f"SHA-256 {mf.manifest_sha256(manifest)}")
            db_problems, notes = mf.check_against_database(manifest)
            problems += [f"manifest: {p}" for p in db_problems]
            anchored = manifest.get("audit_log")
            if anchored and not any(p.startswith("audit log:") for p in db_problems):
                self.stdout.write(f"audit log: unchanged up to the head anchored at issue (seq {anchored['seq']}, "
                                  f"{str(anchored['row_hash'])[:16]}...)")
            for note in notes:
                self.stdout.write(f"note: {note}")

        if problems:
            for problem in problems:
                self.stderr.write(f"FAIL: {problem}")
            raise CommandError(f"{path}: report verification failed ({len(problems)} problem(s))", returncode=1)
        self.stdout.write(self.style.SUCCESS(f"{path}: all {len(checks)} signature(s) and the manifest verify"))

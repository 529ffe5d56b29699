"""Countersign a report PDF: ``manage.py sign_report IN.pdf OUT.pdf --key K --cert C [--record USERNAME]``.

Adds a PAdES signature as an incremental update (an invisible signature field and nothing else), so
the issuer's and earlier reviewers' signatures stay valid. This is what a reviewer runs with their
own key; the signed file is then handed to Loupe (API ``POST /api/reports/{id}/countersign/``, the
review workspace, or ``--record USERNAME`` here), which stores it as that reviewer's countersignature.
The input must already verify unless ``--skip-check`` is given: nobody should sign an altered report.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Add a reviewer's PAdES countersignature to a report without invalidating earlier ones."

    def add_arguments(self, parser):
        parser.add_argument("input")
        parser.add_argument("output")
        parser.add_argument("--key", required=True)
        parser.add_argument("--cert", required=True)
        parser.add_argument("--role", default="reviewer", help="signature field name part (default reviewer)")
        parser.add_argument("--reason", default=None)
        parser.add_argument("--skip-check", action="store_true")
        parser.add_argument("--record", metavar="USERNAME",
                            help="store the result as this reviewer's countersignature of the report")

    def handle(self, *args, **options):
        from governance.reports import signing
        from governance.reports.verification import verify_report_pdf

        pdf = Path(options["input"]).read_bytes()
        if not options["skip_check"]:
            result = verify_report_pdf(pdf)
            if result.problems:
                raise CommandError("refusing to sign a report that does not verify: " + "; ".join(result.problems))
        try:
            signer = signing.load_signer(options["key"], options["cert"])
        except signing.SigningError as exc:
            raise CommandError(str(exc)) from exc
        signed = signing.sign_pdf(pdf, signer, role=options["role"],
                                  reason=options["reason"] or f"Loupe report {options['role']} countersignature")
        Path(options["output"]).write_bytes(signed)
        self.stdout.write(f"signed as {options['role']}: {options['output']}")
        if options["record"]:
            self._record(signed, options["record"])

    def _record(self, signed: bytes, username: str) -> None:
        from django.contrib.auth import get_user_model

        from governance.models import Report
        from governance.reports import manifest as mf
        from governance.reports.countersign import countersign
        from governance.workflow import WorkflowError

        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"user {username!r} does not exist")
        ref = mf.extract_from_pdf(signed)["report"]
        report = Report.objects.get(case_id=ref["case_id"], version=ref["version"])
        try:
            row = countersign(report, user, signed)
        except WorkflowError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"recorded countersignature {row.sequence} of report v{report.version} by {username}")

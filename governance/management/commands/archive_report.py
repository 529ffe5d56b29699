"""Add PAdES B-LTA archival data to a report: ``manage.py archive_report IN.pdf OUT.pdf``.

Appends the validation data of every signature (the document security store) and a document
timestamp from ``LOUPE_TSA_URL`` in one incremental revision, after checking that the input
verifies. Technical documentation is kept for ten years (EU AI Act Art. 18): run it on the archived
copy, and again on its output before the newest timestamp's certificate expires.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Add the validation data and an archival document timestamp (PAdES B-LTA) to a report PDF."

    def add_arguments(self, parser):
        parser.add_argument("input")
        parser.add_argument("output")

    def handle(self, *args, **options):
        from governance.reports import signing
        from governance.reports.verification import verify_report_pdf

        pdf = Path(options["input"]).read_bytes()
        result = verify_report_pdf(pdf)
        if result.problems:
            raise CommandError("refusing to archive a report that does not verify: " + "; ".join(result.problems))
        try:
            archived = signing.add_archival_timestamp(pdf)
        except signing.SigningError as exc:
            raise CommandError(str(exc)) from exc
        Path(options["output"]).write_bytes(archived)
        self.stdout.write(f"archival timestamp added: {options['output']}")

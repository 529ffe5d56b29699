"""Write a case's export bundle: ``manage.py export_case CASE_ID [--output FILE.zip]``."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from governance.models import AuditCase


class Command(BaseCommand):
    help = "Zip the latest report, its manifest, every evidence artifact, the model card and the audit-log excerpt."

    def add_arguments(self, parser):
        parser.add_argument("case_id", type=int)
        parser.add_argument("--output", help="zip path (default: loupe-case-<id>-export.zip)")

    def handle(self, *args, **options):
        from governance.reports import export_case_zip
        from governance.reports.export import bundle_filename

        case = AuditCase.objects.filter(pk=options["case_id"]).first()
        if case is None:
            raise CommandError(f"audit case #{options['case_id']} does not exist")
        data = export_case_zip(case)
        output = Path(options["output"] or bundle_filename(case))
        output.write_bytes(data)
        self.stdout.write(f"{output}: {len(data)} bytes")

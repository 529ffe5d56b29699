"""Issue the next report version of an audit case: ``manage.py generate_report CASE_ID --author USER``."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from governance.models import AuditCase


class Command(BaseCommand):
    help = "Render, sign (when a signing key is configured) and store the next report version of a case."

    def add_arguments(self, parser):
        parser.add_argument("case_id", type=int)
        parser.add_argument("--author", required=True, help="username recorded as the report's author")
        parser.add_argument("--no-sign", action="store_true", help="issue unsigned even if a key is configured")
        parser.add_argument("--output", help="also write the PDF to this path")

    def handle(self, *args, **options):
        from governance.evidence import DigestMismatch
        from governance.reports import generate_report

        case = AuditCase.objects.filter(pk=options["case_id"]).first()
        if case is None:
            raise CommandError(f"audit case #{options['case_id']} does not exist")
        author = get_user_model().objects.filter(username=options["author"]).first()
        if author is None:
            raise CommandError(f"user {options['author']!r} does not exist")
        with tqdm(total=1, desc=f"report for case #{case.pk}", disable=options["verbosity"] < 1) as bar:
            try:
                report = generate_report(case, author=author, sign=not options["no_sign"])
            except DigestMismatch as exc:
                raise CommandError(str(exc)) from exc
            bar.update(1)
        if options["output"]:
            with report.pdf.open("rb") as handle, open(options["output"], "wb") as out:
                out.write(handle.read())
        self.stdout.write(f"report v{report.version} of case #{case.pk}: {report.pdf.name}\n"
                          f"sha256 {report.sha256}\n"
                          + "".join(f"  - {c['detail']}\n" for c in report.changelog))

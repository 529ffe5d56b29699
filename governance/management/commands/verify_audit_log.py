"""``manage.py verify_audit_log``: check the audit log's hash chain, and every evidence, sign-off,
report and countersignature row against the content digest the log recorded for it; exit 1 naming
each bad row."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from governance import audit_log
from governance.models import AuditEvent


class Command(BaseCommand):
    help = ("Verify the hash-chained audit log: detects modified, deleted, inserted and reordered rows "
            "and names them. Exits non-zero when the log does not verify.")

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, **options):
        from governance.evidence import ledger_problems

        problems = audit_log.verify(progress=not options["json"])
        rows = ledger_problems()
        head = audit_log.head()
        count = AuditEvent.objects.count()
        if options["json"]:
            self.stdout.write(json.dumps({
                "ok": not problems and not rows, "rows": count,
                "head": {"seq": head.seq, "row_hash": head.row_hash} if head else None,
                "problems": [{"kind": p.kind, "seq": p.seq, "id": p.row_id, "message": p.message}
                             for p in problems],
                "rows_differing_from_the_log": rows,
            }, indent=2))
        else:
            for problem in problems:
                self.stderr.write(f"audit log: {problem}")
            for difference in rows:
                self.stderr.write(f"record: {difference}")
        if problems or rows:
            raise CommandError(f"audit log does NOT verify: {len(problems)} problem(s) in {count} rows, "
                               f"{len(rows)} record(s) differing from their logged digest")
        if not options["json"]:
            head_text = f"head seq {head.seq} {head.row_hash}" if head else "empty"
            self.stdout.write(self.style.SUCCESS(f"audit log OK: {count} rows, {head_text}"))

"""``manage.py run_audit CASE_ID [--wait]``: submit (if needed) and start a case's probe runs."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from governance import pipeline, workflow
from governance.console import RunBars
from governance.models import AuditCase


class Command(BaseCommand):
    help = "Start the probe runs of an audit case (submitting a draft first) and optionally wait for them."

    def add_arguments(self, parser) -> None:
        parser.add_argument("case_id", type=int)
        parser.add_argument("--by", required=True, help="username acting (the case's owner or an admin)")
        parser.add_argument("--wait", action="store_true", help="show progress until the evidence is ready")
        parser.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")

    def handle(self, *args, **options) -> None:
        try:
            case = AuditCase.objects.get(pk=options["case_id"])
            user = get_user_model().objects.get(username=options["by"])
        except (AuditCase.DoesNotExist, get_user_model().DoesNotExist) as exc:
            raise CommandError(str(exc)) from exc
        try:
            if case.state in (AuditCase.State.DRAFT, AuditCase.State.CHANGES_REQUESTED):
                workflow.submit(case, by=user)
            with RunBars(case.pk, self.stderr._out) as bars:
                run_ids = pipeline.start_case(case.pk, by=user)
                if options["wait"] and not pipeline.broker_is_eager():
                    case = bars.poll_until_done(timeout=options["timeout"])
        except (workflow.WorkflowError, pipeline.PipelineError, pipeline.BrokerUnavailable) as exc:
            raise CommandError(str(exc)) from exc
        case.refresh_from_db()
        progress = pipeline.case_progress(case)
        self.stdout.write(f"case #{case.pk}: {case.state}; {len(run_ids)} run(s) started; "
                          f"{progress['counts']['succeeded']} succeeded, {progress['counts']['failed']} failed"
                          + (" (partial evidence)" if progress["partial"] and case.state != AuditCase.State.RUNNING
                             else ""))
        for failure in progress["failed"]:
            self.stdout.write(f"  run #{failure['run']} {failure['kind']} failed: {failure['error']}")

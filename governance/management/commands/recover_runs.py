"""``manage.py recover_runs``: the sweeper on demand (governance/pipeline.py ``recover_runs``)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand

from governance import pipeline


class Command(BaseCommand):
    help = ("Re-dispatch probe runs nobody works on (a lapsed lease: the worker died; queued long after "
            "dispatch: the broker lost the message), fail runs that lost their worker too often, cancel "
            "runs of cases no longer running, and aggregate cases whose runs all finished. Idempotent: "
            "the same sweep Celery beat runs periodically.")

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print what was done as JSON")

    def handle(self, *args, **options):
        if not pipeline.broker_is_eager():
            pipeline.check_broker()
        done = pipeline.recover_runs()
        if options["json"]:
            self.stdout.write(json.dumps(done, indent=2, sort_keys=True))
            return
        labels = {"requeued": "worker lost, dispatched again", "redispatched": "message lost, dispatched again",
                  "failed": "failed (worker lost too often)", "cancelled": "cancelled (case not running)",
                  "aggregated": "cases aggregated"}
        if not any(done.values()):
            self.stdout.write(self.style.SUCCESS("nothing to recover"))
        for key, ids in done.items():
            if ids:
                self.stdout.write(f"{labels[key]}: {', '.join(f'#{i}' for i in ids)}")

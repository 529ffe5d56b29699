"""Django system checks for the task settings (``manage.py check``, ``runserver``, ``migrate``; a
Celery worker refuses to start on them, see workers/celery.py): settings that would make the
pipeline run one probe twice.

- ``loupe.E001``: on Redis (and SQS) an unacknowledged message is delivered again once the broker's
  visibility timeout passes; at or below the hard task time limit, a healthy long probe would be
  handed to a second worker while the first still runs it.
- ``loupe.E002``: a run lease that is not positive would lapse before the first heartbeat.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, register

VISIBILITY_TIMEOUT_TRANSPORTS = ("redis://", "rediss://", "sqs://", "redis+socket://")


@register(Tags.compatibility, deploy=False)
def check_task_timeouts(app_configs=None, **kwargs) -> list[Error]:
    errors: list[Error] = []
    broker = getattr(settings, "CELERY_BROKER_URL", "") or ""
    hard_limit = getattr(settings, "CELERY_TASK_TIME_LIMIT", None)
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    visibility = options.get("visibility_timeout")
    if broker.startswith(VISIBILITY_TIMEOUT_TRANSPORTS) and hard_limit and visibility is not None \
            and visibility <= hard_limit:
        errors.append(Error(
            f"the broker visibility timeout ({visibility} s) is at or below the hard task time limit "
            f"({hard_limit} s): a probe still running when it passes is delivered to a second worker",
            hint="set LOUPE_BROKER_VISIBILITY_TIMEOUT above LOUPE_TASK_TIME_LIMIT (the default adds 600 s)",
            id="loupe.E001"))
    lease = float(getattr(settings, "LOUPE_RUN_LEASE_SECONDS", 60))
    if lease <= 0:
        errors.append(Error(f"LOUPE_RUN_LEASE_SECONDS must be positive, not {lease:g}",
                            hint="the heartbeat renews a lease every third of it; 60 s is the default",
                            id="loupe.E002"))
    return errors

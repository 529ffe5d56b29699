"""Loupe's governance service: inventory, audit cases, evidence, review and reports."""

# Load the Celery app whenever Django starts so that ``shared_task``s bind to it
# (the pattern from Celery's "First steps with Django").
from workers.celery import app as celery_app

__all__ = ["celery_app"]

"""Celery workers. ``workers.probes`` is a plain PyTorch library that never imports Django;
``workers.tasks`` is the only bridge between the database and the probes.

The Celery app is deliberately not imported here, so that ``import workers.probes``
pulls in neither Celery nor Django.
"""

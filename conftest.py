"""Root pytest configuration: registers the real-stack harness (PostgreSQL + Redis + real Celery
worker processes when ``LOUPE_REAL_STACK=1``; in-process tasks otherwise). The shared actors and
cases are in ``tests/conftest.py``."""

pytest_plugins = ["tests.realstack"]

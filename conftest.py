"""Root pytest configuration: registers the real-stack harness (PostgreSQL + Redis + real Celery
worker processes when ``LOUPE_REAL_STACK=1``; in-process tasks otherwise) and the fixture plugins
shared across test modules (signing keys and issued reports, the browser page). The shared actors and
cases are in ``tests/conftest.py``; test modules import helpers, never fixtures or each other."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.realstack", "tests.signing_fixtures", "tests.browser_fixtures"]


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """On SQLite, test in a database file, as the embedded default runs, not in memory.

    pytest-django's default in-memory database is opened in shared-cache mode so that threads see
    one database; shared cache locks whole tables and answers a reader that meets another thread's
    write (the local worker's, a live server's) with "table is locked" at once, ignoring the busy
    timeout. A file in WAL mode lets readers go on while one thread writes, which is what the
    embedded default gives its users.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("sqlite") / "test.sqlite3")

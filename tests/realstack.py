"""The real-stack test harness: PostgreSQL, Redis and real Celery worker processes.

The default test run uses SQLite and executes tasks in-process (eagerly). With ``LOUPE_REAL_STACK=1``
and ``DATABASE_URL=postgres://...``, ``CELERY_BROKER_URL=redis://...`` the same suite runs on
PostgreSQL, and tests that ask for the ``celery_worker`` fixture talk to a real
``celery -A workers.celery worker -Q gpu,cpu,reports -c 1 --pool=prefork`` subprocess through Redis
(or RabbitMQ: ``make test-real-rabbitmq`` runs the ``realworker`` tests with ``CELERY_BROKER_URL=amqp://...``).

How the worker sees the test's rows: pytest-django creates the test database ``test_<name>``; the
worker is started *after* that, with ``DATABASE_URL`` pointing at it and ``LOUPE_STORAGE_ROOT`` at the
test's media root. Tests that need the worker must commit their rows, so mark them
``@pytest.mark.django_db(transaction=True)``. In eager mode the same tests run the task in-process when
the transaction commits, so one test body covers both modes: enqueue, then ``wait_until(...)``.

Tests that don't ask for a worker keep executing tasks eagerly even in real-stack mode (see
``_tasks_run_eagerly_without_a_worker``), so nothing they enqueue lingers in Redis.

Reusable pieces for reliability tests (SIGKILL, Redis restarts, broker down):

- ``real_stack`` (session fixture) -> :class:`RealStack`: ``ensure_worker()``, ``start_worker(...)``,
  ``stop_workers()``; each :class:`WorkerProcess` has ``ping()``, ``stop()``, ``kill()`` (SIGKILL the
  whole process group) and ``kill_pool_children()`` (SIGKILL only the prefork children, i.e. the
  process executing the task);
- :class:`RedisServer`: a private, throw-away ``redis-server`` on a free port (optionally with an
  append-only file, so a restart keeps queued messages), for tests that stop or restart the broker
  without disturbing the shared one;
- :func:`use_broker`: point this test process's Celery app at another broker for a while (a private
  Redis), and back, leaving no closed connection pool behind;
- :class:`DatabaseOutage`: ``pg_terminate_backend`` every connection to the test database in a loop;
- workers started with ``beat=True`` run Celery beat too (the sweeper), and with
  ``kill_after={"workers.tasks.render_report"}`` the pool process SIGKILLs itself once after that
  task committed and before it is acknowledged (``tests/faults.py``);
- :func:`wait_until`: poll a condition with a timeout and a helpful failure message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

REAL_STACK = os.environ.get("LOUPE_REAL_STACK") == "1"
REPO_ROOT = Path(__file__).resolve().parent.parent
_worker_numbers = count(1)


def wait_until(predicate: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.2,
               message: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {text}")
        time.sleep(interval)


def database_url_for(settings_dict: dict) -> str:
    """A ``DATABASE_URL`` for the database Django is connected to (the test database during tests)."""
    engine = settings_dict["ENGINE"]
    if "postgresql" not in engine:
        raise RuntimeError(
            "the real-stack mode needs PostgreSQL: set DATABASE_URL=postgres://postgres@127.0.0.1:5432/loupe_test "
            f"(got engine {engine}); a worker process cannot share SQLite's in-memory test database")
    user = quote(settings_dict.get("USER") or "")
    password = settings_dict.get("PASSWORD") or ""
    auth = f"{user}:{quote(password)}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, so no extra dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (2nd field) is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class WorkerProcess:
    """One ``celery worker`` subprocess in its own process group."""

    def __init__(self, env: dict[str, str], *, queues: str = "gpu,cpu,reports", concurrency: int = 1,
                 log_dir: Path, extra_args: list[str] | None = None, beat: bool = False,
                 kill_after: set[str] | frozenset[str] = frozenset()) -> None:
        number = next(_worker_numbers)
        self.hostname = f"loupe-test-{os.getpid()}-{number}@{socket.gethostname()}"
        self.env = dict(env)
        self.log_path = log_dir / f"worker-{number}.log"
        extra = list(extra_args or [])
        if beat:  # the schedule file goes with the logs, never into the checkout
            extra += ["-B", "-s", str(log_dir / f"beat-{number}")]
        if kill_after:
            extra += ["--include", "tests.faults"]
            self.env["LOUPE_TEST_KILL_AFTER"] = ",".join(sorted(kill_after))
            self.env["LOUPE_TEST_KILL_MARKERS"] = str(log_dir / f"kills-{number}")
        self.command = [
            sys.executable, "-m", "celery", "-A", "workers.celery", "worker",
            "-Q", queues, "-c", str(concurrency), "--pool=prefork", "-n", self.hostname,
            "--loglevel=INFO", "--without-mingle", "--without-gossip", *extra,
        ]
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self, timeout: float = 1.0) -> bool:
        """``celery inspect ping`` for this worker, through the broker (in-process, no extra interpreter)."""
        from workers.celery import app

        replies = app.control.ping(destination=[self.hostname], timeout=timeout)
        return any(self.hostname in reply for reply in replies)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"celery worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"celery worker did not answer ping within {timeout:.0f}s:\n{self.log_tail()}")

    def pool_children(self) -> list[int]:
        return _children(self.pid) if self.alive() else []

    def kill_pool_children(self) -> list[int]:
        """SIGKILL the prefork pool processes (the ones executing tasks); the main process survives."""
        killed = self.pool_children()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        return killed

    def kill(self) -> None:
        """SIGKILL the worker and its pool: no warm shutdown, unacknowledged tasks stay in the broker."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> None:
        """Warm shutdown (SIGTERM: finish the current task), then SIGKILL if it takes too long."""
        if not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RealStack:
    """The session's view of the real stack: subprocess environment and the workers started for it."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self._default: WorkerProcess | None = None

    def start_worker(self, *, extra_env: dict[str, str] | None = None, wait: bool = True,
                     **kwargs: Any) -> WorkerProcess:
        """Start another worker (e.g. the replacement after a SIGKILL). ``extra_env`` overrides settings,
        e.g. ``{"LOUPE_BROKER_VISIBILITY_TIMEOUT": "5", "LOUPE_TASK_TIME_LIMIT": "4"}``."""
        worker = WorkerProcess({**self.env, **(extra_env or {})}, log_dir=self.log_dir, **kwargs)
        self.workers.append(worker)
        return worker.start(wait=wait)

    def ensure_worker(self) -> WorkerProcess:
        """The shared default worker, (re)started if it is not running."""
        if self._default is None or not self._default.alive():
            self._default = self.start_worker()
        return self._default

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        self._default = None

    def purge_queues(self) -> int:
        from workers.celery import app

        return app.control.purge()


@contextlib.contextmanager
def use_broker(url: str) -> Iterator[None]:
    """Point this test process's Celery app (publisher and result backend) at another broker.

    kombu keeps connection and producer pools in process-wide registries keyed by the broker URL:
    closing the app's pool without removing it from there leaves a *closed* pool that the next user
    of the same URL gets back ("Acquire on closed pool" in whichever test comes next). So every
    switch resets the registries, which closes and forgets all pools."""
    from kombu import pools

    from workers.celery import app

    def reset() -> None:
        pools.reset()
        app._pool = None
        app.amqp._producer_pool = None
        app._local.__dict__.pop("backend", None)

    saved_env = os.environ.get("CELERY_BROKER_URL")
    saved = app.conf.broker_url, app.conf.result_backend
    os.environ["CELERY_BROKER_URL"] = url  # Celery lets the environment win over its configuration
    app.conf.broker_url = app.conf.result_backend = url
    reset()
    try:
        yield
    finally:
        app.conf.broker_url, app.conf.result_backend = saved
        if saved_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved_env
        reset()


class DatabaseOutage:
    """Terminate every other session on the test database every ``interval`` seconds for ``seconds``
    (``pg_terminate_backend``), from a thread with its own connection: workers, heartbeats and this
    process's Django connection all lose theirs, and new ones last until the next round. Use as a
    context manager around the outage, or ``start()``/``join()``; close Django's connection after."""

    def __init__(self, database_url: str, *, seconds: float = 45.0, interval: float = 0.25) -> None:
        self.database_url = database_url
        self.seconds = seconds
        self.interval = interval
        self.terminated = 0
        self._thread = threading.Thread(target=self._loop, name="database-outage", daemon=True)

    def _loop(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.seconds
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
                self.terminated += len(rows)
                time.sleep(self.interval)

    def start(self) -> DatabaseOutage:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(timeout=self.seconds + 30)

    def __enter__(self) -> DatabaseOutage:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.join()


class RedisServer:
    """A private ``redis-server`` for tests that stop, kill or restart the broker."""

    def __init__(self, *, appendonly: bool = True) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="loupe-redis-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Shut down (SIGTERM), then wait for the process."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- fixtures (registered as a plugin from tests/conftest.py) -----------------------------------


@pytest.fixture(scope="session")
def real_stack(django_db_setup, django_db_blocker, tmp_path_factory,
               _isolated_media_root) -> Iterator[RealStack | None]:
    """The real stack in ``LOUPE_REAL_STACK=1`` mode, ``None`` otherwise. Workers stop at session end,
    before pytest-django drops the test database they are connected to."""
    if not REAL_STACK:
        yield None
        return
    from django.conf import settings
    from django.db import connection

    if not settings.CELERY_BROKER_URL:
        raise RuntimeError("LOUPE_REAL_STACK=1 needs CELERY_BROKER_URL=redis://127.0.0.1:6379/<n> "
                           "(or amqp://guest:guest@127.0.0.1:5672// for RabbitMQ)")
    with django_db_blocker.unblock():
        database_url = database_url_for(connection.settings_dict)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "governance.settings",
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "LOUPE_STORAGE_ROOT": str(settings.MEDIA_ROOT),
        "LOUPE_MODEL_ROOTS": ",".join(settings.LOUPE_MODEL_ROOTS),
        "HF_HUB_OFFLINE": "1",
        # Notification e-mail sent by the workers stays in their memory (no SMTP server in tests).
        "LOUPE_EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    stack = RealStack(env, tmp_path_factory.mktemp("workers"))
    stack.purge_queues()  # messages left by an earlier, aborted run would reference rows that no longer exist
    try:
        yield stack
    finally:
        stack.stop_workers()
        with django_db_blocker.unblock():
            end_other_sessions(connection)


def end_other_sessions(connection, timeout: float = 15.0) -> None:
    """Let the stopped workers' PostgreSQL sessions end before pytest-django drops the test database.

    A session can outlive its worker process for a moment (the server notices the closed socket
    on its own time), and DROP DATABASE then fails with "being accessed by other users", leaving
    the test database behind. Sessions still open after ``timeout`` are terminated.
    """
    if connection.vendor != "postgresql":
        return
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while True:
            cursor.execute(f"SELECT count(*) {others}")  # noqa: S608 (no user input)
            if cursor.fetchone()[0] == 0:
                return
            if time.monotonic() > deadline:
                cursor.execute(f"SELECT pg_terminate_backend(pid) {others}")  # noqa: S608
                return
            time.sleep(0.2)


@pytest.fixture
def celery_worker(real_stack) -> WorkerProcess | None:
    """A running worker in real-stack mode (``None`` in eager mode, where tasks run in-process).

    Use with ``@pytest.mark.django_db(transaction=True)`` so the worker sees committed rows."""
    if real_stack is None:
        return None
    return real_stack.ensure_worker()


@pytest.fixture(autouse=True)
def _tasks_run_eagerly_without_a_worker(request) -> Iterator[None]:
    """In real-stack mode, tests without a worker still execute tasks in-process, as locally."""
    if not REAL_STACK or "celery_worker" in request.fixturenames or "real_stack" in request.fixturenames:
        yield
        return
    from workers.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    try:
        yield
    finally:
        app.conf.task_always_eager = previous


@pytest.fixture(scope="session", autouse=True)
def _isolated_media_root(tmp_path_factory) -> Iterator[Path]:
    """Uploads, model directories and evidence of a test session go to a temporary directory (shared
    with worker processes through ``LOUPE_STORAGE_ROOT``), never into the checkout's ``var/``."""
    from django.test import override_settings

    media = tmp_path_factory.mktemp("media")
    # Tests create dozens of users: a fast (test-only) password hash keeps the suite quick.
    override = override_settings(MEDIA_ROOT=media, PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    override.enable()
    try:
        yield media
    finally:
        override.disable()


_DB_FIXTURES = frozenset({
    "db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback", "live_server",
    "admin_client", "admin_user", "django_user_model", "celery_worker", "real_stack",
})


def pytest_collection_modifyitems(config, items) -> None:
    """In real-stack mode, run the tests that touch the database or the broker; the pure-PyTorch probe
    tests were already run by the default row and gain nothing from PostgreSQL. Set
    ``LOUPE_REAL_STACK_ALL=1`` to run everything anyway."""
    if not REAL_STACK:
        # Tests marked ``realworker`` kill and restart real processes (workers, Redis); the embedded
        # default has none, so they run only in the real-stack row of CI.
        real_only = [item for item in items if item.get_closest_marker("realworker") is not None]
        if real_only:
            config.hook.pytest_deselected(items=real_only)
            items[:] = [item for item in items if item.get_closest_marker("realworker") is None]
        return
    if os.environ.get("LOUPE_REAL_STACK_ALL") == "1":
        return
    keep, drop = [], []
    for item in items:
        uses_db = (item.get_closest_marker("django_db") is not None
                   or bool(_DB_FIXTURES & set(getattr(item, "fixturenames", ()))))
        (keep if uses_db else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

# Loupe: common tasks. `make help` lists them.
# Use the project's virtual environment when there is one (`make install` creates it).
VENV ?= .venv
# (Decided by the shell when each recipe runs, so `make install demo` picks up the fresh venv.)
PYTHON ?= $$(test -x $(VENV)/bin/python && echo $(VENV)/bin/python || echo python3)
# The real-stack test row: PostgreSQL + Redis + a real Celery worker process (see tests/realstack.py).
REAL_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/loupe
REAL_BROKER_URL ?= redis://127.0.0.1:6379/15
# The same row on RabbitMQ (kombu's pyamqp), the broker that keeps messages durably.
RABBITMQ_BROKER_URL ?= amqp://guest:guest@127.0.0.1:5672//

.PHONY: help install demo serve lint test test-fast test-real test-real-rabbitmq migrate zoo bench

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

install: ## create .venv if missing, install torch (CPU build) first, then the project with dev extras
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e '.[dev]'

demo: ## the main job on the embedded default (SQLite, in-process tasks)
	$(PYTHON) manage.py migrate --noinput
	$(PYTHON) manage.py audit_demo

serve: ## the web app on http://127.0.0.1:8000/ (embedded default: runs proceed in a background worker)
	$(PYTHON) manage.py migrate --noinput
	$(PYTHON) manage.py runserver 127.0.0.1:8000

lint: ## ruff and mypy as configured in pyproject.toml (what CI and the pre-commit hooks run)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: ## the test suite (SQLite + in-process tasks); PYTEST_ARGS="tests/test_api.py -x" narrows it
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: ## the inner loop: every test not marked slow (the governance and API tests; CI runs them all)
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

test-real: ## the database tests again on PostgreSQL + Redis with a real Celery worker process
	LOUPE_REAL_STACK=1 DATABASE_URL=$(REAL_DATABASE_URL) CELERY_BROKER_URL=$(REAL_BROKER_URL) $(PYTHON) -m pytest $(PYTEST_ARGS)

test-real-rabbitmq: ## the tests with real worker processes (-m realworker) on PostgreSQL + RabbitMQ
	LOUPE_REAL_STACK=1 DATABASE_URL=$(REAL_DATABASE_URL) CELERY_BROKER_URL=$(RABBITMQ_BROKER_URL) $(PYTHON) -m pytest -m realworker $(PYTEST_ARGS)

zoo: ## retrain the reference models from scratch
	$(PYTHON) -m workers.probes.zoo build

bench: ## performance ratios against peers, measured in the same run
	$(PYTHON) -m benchmarks

# Loupe: common tasks. `make help` lists them.
PYTHON ?= python

.PHONY: help install demo test test-real migrate zoo bench

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

install: ## install torch (CPU build) first, then the project with dev extras
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'

demo: ## the main job on the embedded default (SQLite, in-process tasks)
	$(PYTHON) manage.py audit_demo

test: ## the test suite (SQLite + in-process tasks; the real-stack tests run when LOUPE_REAL_STACK=1)
	$(PYTHON) -m pytest

zoo: ## retrain the reference models from scratch
	$(PYTHON) -m workers.probes.zoo build

bench: ## performance ratios against peers, measured in the same run
	$(PYTHON) -m benchmarks

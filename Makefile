# archsync — the two commands a user needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCHSYNC := $(VENV)/bin/archsync

.PHONY: help venv services services-down services-reset db-init demo test unit integration lint bench clean

help:
	@echo "make demo           run the local demo on the embedded default services"
	@echo "make test           run the whole test suite (starts the services it needs)"
	@echo "make services       install (when missing) and start PostgreSQL x2, Kafka, Prometheus (idempotent)"
	@echo "make services-down  stop them"
	@echo "make lint           ruff + mypy"
	@echo "make bench          run the benchmarks, results in benchmarks/results/"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

services:
	@scripts/services.sh up

services-down:
	@scripts/services.sh down

services-reset:
	@scripts/services.sh reset

db-init: venv services
	$(ARCHSYNC) db init

demo: venv services
	$(ARCHSYNC) demo

unit: venv
	$(PY) -m pytest tests/unit -q

integration: venv services
	$(PY) -m pytest tests/integration -q

test: venv services
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy archsync connectors processors schemas topology

bench: venv services
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

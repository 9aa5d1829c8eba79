# Retain — `make help` lists the targets. Everything installs into .venv/ and var/.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV ?= $(shell command -v uv 2>/dev/null || echo var/tools/bin/uv)
PY := .venv/bin/python
FORCE ?=

.PHONY: help install run demo test test-fast lint audit fmt bench chaos ops clean keys

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

var/tools/bin/uv:
	@# uv, pinned, in a private venv: nothing is installed outside the repo.
	python3 -m venv var/tools
	var/tools/bin/pip install -q uv==0.13.9

.venv/.synced: pyproject.toml uv.lock | $(if $(shell command -v uv 2>/dev/null),,var/tools/bin/uv)
	$(UV) sync --frozen
	@touch $@

install: .venv/.synced ## Create .venv with the locked dependencies

run: install ## Set up everything and run the whole pipeline on a demo stream (Ctrl-C stops; ARGS=--no-demo: without it)
	$(PY) -m shared.cli run $(ARGS)

demo: install ## Send the demo stream to a running ingest (RETAIN_API_KEY=<events:write key> ARGS="--customers 500 --speed 86400")
	$(PY) -m shared.cli demo $(ARGS)

test: install ## Run the whole test suite (starts its own Kafka broker and PostgreSQL)
	$(PY) -m pytest $(ARGS)

test-fast: install ## Run only the tests that need no broker or database
	$(PY) -m pytest -m "not integration" $(ARGS)

lint: install ## ruff (lint + format check), mypy --strict and the dependency audit
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy shared services tests
	$(PY) -m tests.audit --skip-unreachable

audit: install ## pip-audit on every package in uv.lock: live advisories, else a dated snapshot (docs/operations.md)
	$(PY) -m tests.audit

fmt: install ## Format and auto-fix
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: install ## Benchmarks as ratios against baselines measured in the same run
	$(PY) -m tests.bench $(ARGS)

chaos: install ## Replay 20,000 events under kills, restarts and rebalances; check against the oracle (→ docs/reliability.md)
	$(PY) -m tests.chaos $(ARGS)

ops: install ## Prometheus (Debian's package) scraping `make run`'s services, with the shipped alert rules (Ctrl-C stops)
	$(PY) -m shared.infra.prometheus run

keys: install ## Create an API key: make keys SCOPES="events:write"
	$(PY) -m shared.cli keys create --scopes $(or $(SCOPES),events:write)

clean: ## Remove var/ (asks first; FORCE=1 to skip the question)
	@if [ -n "$(FORCE)" ]; then rm -rf var; echo "var/ removed"; \
	else read -r -p "Remove var/ (broker data, databases, keys, outbox)? [y/N] " a; \
	  if [ "$$a" = y ] || [ "$$a" = Y ]; then rm -rf var; echo "var/ removed"; else echo "kept var/"; fi; fi

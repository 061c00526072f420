# The README's commands. Every target installs what it needs, idempotently.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
TOOLS := .tools
VENV := .venv
UV := $(TOOLS)/bin/uv
GANTRY := $(VENV)/bin/gantry
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
# Never let uv pick up another interpreter than the one that made the venv.
export UV_PYTHON := $(PYTHON)
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
# Install .pyc files with the packages: a machine with PYTHONDONTWRITEBYTECODE=1 (these
# have it) never writes them, so every `gantry` process, flow run and test subprocess
# would otherwise compile mlflow, prefect & co. from source again: ~13 s each.
export UV_COMPILE_BYTECODE := 1

DEMO_SPEC ?= examples/minilm-demo.yaml

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV): scripts/bootstrap-requirements.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --require-hashes -r scripts/bootstrap-requirements.txt
	@touch $@

$(VENV)/.synced: $(UV) uv.lock pyproject.toml Makefile
	$(UV) sync --frozen --quiet
	@touch $@

.PHONY: venv
venv: $(VENV)/.synced ## create .venv from uv.lock

.PHONY: system-deps
system-deps: ## install the Debian packages Gantry needs (debootstrap, docker-registry, ...)
	@bash scripts/install-system-deps.sh

.PHONY: env
env: venv system-deps ## start the embedded services and prepare base images
	$(GANTRY) env up

.PHONY: demo
demo: env ## release the demo model on the embedded defaults
	HF_ENDPOINT="$$($(GANTRY) env url hub)" $(GANTRY) release $(DEMO_SPEC)

.PHONY: serve
serve: env ## Prefect server + work pool + prefect.yaml's deployments + a worker; prints the UI URL
	HF_ENDPOINT="$${HF_ENDPOINT:-$$($(GANTRY) env url hub)}" $(GANTRY) serve

.PHONY: demo-canary
demo-canary: env ## after `make demo`: a good candidate promoted, the degraded one rolled back
	bash scripts/demo-canary.sh

.PHONY: demo-chat
demo-chat: env ## a chat LLM (SmolLM2-135M, llama.cpp) through all eight stages; its degraded revision rolled back
	$(VENV)/bin/python -m gantry.localhub assemble-chat-demo
	bash scripts/demo-canary.sh examples/smollm2-chat.yaml examples/smollm2-degraded.yaml

.PHONY: lint
lint: venv ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: test
test: venv system-deps lint ## lint, then every test tier against the real engines
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: reliability-table
reliability-table: venv ## README's Reliability table, from the last run of tests/reliability
	$(VENV)/bin/python scripts/reliability_table.py

.PHONY: bench
bench: venv system-deps ## benchmarks: ratios printed, written to bench/results/ and the README
	$(VENV)/bin/python bench/run.py --readme $(BENCH_ARGS)

.PHONY: bench-hygiene
bench-hygiene: venv system-deps ## 20 releases through one `gantry serve`: containers, fds, disk after each
	$(VENV)/bin/python bench/hygiene.py --readme

.PHONY: down
down: venv ## stop the embedded services (state is kept)
	$(GANTRY) env down

WORKERS ?= 2

.PHONY: topology
topology: venv system-deps ## a control host and $(WORKERS) worker hosts as containers (see Several hosts)
	$(GANTRY) topology up --workers $(WORKERS)

.PHONY: topology-down
topology-down: venv ## remove the topology's containers (its state is kept)
	$(GANTRY) topology down

.PHONY: topology-lock
topology-lock: $(UV) ## re-export uv.lock's pins for the topology's host image
	{ echo "# uv.lock's pins for the topology's host image (dockerfiles/topology): \`make topology-lock\`"; \
	  $(UV) export --frozen --no-dev --group topology --no-emit-project --format requirements-txt --no-header; \
	} > dockerfiles/topology/requirements.txt

.PHONY: clean
clean: ## stop services and delete all local state (.gantry) and virtualenvs
	-[ -x $(GANTRY) ] && $(GANTRY) topology down
	-[ -x $(GANTRY) ] && $(GANTRY) env down
	rm -rf .gantry $(VENV) $(TOOLS)

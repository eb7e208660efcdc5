# pagecast: `make demo` and `make test` are all a fresh machine needs (Python 3.11).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: install test lint demo up down deploy bench

# Bytecode compiled at install, the dependencies' and the checkout's own: where
# PYTHONDONTWRITEBYTECODE is set (this machine kind), every process otherwise compiles Prefect,
# SQLAlchemy and pagecast from source (pagecast --help: 3.1 s, 1.2 s). A pyc whose source changed
# is ignored, so an edit needs no new install.
install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv \
		|| python3 -m pip install --quiet --user --break-system-packages uv
	@$(UV) sync --frozen --quiet --compile-bytecode
	@$(UV) run --frozen python -m compileall -q pagecast flows tasks deployments benchmarks

# Two xdist workers, each taking a test module at a time; one takes the two running-stack modules
# as one unit on the session's one stack (tests/conftest.py). One process took 17-20 min.
test: install
	$(UV) run --frozen pytest -n 2 --no-loadscope-reorder

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

demo: install
	$(UV) run --frozen pagecast demo

up: install
	$(UV) run --frozen python -m deployments.local_stack up

down: install
	$(UV) run --frozen python -m deployments.local_stack down

deploy: install
	$(UV) run --frozen python -m deployments.bootstrap

# Every benchmark, each printing pagecast beside its reference measured in the same run.
bench: install
	$(UV) run --frozen python -m benchmarks.send_throughput
	$(UV) run --frozen python -m benchmarks.scale
	$(UV) run --frozen python -m benchmarks.through_prefect
	$(UV) run --frozen python -m benchmarks.many_pages
	$(UV) run --frozen python -m benchmarks.send_scale
	$(UV) run --frozen python -m benchmarks.webhook_load
	$(UV) run --frozen python -m benchmarks.sse_viewers

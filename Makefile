# Task runner. `make demo` and `make test` work on a fresh machine with Python 3.11+:
# they create .venv and install Cyclone with its dev tools first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck protos-lint generate check-generated bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cyclone_app demo

# Test processes (pytest-xdist; each has its own embedded PostgreSQL and temp dirs). Most of
# the suite waits on processes, sockets and PostgreSQL, so two workers pay off on two cores.
# Whole files go to a worker in collection order, which tests/conftest.py sorts slowest first
# (xdist's default reorder would hand out the few-test, minutes-long e2e files last).
TEST_WORKERS ?= 2

# Everything CI checks: stale stubs, lint, types, proto lint, then the test suite.
test: $(STAMP) check-generated lint typecheck protos-lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check cyclone cyclone_app services plugins bench tests
	$(VENV)/bin/ruff format --check cyclone cyclone_app services plugins bench tests
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

protos-lint: $(STAMP)
	PYTHON=$(PY) bash scripts/lint-protos.sh

generate: $(STAMP)
	PYTHON=$(PY) bash scripts/generate.sh

check-generated: generate
	git diff --exit-code --stat -- cyclone || (echo "generated stubs are stale: run make generate and commit" && exit 1)
	test -z "$$(git status --porcelain --untracked-files=all -- cyclone | grep '_pb2')" || (echo "new generated stubs are not committed" && exit 1)

bench: $(STAMP)
	$(PY) -m bench.inference
	$(PY) -m bench.store
	$(PY) -m bench.monitor
	$(PY) -m bench.envoy
	$(PY) -m bench.rollout
	$(PY) -m bench.loop
	$(PY) -m bench.cold_start

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test check test-lowest lint bench clean system-deps manifests

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	$(PY) -m pip install --quiet --no-deps 'arq>=0.26'  # pins redis<6; runs on redis-py 6+
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/conduit-otel-cache demo $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# Servers and tools the tests run for real; installed with apt (as root) when missing.
SYSTEM_TOOLS := redis-server redis-cli prometheus promtool openssl chromium
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages for:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
	    apt-get install -y -qq --no-install-recommends redis-server redis-tools prometheus openssl chromium >/dev/null; \
	  else \
	    echo "missing:$$missing; install redis-server, redis-tools, prometheus, openssl and chromium"; exit 1; \
	  fi; \
	fi

test: system-deps lint
	$(PY) -m pytest

# The quick local loop: lint and every test but the slow and Redis Cluster ones.
check: system-deps lint
	$(PY) -m pytest -q -m "not slow and not redis_cluster"

# deploy/kubernetes/ manifests generated from grafana/ (tests/test_kubernetes.py checks them)
manifests:
	$(PYTHON) deploy/manifests.py

# The suite once more with the lowest versions of the core dependencies that pyproject.toml
# declares (constraints/lowest.txt), in a venv of its own. LOWEST_PYTHON picks the interpreter
# (e.g. the oldest supported one), PYTEST_ARGS passes options (e.g. -m "not slow").
LOWEST_VENV ?= .venv-lowest
LOWEST_PYTHON ?= $(PYTHON)
$(LOWEST_VENV)/.installed: pyproject.toml constraints/lowest.txt
	$(LOWEST_PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install --quiet -c constraints/lowest.txt -e '.[test]'
	$(LOWEST_VENV)/bin/python -m pip install --quiet --no-deps 'arq>=0.26'
	touch $@

test-lowest: system-deps $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pip freeze | grep -iE '^(opentelemetry|redis|prometheus|hiredis)'
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

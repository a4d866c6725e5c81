# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test check lint bench clean system-deps manifests

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
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
	$(PY) -m pytest -q -m "not slow and not cluster"

# deploy/kubernetes/ manifests generated from grafana/ (tests/test_kubernetes.py checks them)
manifests:
	$(PYTHON) deploy/manifests.py

bench: $(VENV)/.installed
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

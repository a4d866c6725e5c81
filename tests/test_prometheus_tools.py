"""The Grafana dashboard and the Prometheus alert rules, proven on the real tools: promtool
checks the exposition and the rules and runs the rules' unit tests, and a real Prometheus
server scraping `serve` runs every query of the dashboard and of the rules."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import Settings, setup
from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.serve.service import ExporterService

HERE = Path(__file__).parent
ROOT = HERE.parent
DASHBOARD = ROOT / "grafana" / "conduit-cache-statistics.json"
ALERTS = ROOT / "grafana" / "alerts.yml"
ALERTS_TEST = HERE / "promtool" / "alerts_test.yml"
JOB = "conduit-cache"
RATE_INTERVAL = "15s"

#: The alerts the rules must define (more are allowed).
REQUIRED_ALERTS = {
    "ConduitCacheNoLiveInstances",
    "ConduitCacheInstanceMissing",
    "ConduitCacheRedisDown",
    "ConduitCacheAggregationStale",
    "ConduitCacheAggregationSlow",
    "ConduitCacheDriftHigh",
    "ConduitCacheLowHitRatio",
}
#: Series published by `serve` that carry a `region` label.
REGION_SERIES = {
    "conduit_cache_hits_total",
    "conduit_cache_misses_total",
    "conduit_cache_sets_total",
    "conduit_cache_evictions_total",
    "conduit_cache_size_bytes",
    "conduit_cache_response_time_seconds_bucket",
    "conduit_cache_hit_ratio",
    "conduit_cache_drift_percent",
    "conduit_cache_instance_hit_ratio",
    "conduit_cache_data_losses_total",
}
#: Every family `serve` publishes (README, "## Prometheus").
SERVE_FAMILIES = {
    "conduit_cache_hits",
    "conduit_cache_misses",
    "conduit_cache_sets",
    "conduit_cache_evictions",
    "conduit_cache_size_bytes",
    "conduit_cache_hit_ratio",
    "conduit_cache_response_time_seconds",
    "conduit_cache_drift_percent",
    "conduit_cache_instance_hit_ratio",
    "conduit_cache_instances_active",
    "conduit_cache_instances_missing",
    "conduit_cache_redis_up",
    "conduit_cache_aggregation_latency_seconds",
    "conduit_cache_redis_memory_bytes",
    "conduit_cache_last_successful_aggregation_timestamp_seconds",
    "conduit_cache_health_status",
    "conduit_cache_aggregation_errors",
    "conduit_cache_instances_flush_errors",
    "conduit_cache_instances_flush_errors_all_kinds",
    "conduit_cache_data_losses",
}


def tool(name: str) -> str:
    """Path of a Prometheus tool; the tests fail (not skip) without it: CI installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install Prometheus (apt-get install prometheus, as "
            f".ci/run does) to run the dashboard and alert tests"
        )
    return path


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def families(body: bytes) -> set[str]:
    return {family.name for family in text_string_to_metric_families(body.decode())}


def record_traffic(handle: Any, region: str, hits: int, misses: int) -> None:
    for i in range(hits):
        handle.record_hit(region, 0.0005 * (i % 7))
    for _ in range(misses):
        handle.record_miss(region, 0.03)
        handle.record_set(region)
    handle.record_eviction(region)
    handle.set_size_bytes(region, 4096)


# --- promtool check metrics ---------------------------------------------------------------


def test_promtool_accepts_serve_metrics(redis_url: str) -> None:
    handles = [
        setup(redis_url=redis_url, instance_id=f"api-{n}", set_global=False, flush_interval=None)
        for n in (1, 2)
    ]
    service = None
    try:
        for n, handle in enumerate(handles):
            record_traffic(handle, "ProviderResponses", 40 + 10 * n, 10)
            record_traffic(handle, "Sessions", 5, 5 + n)
            assert handle.flush()
        settings = Settings.load(redis_url=redis_url, aggregation_cache_ttl=0)
        service = ExporterService(settings, port=0).start()
        url = f"http://127.0.0.1:{service.port}/metrics"

        service.aggregator.refresh_instances()  # the per-instance pass, forced
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
        assert families(body) >= SERVE_FAMILIES
    finally:
        if service is not None:
            service.stop()
        for handle in handles:
            handle.shutdown()
    assert b'instance_id="api-2"' in body  # promtool sees the whole exposition
    assert_ok(promtool("check", "metrics", stdin=body))


def test_promtool_accepts_application_exposition() -> None:
    registry = REGISTRY  # what an application serves (registry= exists only since 0.63b0)
    handle = setup(
        metric_readers=[PrometheusMetricReader()],
        set_global=False,
        flush_interval=None,
        instance_id="app-1",
    )
    try:
        record_traffic(handle, "ProviderResponses", 30, 7)
        body = generate_latest(registry)
    finally:
        handle.shutdown()
    assert families(body) >= {
        "conduit_cache_hits",
        "conduit_cache_misses",
        "conduit_cache_sets",
        "conduit_cache_evictions",
        "conduit_cache_size_bytes",
        "conduit_cache_response_time_seconds",
    }
    assert b"conduit_cache_hits_total{" in body and b'region="ProviderResponses"} 30.0' in body
    assert_ok(promtool("check", "metrics", stdin=body))


# --- promtool check rules / test rules ----------------------------------------------------


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(), re.MULTILINE)


def test_promtool_checks_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert_ok(result)
    names = alert_names()
    assert f"SUCCESS: {len(names)} rules found" in result.stdout
    assert set(names) >= REQUIRED_ALERTS
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"ConduitCache[A-Z][A-Za-z]+", n) for n in names)
    text = ALERTS.read_text()
    # every alert has a severity and a summary and a description
    for block in re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]:
        assert re.search(r"^\s+severity: (critical|warning|info)$", block, re.MULTILINE), block
        assert re.search(r"^\s+summary: \S", block, re.MULTILINE), block
        assert re.search(r"^\s+description: \S", block, re.MULTILINE), block
        name = block.split(None, 1)[0]
        anchor = re.search(r"^\s+runbook_url: docs/runbook\.md#(\w+)$", block, re.MULTILINE)
        assert anchor and anchor.group(1) == name.lower(), block
    # ... and the runbook has a section for it, with how to confirm it and what to do
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", runbook, re.MULTILINE | re.DOTALL))
    assert set(sections) == set(names)
    for name, section in sections.items():
        for part in ("**Meaning**", "**Confirm**", "**Act**"):
            assert part in section, (name, part)
        confirm = section.split("**Confirm**", 1)[1].split("**Act**", 1)[0]
        assert re.search(r"(redis-cli|conduit-otel-cache|curl) ", confirm), name


def test_promtool_unit_tests_fire_and_stay_silent() -> None:
    assert_ok(promtool("test", "rules", str(ALERTS_TEST)))
    # every alert is covered by a case where it fires and one where it must not
    text = ALERTS_TEST.read_text()
    silent = set(re.findall(r"alertname: (\w+), exp_alerts: \[\]", text))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", text))
    assert set(alert_names()) <= silent
    assert set(alert_names()) <= firing


def test_promtool_unit_tests_catch_rules_that_count_replicas_twice(tmp_path: Path) -> None:
    """The two-replica cases are not vacuous: rules that sum over the replicas fail them."""
    (tmp_path / "grafana").mkdir()
    (tmp_path / "tests" / "promtool").mkdir(parents=True)
    rules = ALERTS.read_text()
    summed = rules.replace("max without (instance, pod) (", "sum without (instance, pod) (")
    assert summed != rules
    (tmp_path / "grafana" / "alerts.yml").write_text(summed)
    shutil.copy(ALERTS_TEST, tmp_path / "tests" / "promtool" / "alerts_test.yml")
    result = promtool("test", "rules", str(tmp_path / "tests" / "promtool" / "alerts_test.yml"))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "two exporter replicas" in out
    # doubled values, and Trickle's doubled 0.6 req/s over the 1 req/s floor
    failing = set(re.findall(r"alertname: (\w+), time:", out))
    assert failing == {
        "ConduitCacheInstanceMissing",
        "ConduitCacheDriftHigh",
        "ConduitCacheLowHitRatio",
        "ConduitCacheAggregationErrors",
        "ConduitCacheInstanceFlushErrors",
    }


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a drift rule without its threshold fails them."""
    (tmp_path / "grafana").mkdir()
    (tmp_path / "tests" / "promtool").mkdir(parents=True)
    broken = ALERTS.read_text().replace("(conduit_cache_drift_percent) > 5", "(x) > 5")
    assert broken != ALERTS.read_text()
    (tmp_path / "grafana" / "alerts.yml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / "tests" / "promtool" / "alerts_test.yml")
    result = promtool("test", "rules", str(tmp_path / "tests" / "promtool" / "alerts_test.yml"))
    assert result.returncode != 0
    assert "ConduitCacheDriftHigh" in result.stdout + result.stderr


# --- the dashboard ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


SELECTOR = re.compile(r"\b(conduit_cache_\w+)(\{[^}]*\})?(\[[^\]]*\])?")


def test_dashboard_follows_linter_conventions() -> None:
    board = dashboard()
    assert board["uid"] == "conduit-cache-stats"
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, query in (
        ("job", "label_values(conduit_cache_hits_total, job)"),
        ("region", 'label_values(conduit_cache_hits_total{job=~"$job"}, region)'),
    ):
        var = variables[name]
        assert var["type"] == "query" and var["query"]["query"] == query == var["definition"]
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".+"
        assert var["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        title = panel["title"]
        assert title and len(panel["description"]) > 20, title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
    for title, expr in panel_exprs():
        selectors = SELECTOR.findall(expr)
        assert selectors or expr == 'max by (instance) (up{job=~"$job"})', (title, expr)
        for metric, matchers, window in selectors:
            assert 'job=~"$job"' in matchers, (title, metric)
            if metric in REGION_SERIES:
                assert 'region=~"$region"' in matchers, (title, metric)
            if window:
                assert window == "[$__rate_interval]", (title, metric)
            if metric.endswith(("_total", "_bucket")):
                assert window, (title, metric)
                assert re.search(rf"\b(rate|increase)\({metric}\{{", expr), (title, metric)
        # the lifetime gauges are never used for a hit ratio over time
        assert not re.search(r"conduit_cache_hit_(ratio|rate)\b", expr), title


def test_dashboard_panels_and_thresholds() -> None:
    by_title = {p["title"]: p for p in panels()}
    expected = {
        "Cluster hit ratio per region": ("percentunit", None),
        "Operations per second": ("ops", None),
        "Cache size": ("bytes", None),
        "Response time p50 / p95 / p99": ("s", None),
        "Active instances": ("short", None),
        "Missing instances": ("short", None),
        "Drift per region": ("suffix: pts", 5),  # percentage points, not a percentage
        "Redis up": ("none", None),
        "Aggregation latency": ("s", 0.5),
        "Redis memory": ("bytes", 1024**3),
        "Time since last successful aggregation": ("s", 120),
        "Per-instance hit ratio": ("percentunit", None),
        "Instance flush failures": ("short", 1),
        "Data losses": ("short", 1),
    }
    for title, (unit, threshold) in expected.items():
        defaults = by_title[title]["fieldConfig"]["defaults"]
        assert defaults["unit"] == unit, title
        if threshold is not None:
            steps = [s["value"] for s in defaults["thresholds"]["steps"]]
            assert threshold in steps, title
    hit_ratio = by_title["Cluster hit ratio per region"]["targets"][0]["expr"]
    once = "sum by (region) (max without (instance, pod) (rate(conduit_cache_"
    assert hit_ratio.count(once + "hits_total") == 2
    assert hit_ratio.count(once + "misses_total") == 1
    quantiles = [t["expr"] for t in by_title["Response time p50 / p95 / p99"]["targets"]]
    shape = (
        r"histogram_quantile\((0\.\d+), sum by \(le, region\) "
        r"\(max without \(instance, pod\) \(rate\(conduit_cache_resp"
    )
    assert [m.group(1) for q in quantiles if (m := re.match(shape, q))] == ["0.5", "0.95", "0.99"]
    ops = " ".join(t["expr"] for t in by_title["Operations per second"]["targets"])
    for counter in ("hits", "misses", "sets", "evictions"):
        assert f"rate(conduit_cache_{counter}_total{{" in ops
    age = by_title["Time since last successful aggregation"]["targets"][0]["expr"]
    assert age.startswith("time() - ")
    # the Replicas row: one series per replica (its target, Redis, health, data age)
    replicas = [p for p in panels() if p["title"].startswith("Replica ")]
    assert [p["targets"][0]["expr"].split("(", 2)[2].split("{")[0] for p in replicas] == [
        "up",
        "conduit_cache_redis_up",
        "conduit_cache_health_status",
        "conduit_cache_exporter_data_age_seconds",
    ]
    for panel in replicas:
        assert panel["targets"][0]["expr"].startswith("max by (instance) (")
        assert panel["targets"][0]["legendFormat"] == "{{instance}}"
    # the cluster's health is the best replica's (a cut-off replica is Unhealthy alone)
    assert by_title["Health status"]["targets"][0]["expr"].startswith("min(")
    # the conditional counters: per region, and 0 (not "no data") when none
    losses = by_title["Data losses"]["targets"][0]["expr"]
    assert losses.startswith("sum by (region) (max without (instance, pod) (increase(")
    assert "conduit_cache_data_losses_total{" in losses and losses.endswith(" or on () vector(0)")
    # flush failures: every kind together from the kindless counter (published from 0, so
    # the first failure of a kind never seen is counted), then the breakdown by kind
    every, by_kind = (t["expr"] for t in by_title["Instance flush failures"]["targets"])
    assert every.startswith("sum(max without (instance, pod) (increase(")
    assert "conduit_cache_instances_flush_errors_all_kinds_total{" in every
    assert every.endswith(" or on () vector(0)")
    assert by_kind.startswith("sum by (kind) (max without (instance, pod) (increase(")
    assert "conduit_cache_instances_flush_errors_total{" in by_kind
    table = by_title["Per-instance hit ratio"]
    assert table["type"] == "table" and table["targets"][0]["format"] == "table"
    assert "by (region, instance_id)" in table["targets"][0]["expr"]


# --- a real Prometheus scraping `serve` ---------------------------------------------------


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's variables as Grafana would with job=conduit-cache, region=All."""
    for variable, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("$__interval", "5s"),
        ("$__range", "5m"),
        ("${job}", JOB),
        ("$job", JOB),
        ("${region}", ".+"),
        ("$region", ".+"),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:  # 400/422 carry a JSON error
        body = err.read()
    reply: dict[str, Any] = json.loads(body)
    return reply


def query(base: str, expr: str) -> list[dict[str, Any]]:
    reply = api(base, "/api/v1/query", query=expr)
    assert reply["status"] == "success" and "error" not in reply, (expr, reply)
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def wait_for(what: str | Callable[[], str], check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check()`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    pytest.fail(
        f"timed out after {timeout} s waiting for "
        f"{what() if callable(what) else what}; last: {last!r}"
    )


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def start_serve(redis_url: str) -> tuple[subprocess.Popen[str], int]:
    """A real `conduit-otel-cache serve` process on a free port (per-instance pass every 1 s)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url", redis_url,
         "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0",
            "CONDUIT_CACHE_STATS_AGGREGATION_INTERVAL": "1",
        },
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
    return proc, port


@pytest.fixture
def replicas() -> int:
    """How many `serve` replicas the Prometheus of a test scrapes (parametrize to change)."""
    return 1


@pytest.fixture
def serve_ports(redis_url: str, replicas: int) -> Iterator[list[int]]:
    """``replicas`` `serve` processes of one exporter, all reading the same Redis."""
    procs: list[subprocess.Popen[str]] = []
    try:
        ports = []
        for _ in range(replicas):
            proc, port = start_serve(redis_url)
            procs.append(proc)
            ports.append(port)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def run_prometheus(tmp_path: Path, config: str, storage: Path | None = None) -> Iterator[str]:
    """A real Prometheus on loopback with ``config``; yields its base URL once ready."""
    binary = tool("prometheus")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(config)
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={storage or tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"

    def log_text() -> str:
        log.flush()
        return (tmp_path / "prometheus.log").read_text()

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}:\n{log_text()}")
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for("Prometheus /-/ready", ready, timeout=30)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def prometheus(serve_ports: list[int], tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on loopback scraping every `serve` replica each second as one job,
    with grafana/alerts.yml."""
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in serve_ports)
    config = (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        f"    static_configs: [{{targets: [{targets}]}}]\n"
    )
    with run_prometheus(tmp_path, config) as base:
        yield base


TRAFFIC = {"api-1": (8, 2), "api-2": (5, 5), "api-3": (9, 1)}  # hits, misses per step


def over_replicas(series: str) -> str:
    """A cluster-wide series of the exporter, once however many replicas are scraped."""
    return f"max without (instance, pod) ({series})"


def active_alerts(base: str, name: str) -> list[dict[str, Any]]:
    """The pending or firing alerts named ``name`` that Prometheus holds now."""
    reply = api(base, "/api/v1/alerts")
    assert reply["status"] == "success", reply
    return [a for a in reply["data"]["alerts"] if a["labels"]["alertname"] == name]


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas"])
@pytest.mark.usefixtures("private_redis")  # kills and restarts Redis
def test_prometheus_runs_every_dashboard_and_rule_query(
    redis_server: RedisServer, prometheus: str, replicas: int
) -> None:
    """Run with one `serve` and with two replicas of it as targets of one job: the panels'
    totals, the rules and the alerts are the same, and counted once."""
    procs = {
        instance_id: subprocess.Popen(
            [
                sys.executable,
                str(HERE / "traffic_process.py"),
                redis_server.url,
                instance_id,
                str(hits),
                str(misses),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for instance_id, (hits, misses) in TRAFFIC.items()
    }
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "recording"

        # the rules as Prometheus loaded them: every one evaluates without error
        def rules_evaluated() -> list[dict[str, Any]]:
            reply = api(prometheus, "/api/v1/rules")
            assert reply["status"] == "success", reply
            rules = [rule for group in reply["data"]["groups"] for rule in group["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else []

        rules = wait_for("every rule evaluated with health ok", rules_evaluated)
        assert {r["name"] for r in rules if r["type"] == "alerting"} == set(alert_names())
        assert all(not r.get("lastError") for r in rules), rules

        # every panel query runs and, with traffic flowing, returns a finite value
        exprs = [(title, grafana_to_promql(expr)) for title, expr in panel_exprs()]
        pending = dict.fromkeys(exprs)

        def all_panels_have_data() -> bool:
            for title, expr in list(pending):
                if finite(query(prometheus, expr)):
                    del pending[(title, expr)]
            return not pending

        def missing() -> str:
            targets = api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
            return f"data in the panels {sorted(set(t for t, _ in pending))}; targets: {targets}"

        wait_for(missing, all_panels_have_data)
        for rule in rules:  # every rule expression runs through the query API
            query(prometheus, rule["query"])
        targets = api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
        assert len({t["labels"]["instance"] for t in targets}) == replicas
        hits_series = query(prometheus, f'conduit_cache_hits_total{{job="{JOB}"}}')
        assert len(hits_series) == 2 * replicas  # every replica publishes the cluster series
        hits_total = f'conduit_cache_hits_total{{job="{JOB}"}}'
        by_region = query(prometheus, f"sum by (region) ({over_replicas(hits_total)})")
        assert {s["metric"]["region"] for s in by_region} == {"ProviderResponses", "Sessions"}
        ratio = 'max by (instance_id) (conduit_cache_instance_hit_ratio{job=~"$job"})'
        instances = query(prometheus, grafana_to_promql(ratio))
        assert {s["metric"]["instance_id"] for s in instances} == set(TRAFFIC)

        # stop the traffic: Prometheus's cluster counters equal what the processes recorded
        totals: dict[str, dict[str, int]] = {}
        for instance_id, proc in procs.items():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            word, _, payload = proc.stdout.readline().partition(" ")
            assert word == "done", instance_id
            totals[instance_id] = json.loads(payload)
        for counter in ("hits", "misses", "sets", "evictions"):
            expected = {
                region: float(sum(t[region][counter] for t in totals.values()))
                for region in ("ProviderResponses", "Sessions")
            }
            assert all(v > 0 for v in expected.values())
            series = f'conduit_cache_{counter}_total{{job="{JOB}"}}'
            expr = f"sum by (region) ({over_replicas(series)})"

            def scraped(expr: str = expr, expected: dict[str, float] = expected) -> bool:
                got = {s["metric"]["region"]: float(s["value"][1]) for s in query(prometheus, expr)}
                return got == expected

            wait_for(f"{expr} == {expected}", scraped, timeout=15)
        hits = sum(t[r]["hits"] for t in totals.values() for r in t)
        total = f"sum({over_replicas(hits_total)})"
        assert float(query(prometheus, total)[0]["value"][1]) == hits

        # while healthy the failure alerts' expressions select nothing ...
        by_name = {r["name"]: r["query"] for r in rules}
        for name in (
            "ConduitCacheNoLiveInstances",
            "ConduitCacheRedisDown",
            "ConduitCacheInstanceMissing",
            "ConduitCacheAggregationStale",
        ):
            assert query(prometheus, by_name[name]) == [], name
        # ... and they select the failures once they happen: clean shutdown of every instance
        for proc in procs.values():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            assert proc.wait(15) == 0
            assert proc.stdout.read().strip() == "stopped"
        wait_for(
            "ConduitCacheNoLiveInstances expression to select",
            lambda: query(prometheus, by_name["ConduitCacheNoLiveInstances"]),
        )
        # ... and Prometheus holds one alert for it, not one per replica
        wait_for(
            "one ConduitCacheNoLiveInstances alert",
            lambda: len(active_alerts(prometheus, "ConduitCacheNoLiveInstances")) == 1,
        )
        redis_server.kill()
        wait_for(
            "ConduitCacheRedisDown expression to select",
            lambda: query(prometheus, by_name["ConduitCacheRedisDown"]),
        )
        wait_for(
            "one ConduitCacheRedisDown alert",
            lambda: len(active_alerts(prometheus, "ConduitCacheRedisDown")) == 1,
        )
        assert active_alerts(prometheus, "ConduitCacheExporterReplicaRedisDown") == []
        # while Redis is down no replica publishes the cluster series (no stale values) ...
        wait_for("the cluster series to go stale", lambda: not query(prometheus, total))
        # ... and Prometheus keeps what they were
        last = f"sum({over_replicas(f'last_over_time({hits_total}[5m])')})"
        assert float(query(prometheus, last)[0]["value"][1]) == hits
        # Redis back (empty: no persistence): the alert clears
        redis_server.start()
        wait_for(
            "ConduitCacheRedisDown to clear",
            lambda: (
                not active_alerts(prometheus, "ConduitCacheRedisDown")
                and not query(prometheus, by_name["ConduitCacheRedisDown"])
            ),
        )
        # an instance records again: the cluster alert clears too
        again = setup(redis_url=redis_server.url, instance_id="api-4", set_global=False,
                      flush_interval=None)  # fmt: skip
        try:
            record_traffic(again, "Sessions", 3, 1)
            assert again.flush()
            wait_for(
                "ConduitCacheNoLiveInstances to clear",
                lambda: (
                    not active_alerts(prometheus, "ConduitCacheNoLiveInstances")
                    and not query(prometheus, by_name["ConduitCacheNoLiveInstances"])
                ),
            )
        finally:
            again.shutdown()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --- two replicas give every panel the numbers of one -------------------------------------

#: Series each replica measures itself (not read from Redis): the panels show the worst one.
REPLICA_OWN = {
    "conduit_cache_aggregation_latency_seconds",
    "conduit_cache_last_successful_aggregation_timestamp_seconds",
    "conduit_cache_redis_memory_bytes",
    "conduit_cache_health_status",
    "conduit_cache_aggregation_errors",
}
STEP = 15  # seconds between the synthetic scrapes


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name in SERVE_FAMILIES}


def cluster_part(scraped: dict[str, Any]) -> dict[str, Any]:
    return {
        name: sorted((s.name, sorted(s.labels.items()), s.value) for s in family.samples)
        for name, family in scraped.items()
        if name not in REPLICA_OWN
    }


def openmetrics(scrapes: list[tuple[str, str, int, dict[str, Any]]]) -> str:
    """OpenMetrics text of ``(job, instance, timestamp, families)`` scrapes, for promtool's
    backfill: every sample at the given timestamp, a family's samples together."""
    lines: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for job, instance, ts, families_ in scrapes:
        for name, family in families_.items():
            types[name] = family.type
            for sample in family.samples:
                labels = {**sample.labels, "job": job, "instance": instance}
                text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                lines.setdefault(name, []).append(f"{sample.name}{{{text}}} {sample.value} {ts}")
    out = []
    for name, samples in lines.items():
        out.append(f"# TYPE {name} {types[name]}")
        out.extend(samples)
    return "\n".join([*out, "# EOF", ""])


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2])
def test_two_replicas_give_every_panel_the_numbers_of_one(
    redis_url: str, serve_ports: list[int], tmp_path: Path
) -> None:
    """Two real `serve` replicas are scraped after each round of traffic (once both publish
    the same cluster view); the scrapes go into one Prometheus TSDB at common timestamps as
    job ``two`` (both replicas) and jobs ``one-a`` / ``one-b`` (each alone). Every panel
    query then gives, at the same instant, exactly the same result for ``two`` as for one
    replica; the series a replica measures itself show the worse of the two."""
    handles = {
        i: setup(redis_url=redis_url, instance_id=i, set_global=False, flush_interval=None)
        for i in TRAFFIC
    }
    start = (int(time.time()) - 3600) // STEP * STEP
    scrapes: list[tuple[str, str, int, dict[str, Any]]] = []
    try:
        recorded = {(i, r): [0, 0] for i in TRAFFIC for r in ("ProviderResponses", "Sessions")}
        for step in range(12):
            for i, (hits, misses) in TRAFFIC.items():
                for region, h, m in (("ProviderResponses", hits * (1 + step % 3), misses),
                                     ("Sessions", misses, hits)):  # fmt: skip
                    record_traffic(handles[i], region, h, m)
                    recorded[(i, region)][0] += h
                    recorded[(i, region)][1] += m
                assert handles[i].flush()
            ratios = {key: h / (h + m) for key, (h, m) in recorded.items()}

            def current(scraped: dict[str, Any], ratios: dict[Any, float] = ratios) -> bool:
                """The background per-instance pass has seen this round's flushes."""
                family = scraped.get("conduit_cache_instance_hit_ratio")
                got = {(s.labels["instance_id"], s.labels["region"]): s.value
                       for s in (family.samples if family else [])}  # fmt: skip
                return got == pytest.approx(ratios)

            def agreed() -> tuple[dict[str, Any], dict[str, Any]] | None:
                a, b = (scrape(port) for port in serve_ports)
                ok = cluster_part(a) == cluster_part(b) and current(a) and current(b)
                return (a, b) if ok else None

            a, b = wait_for("both replicas to publish the same cluster view", agreed)
            ts = start + STEP * step
            for job, replica, scraped in (("two", "a", a), ("two", "b", b),
                                          ("one-a", "a", a), ("one-b", "b", b)):  # fmt: skip
                scrapes.append((job, f"replica-{replica}:9464", ts, scraped))
    finally:
        for handle in handles.values():
            handle.shutdown()
    source = tmp_path / "scrapes.om"
    source.write_text(openmetrics(scrapes))
    storage = tmp_path / "tsdb"
    assert_ok(promtool("tsdb", "create-blocks-from", "openmetrics", str(source), str(storage)))

    at = str(start + STEP * 11)
    with run_prometheus(tmp_path, "global: {}\n", storage) as base:

        def result(expr: str, job: str) -> dict[frozenset[tuple[str, str]], str]:
            promql = grafana_to_promql(expr.replace("$job", job)).replace(RATE_INTERVAL, "1m")
            reply = api(base, "/api/v1/query", query=promql, time=at)
            assert reply["status"] == "success", (promql, reply)
            return {frozenset(s["metric"].items()): s["value"][1] for s in reply["data"]["result"]}

        hits = 'sum by (region) (conduit_cache_hits_total{job=~"$job"})'
        assert result(hits, "two") != result(hits, "one-a")  # a plain sum counts twice
        for title, expr in panel_exprs():
            if title.startswith("Replica "):  # one series per replica, by design
                continue
            two, one_a, one_b = (result(expr, job) for job in ("two", "one-a", "one-b"))
            assert two and all(math.isfinite(float(v)) for v in two.values()), (title, two)
            if any(name in expr for name in REPLICA_OWN):
                assert two in (one_a, one_b), (title, two, one_a, one_b)
            else:
                assert two == one_a == one_b, (title, expr)

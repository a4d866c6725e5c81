"""The Grafana dashboard and the Prometheus alert rules, proven on the real tools: promtool
checks the exposition and the rules and runs the rules' unit tests, and a real Prometheus
server scraping `serve` runs every query of the dashboard and of the rules."""

from __future__ import annotations

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
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import Settings, setup
from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.server import ExporterService

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
    "ConduitCacheLowHitRate",
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
    "conduit_cache_hit_rate",
    "conduit_cache_drift_percent",
    "conduit_cache_instance_hit_ratio",
}
#: Every family `serve` publishes (README, "## Prometheus").
SERVE_FAMILIES = {
    "conduit_cache_hits",
    "conduit_cache_misses",
    "conduit_cache_sets",
    "conduit_cache_evictions",
    "conduit_cache_size_bytes",
    "conduit_cache_hit_ratio",
    "conduit_cache_hit_rate",
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

        def complete() -> bytes | None:  # the per-instance pass runs in the background
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
            return body if families(body) >= SERVE_FAMILIES else None

        body = wait_for("every family on /metrics", complete, timeout=15)
    finally:
        if service is not None:
            service.stop()
        for handle in handles:
            handle.shutdown()
    assert b'instance_id="api-2"' in body  # promtool sees the whole exposition
    assert_ok(promtool("check", "metrics", stdin=body))


def test_promtool_accepts_application_exposition() -> None:
    registry = CollectorRegistry()
    handle = setup(
        metric_readers=[PrometheusMetricReader(registry=registry)],
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


def test_promtool_unit_tests_fire_and_stay_silent() -> None:
    assert_ok(promtool("test", "rules", str(ALERTS_TEST)))
    # every alert is covered by a case where it fires and one where it must not
    text = ALERTS_TEST.read_text()
    silent = set(re.findall(r"alertname: (\w+), exp_alerts: \[\]", text))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", text))
    assert set(alert_names()) <= silent
    assert set(alert_names()) <= firing


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
        assert selectors, (title, expr)
        for metric, matchers, window in selectors:
            assert 'job=~"$job"' in matchers, (title, metric)
            if metric in REGION_SERIES:
                assert 'region=~"$region"' in matchers, (title, metric)
            if window:
                assert window == "[$__rate_interval]", (title, metric)
            if metric.endswith(("_total", "_bucket")):
                assert window, (title, metric)
                assert re.search(rf"\b(rate|increase)\({metric}\{{", expr), (title, metric)
        # the lifetime gauges are never used for a hit rate over time
        assert not re.search(r"conduit_cache_hit_(ratio|rate)\b", expr), title


def test_dashboard_panels_and_thresholds() -> None:
    by_title = {p["title"]: p for p in panels()}
    expected = {
        "Cluster hit rate per region": ("percentunit", None),
        "Operations per second": ("ops", None),
        "Cache size": ("bytes", None),
        "Response time p50 / p95 / p99": ("s", None),
        "Active instances": ("short", None),
        "Missing instances": ("short", None),
        "Drift per region": ("percent", 5),
        "Redis up": ("none", None),
        "Aggregation latency": ("s", 0.5),
        "Redis memory": ("bytes", 1024**3),
        "Time since last successful aggregation": ("s", 120),
        "Per-instance hit rate": ("percentunit", None),
    }
    for title, (unit, threshold) in expected.items():
        defaults = by_title[title]["fieldConfig"]["defaults"]
        assert defaults["unit"] == unit, title
        if threshold is not None:
            steps = [s["value"] for s in defaults["thresholds"]["steps"]]
            assert threshold in steps, title
    hit_rate = by_title["Cluster hit rate per region"]["targets"][0]["expr"]
    assert hit_rate.count("sum by (region) (rate(conduit_cache_hits_total") == 2
    assert hit_rate.count("sum by (region) (rate(conduit_cache_misses_total") == 1
    quantiles = [t["expr"] for t in by_title["Response time p50 / p95 / p99"]["targets"]]
    shape = r"histogram_quantile\((0\.\d+), sum by \(le, region\) \(rate\(conduit_cache_resp"
    assert [m.group(1) for q in quantiles if (m := re.match(shape, q))] == ["0.5", "0.95", "0.99"]
    ops = " ".join(t["expr"] for t in by_title["Operations per second"]["targets"])
    for counter in ("hits", "misses", "sets", "evictions"):
        assert f"rate(conduit_cache_{counter}_total{{" in ops
    age = by_title["Time since last successful aggregation"]["targets"][0]["expr"]
    assert age.startswith("time() - ")
    table = by_title["Per-instance hit rate"]
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


@pytest.fixture
def serve_port(redis_url: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conduit_otel_cache.cli",
            "serve",
            "--redis-url",
            redis_url,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0",
            "CONDUIT_CACHE_STATS_AGGREGATION_INTERVAL": "1",
        },  # per-instance pass every 1 s
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prometheus(serve_port: int, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on loopback scraping `serve` every second, with grafana/alerts.yml."""
    binary = tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}:\n{log_text()}")
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log_text() -> str:
        log.flush()
        return (tmp_path / "prometheus.log").read_text()

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


TRAFFIC = {"api-1": (8, 2), "api-2": (5, 5), "api-3": (9, 1)}  # hits, misses per step


@pytest.mark.slow
def test_prometheus_runs_every_dashboard_and_rule_query(
    redis_server: RedisServer, prometheus: str
) -> None:
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
        by_region = query(prometheus, f'sum by (region) (conduit_cache_hits_total{{job="{JOB}"}})')
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
            expr = f'sum by (region) (conduit_cache_{counter}_total{{job="{JOB}"}})'

            def scraped(expr: str = expr, expected: dict[str, float] = expected) -> bool:
                got = {s["metric"]["region"]: float(s["value"][1]) for s in query(prometheus, expr)}
                return got == expected

            wait_for(f"{expr} == {expected}", scraped, timeout=15)
        hits = sum(t[r]["hits"] for t in totals.values() for r in t)
        cluster = query(prometheus, f'sum(conduit_cache_hits_total{{job="{JOB}"}})')
        assert float(cluster[0]["value"][1]) == hits

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
        redis_server.kill()
        wait_for(
            "ConduitCacheRedisDown expression to select",
            lambda: query(prometheus, by_name["ConduitCacheRedisDown"]),
        )
        # the counters survive in Prometheus unchanged while Redis is down
        cluster = query(prometheus, f'sum(conduit_cache_hits_total{{job="{JOB}"}})')
        assert float(cluster[0]["value"][1]) == hits
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

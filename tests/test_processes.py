"""End to end across processes: instances, `serve`, parsed /metrics and /health."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache.embedded import free_port

from .conftest import wait_for

HERE = Path(__file__).parent
PLAN = {"api-1": (120, 30), "api-2": (300, 100), "api-3": (45, 5)}


def start_instance(url: str, instance_id: str, hits: int, misses: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "instance_process.py"), url, instance_id, str(hits),
         str(misses)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
    return proc


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def serve(redis_url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url", redis_url,
         "--port", str(port)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0",
             "CONDUIT_CACHE_STATS_AGGREGATION_INTERVAL": "0.1"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()  # SIGTERM: clean stop
    assert proc.wait(10) == 0
    assert proc.stdout.read().strip() == "stopped"


def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(base + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_three_processes_serve_metrics_and_health(redis_url: str, serve: str) -> None:
    procs = {i: start_instance(redis_url, i, *counts) for i, counts in PLAN.items()}
    try:
        m = metrics(serve)
        region = (("region", "ProviderResponses"),)
        hits = sum(h for h, _ in PLAN.values())
        misses = sum(mi for _, mi in PLAN.values())
        assert m[("conduit_cache_hits_total", region)] == hits
        assert m[("conduit_cache_misses_total", region)] == misses
        assert m[("conduit_cache_sets_total", region)] == misses
        assert m[("conduit_cache_size_bytes", region)] == 1000 * (hits + misses)
        assert m[("conduit_cache_hit_ratio", region)] == pytest.approx(hits / (hits + misses))
        assert ("conduit_cache_hit_rate", region) not in m  # one concept: the ratio
        assert m[("conduit_cache_response_time_seconds_count", region)] == hits + misses
        inf = (("le", "+Inf"), ("region", "ProviderResponses"))
        assert m[("conduit_cache_response_time_seconds_bucket", inf)] == hits + misses
        assert m[("conduit_cache_instances_active", ())] == 3
        assert m[("conduit_cache_redis_up", ())] == 1

        def instance_ratios() -> dict[str, float]:
            return {dict(k[1])["instance_id"]: v for k, v in metrics(serve).items()
                    if k[0] == "conduit_cache_instance_hit_ratio"}  # fmt: skip

        # the per-instance pass runs in the background every aggregation_interval
        ratios = wait_for(lambda: len(instance_ratios()) == 3 and instance_ratios())
        assert ratios == {i: pytest.approx(h / (h + mi)) for i, (h, mi) in PLAN.items()}
        status, body = get(serve + "/health/cache_statistics")
        check = json.loads(body)
        assert check["data"]["ActiveInstances"] == 3 and check["data"]["RedisConnected"] is True
        assert status == (503 if check["status"] == "Unhealthy" else 200)
        status, body = get(serve + "/health")
        assert json.loads(body)["results"]["cache_statistics"]["data"]["ActiveInstances"] == 3
        # one instance shuts down cleanly, one crashes: totals stay, live count drops
        procs["api-1"].stdin.close()  # type: ignore[union-attr]
        assert procs["api-1"].wait(10) == 0
        procs["api-2"].kill()
        procs["api-2"].wait()
        m = metrics(serve)
        assert m[("conduit_cache_hits_total", region)] == hits
        assert m[("conduit_cache_instances_active", ())] == 2  # api-2 until its heartbeat expires
        assert m[("conduit_cache_size_bytes", region)] == 1000 * (
            sum(PLAN["api-2"]) + sum(PLAN["api-3"])
        )
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_http_errors(serve: str) -> None:
    assert get(serve + "/nope")[0] == 404
    req = urllib.request.Request(serve + "/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 405
    status, body = get(serve + "/health")
    assert status == 503  # no live instance: fewer than min_active_instances
    assert json.loads(body)["status"] == "Unhealthy"


def test_request_flood_costs_one_aggregation(make_stats, redis_url: str) -> None:
    from conduit_otel_cache.config import Settings
    from conduit_otel_cache.serve.service import ExporterService

    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.flush()
    service = ExporterService(Settings.load(redis_url=redis_url, aggregation_cache_ttl=30), port=0)
    service.start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        for n in range(150):  # bounded flood on loopback
            path = ("/metrics", "/health", "/health/cache_statistics")[n % 3]
            assert get(base + path)[0] == 200
    finally:
        service.stop()
    assert service.aggregator.aggregations == 1


def test_first_background_refresh_shares_the_fresh_view(make_stats, redis_url: str) -> None:
    """The background refresh a first scrape starts takes the view read moments before (as
    ``serve``'s start-up reads one) instead of reading Redis again: the race behind a rare
    second read in the flood above, made certain (the background thread refreshes first)."""
    from prometheus_client.exposition import choose_encoder

    from conduit_otel_cache.config import Settings
    from conduit_otel_cache.serve.service import ExporterService

    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.flush()
    service = ExporterService(Settings.load(redis_url=redis_url, aggregation_cache_ttl=30), port=0)
    try:
        view = service.aggregator.view()  # what serve's start-up reads
        renderings = service.exposition.renderings
        encoder, content_type = choose_encoder("")
        renderings.want((content_type, False), encoder)  # no scrape takes the lock first
        wait_for(lambda: renderings.current is not None)
        assert renderings.current is not None and renderings.current.view is view
    finally:
        service.stop()
    assert service.aggregator.aggregations == 1


DOCS = HERE.parent / "docs"


def documented_series(*, otlp: bool = False) -> set[str]:
    """The series of docs/metrics.md's table (``_misses_total`` after ``conduit_cache_hits_total``
    is ``conduit_cache_misses_total``; ``process_*`` a prefix); those served "only with
    `otlp_endpoint`" when ``otlp``."""
    section = (DOCS / "metrics.md").read_text().split("## Series", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in re.findall(r"^\| `.*$", section, re.M):
        if ("only with `otlp_endpoint`" in line) != otlp:
            continue
        row = line.split("|")[1]
        first = ""
        for name in re.findall(r"`([a-z_*]+)[^`]*`", row):
            if name.startswith("_"):
                name = first.rsplit("_", 2)[0] + name if first.endswith("_total") else name
            else:
                first = name
            names.add(name)
    return names


def served_series(body: str) -> set[str]:
    """Family names (counters with ``_total``); a counter's ``_created`` gauge is its own."""
    out = set()
    for family in text_string_to_metric_families(body):
        out.add(family.name + ("_total" if family.type == "counter" else ""))
    return {
        n for n in out if not (n.endswith("_created") and n[: -len("_created")] + "_total" in out)
    }


def shape(value: Any) -> Any:
    """Keys and value types of a JSON value (what a documented example must match)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, float | int) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


def documented_replies() -> dict[str, Any]:
    """``<!-- reply: GET /path -->`` followed by a JSON block, in every doc."""
    found = {}
    for doc in [HERE.parent / "README.md", *DOCS.glob("*.md")]:
        pattern = r"<!-- reply: GET (\S+) -->\s*```json\n(.*?)```"
        for path, body in re.findall(pattern, doc.read_text(), re.S):
            found[path] = json.loads(body)
    return found


def test_docs_match_what_serve_answers(redis_url: str, serve: str) -> None:
    """Every series docs/metrics.md lists is on a real /metrics and every conduit series
    there is listed; every documented JSON reply has the keys and types of the real one."""
    procs = {i: start_instance(redis_url, i, *counts) for i, counts in PLAN.items()}
    client = redis.Redis.from_url(redis_url)
    # the conditional series: a missing instance, a malformed entry
    client.zadd("conduit:cache:instances", {"ghost": float(client.time()[0]) - 600})
    client.sadd("conduit:cache:regions", "Broken")
    client.hset("conduit:cache:stats:aggregated:Broken", "hit_count", "garbage")
    now = float(client.time()[0])  # and a reported data loss, an application's failed flush
    client.hset("conduit:cache:stats:aggregated:ProviderResponses",
                mapping={"lost_count": 1, "lost_since": now, "lost_at": now})  # fmt: skip
    client.hset("conduit:cache:flush_errors", "ConnectionError", 1)
    try:
        conditional = ("conduit_cache_instance_missing_seconds", "conduit_cache_malformed_entries",
                       "conduit_cache_data_losses_total",
                       "conduit_cache_instances_flush_errors_total")  # fmt: skip
        wait_for(lambda: all(n in get(serve + "/metrics")[1] for n in conditional))
        served = served_series(get(serve + "/metrics")[1])
        documented = documented_series()
        prefixes = tuple(n[:-1] for n in documented if n.endswith("*"))
        missing = {n for n in documented if not n.endswith("*")} - served
        assert not missing, f"documented, not served: {missing}"
        undocumented = {n for n in served if n not in documented and not n.startswith(prefixes)}
        assert not undocumented, f"served, not documented: {undocumented}"
        replies = documented_replies()
        assert {"/health", "/health/cache_statistics"} <= set(replies)
        for path, example in replies.items():
            _, body = get(serve + path)
            assert shape(json.loads(body)) == shape(example), path
    finally:
        client.close()
        for proc in procs.values():
            proc.kill()
            proc.wait()

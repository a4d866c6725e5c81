"""OpenTelemetry auto-configuration: OTEL_METRICS_EXPORTER=conduit_redis, then setup() on it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import redis
from opentelemetry.sdk._configuration import _import_exporters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader

from conduit_otel_cache import ConfigError, Settings, setup
from conduit_otel_cache.autoconfig import ConduitRedisMetricExporter


def test_entry_point_is_found_by_the_sdk() -> None:
    (point,) = entry_points(group="opentelemetry_metrics_exporter", name="conduit_redis")
    assert point.load() is ConduitRedisMetricExporter
    _, metric_exporters, _ = _import_exporters([], ["conduit_redis"], [])
    assert metric_exporters == {"conduit_redis": ConduitRedisMetricExporter}


def test_exporter_needs_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDUIT_CACHE_STATS_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="redis_url"):
        ConduitRedisMetricExporter()


def test_export_interval_must_fit_instance_timeout(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("CONDUIT_CACHE_STATS_REDIS_URL", redis_url)
    monkeypatch.setenv("CONDUIT_CACHE_STATS_INSTANCE_TIMEOUT", "30")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    with pytest.raises(ConfigError, match="instance_timeout"):
        ConduitRedisMetricExporter()


def test_setup_reuses_the_write_through_on_the_provider(redis_url: str, r: redis.Redis) -> None:
    settings = Settings.load(redis_url=redis_url, instance_id="a", flush_interval=None)
    exporter = ConduitRedisMetricExporter(settings)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])  # no views, as the SDK builds it
    try:
        with pytest.raises(ConfigError, match="instance_id"):
            setup(meter_provider=provider, redis_url=redis_url, instance_id="b", set_global=False)
        stats = setup(
            meter_provider=provider,
            redis_url=redis_url,
            instance_id="a",
            set_global=False,
            flush_interval=None,
            aggregation_cache_ttl=0,
        )
        assert stats.exporter is exporter
        stats.record_hit("r", 0.001)
        stats.record_miss("r", 0.2)
        assert stats.flush()
        assert exporter.flush_count == 1
        fields = r.hgetall("conduit:cache:stats:a:r")
        assert (fields["hit_count"], fields["miss_count"]) == ("1", "1")
        # the response times reach Redis as a histogram although the provider has no views
        assert (fields["le:0.001"], fields["le:0.25"]) == ("1", "1")
        assert float(fields["rt_sum"]) == pytest.approx(0.201)
        assert r.hget("conduit:cache:instance:a", "token") == exporter.token
        assert stats.cluster_statistics("r").hit_count == 1
        stats.shutdown()  # the provider is not the handle's: it keeps writing through
        assert r.exists("conduit:cache:stats:a:r") == 1
    finally:
        provider.shutdown()
    assert r.exists("conduit:cache:stats:a:r") == 0  # the exporter deregistered
    assert r.hget("conduit:cache:stats:aggregated:r", "hit_count") == "1"


def test_write_through_on_another_provider_is_not_shared(redis_url: str, r: redis.Redis) -> None:
    settings = Settings.load(redis_url=redis_url, instance_id="other", flush_interval=None)
    exporter = ConduitRedisMetricExporter(settings)
    other = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)]
    )
    mine = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        stats = setup(
            meter_provider=mine, redis_url=redis_url, instance_id="mine", set_global=False,
            flush_interval=None, aggregation_cache_ttl=0,
        )  # fmt: skip
        assert stats.exporter is not exporter  # its own write-through: `mine` has none
        for _ in range(10):
            stats.record_hit("r", 0.001)
        for _ in range(3):
            assert stats.flush()
            other.force_flush()
        assert r.hget("conduit:cache:stats:aggregated:r", "hit_count") == "10"
        assert r.hget("conduit:cache:instance:mine", "token") == stats.exporter.token
        stats.shutdown()
    finally:
        other.shutdown()
        mine.shutdown()


def _run_app(source: str, tmp_path: Path, redis_url: str) -> subprocess.Popen[str]:
    """``source`` in a fresh interpreter configured by the SDK for ``conduit_redis``."""
    script = tmp_path / "app.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CONDUIT_"))}
    env |= {
        "OTEL_METRICS_EXPORTER": "conduit_redis",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRIC_EXPORT_INTERVAL": "10000",
        "CONDUIT_CACHE_STATS_REDIS_URL": redis_url,
        "CONDUIT_CACHE_STATS_INSTANCE_ID": "auto-1",
    }
    return subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


APP = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import metrics
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    _OTelSDKConfigurator().configure()
    from conduit_otel_cache import setup

    provider = metrics.get_meter_provider()
    stats = setup(meter_provider=provider)
    for _ in range(5):
        stats.record_hit("Users", 0.001)
    for _ in range(2):
        stats.record_miss("Users", 0.02)
    stats.record_set("Users")
    stats.record_set("Users")
    stats.record_set("Users")
    stats.record_eviction("Users")
    stats.set_size_bytes("Users", 2048)
    provider.force_flush()
    flushed = stats.flush()
    print(json.dumps({
        "exporter": type(stats.exporter).__name__,
        "token": stats.exporter.token,
        "flush_count": stats.exporter.flush_count,
        "flushed": flushed,
        "cluster_hits": stats.cluster_statistics("Users").hit_count,
    }), flush=True)
    sys.stdin.readline()  # the test reads Redis while this process is alive
    """
)


def test_auto_configured_sdk_writes_through_once(
    tmp_path: Path, redis_url: str, r: redis.Redis
) -> None:
    proc = _run_app(APP, tmp_path, redis_url)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        report = json.loads(line)
        assert report["exporter"] == "ConduitRedisMetricExporter"
        assert report["flushed"] is True and report["flush_count"] == 2
        assert report["cluster_hits"] == 5

        expected = {"hit_count": "5", "miss_count": "2", "set_count": "3",
                    "eviction_count": "1", "size_bytes": "2048"}  # fmt: skip
        own = r.hgetall("conduit:cache:stats:auto-1:Users")
        total = r.hgetall("conduit:cache:stats:aggregated:Users")
        assert {k: own[k] for k in expected} == expected
        assert {k: total[k] for k in expected} == expected  # not doubled by a 2nd write path
        assert total["instance_count"] == "1"
        assert (own["le:0.001"], own["le:0.025"]) == ("5", "2")
        assert r.hget("conduit:cache:instance:auto-1", "token") == report["token"]
        assert r.zrange("conduit:cache:instances", 0, -1) == ["auto-1"]

        _, err = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "another live process" not in err
    # at exit the SDK shut its provider down: the exporter deregistered, counters stayed
    assert r.zrange("conduit:cache:instances", 0, -1) == []
    assert r.exists("conduit:cache:stats:auto-1:Users") == 0
    total = r.hgetall("conduit:cache:stats:aggregated:Users")
    assert (total["hit_count"], total["miss_count"]) == ("5", "2")
    assert (total["instance_count"], total["size_bytes"]) == ("0", "0")


REPEATED_FLUSHES = textwrap.dedent(
    """
    import json
    from opentelemetry import metrics
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    _OTelSDKConfigurator().configure()
    from conduit_otel_cache import setup

    provider = metrics.get_meter_provider()
    stats = setup(meter_provider=provider, aggregation_cache_ttl=0)
    for _ in range(10):
        stats.record_hit("Users", 0.001)
    hits = []
    for _ in range(3):  # the SDK's reader and the handle's flush, alternately
        provider.force_flush()
        stats.flush()
        hits.append(stats.cluster_statistics("Users").hit_count)
    print(json.dumps({"hits": hits, "token": stats.exporter.token}), flush=True)
    """
)


def test_auto_configured_sdk_counts_each_hit_once_over_many_flushes(
    tmp_path: Path, redis_url: str, r: redis.Redis
) -> None:
    """Two write paths with two tokens made every flush look like a restart that adds the
    cumulative values again (10 hits became 60 with opentelemetry-sdk 1.42.1)."""
    proc = _run_app(REPEATED_FLUSHES, tmp_path, redis_url)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["hits"] == [10, 10, 10]
    assert r.hget("conduit:cache:stats:aggregated:Users", "hit_count") == "10"  # after exit
    assert "another live process" not in err

"""The ``mode`` option (local / distributed / hybrid) and ``enabled=False``, on a real Redis."""

from __future__ import annotations

import gc
import time
import timeit

import pytest
import redis
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider

from conduit_otel_cache import (
    CacheStatistics,
    ConfigError,
    Settings,
    Statistics,
    setup,
)
from conduit_otel_cache.embedded import free_port
from conduit_otel_cache.recorder import NullRecorder

from .conftest import MakeStats


def _connections(r: redis.Redis) -> int:
    return int(r.info("stats")["total_connections_received"])


def _record(stats: CacheStatistics, region: str = "Geo") -> None:
    stats.record_hit(region, 0.001)
    stats.record_hit(region, 0.002)
    stats.record_miss(region, 0.004)
    stats.record_set(region)
    stats.record_eviction(region)
    stats.set_size_bytes(region, 2048)


# -- configuration ------------------------------------------------------------------------


def test_mode_defaults_to_distributed_with_redis_url_else_local() -> None:
    assert Settings.load({}).mode == "local"
    assert Settings.load({}, redis_url="redis://h:1/0").mode == "distributed"
    env = {"CONDUIT_CACHE_STATS_MODE": "Hybrid", "CONDUIT_CACHE_STATS_REDIS_URL": "redis://h:1"}
    assert Settings.load(env).mode == "hybrid"
    assert Settings.load(env, mode="local").mode == "local"  # keyword wins
    assert Settings.load({}).enabled is True
    assert Settings.load({"CONDUIT_CACHE_STATS_ENABLED": "false"}).enabled is False


@pytest.mark.parametrize(
    ("options", "env", "named"),
    [
        ({"mode": "distributed"}, {}, "mode"),
        ({"mode": "hybrid"}, {}, "mode"),
        ({"mode": "cluster", "redis_url": "redis://h:1"}, {}, "mode"),
        ({"mode": 3}, {}, "mode"),
        ({}, {"CONDUIT_CACHE_STATS_MODE": "distributed"}, "mode"),
        ({}, {"CONDUIT_CACHE_STATS_ENABLED": "perhaps"}, "CONDUIT_CACHE_STATS_ENABLED"),
    ],
)
def test_invalid_mode_or_enabled_fails_naming_the_option(
    options: dict, env: dict, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.load(env, **options)


# -- mode=local ---------------------------------------------------------------------------


def test_local_mode_with_unreachable_redis_url_never_touches_redis() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    stats = setup(redis_url=dead, mode="local", instance_id="solo", set_global=False,
                  flush_interval=None)  # fmt: skip
    try:
        assert stats.exporter is None and stats.aggregator is None
        _record(stats)
        started = time.perf_counter()
        assert stats.flush() is False  # nothing to write to; returns at once
        assert time.perf_counter() - started < 0.05  # a real connect attempt retries ~100 ms
        cluster = stats.cluster_statistics("Geo")
        assert (cluster.hit_count, cluster.miss_count, cluster.size_bytes) == (2, 1, 2048)
        assert cluster == stats.local_statistics("Geo")
        assert stats.flush_errors == 0
    finally:
        stats.shutdown()


def test_local_mode_writes_no_key_and_opens_no_connection(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    before = _connections(r)
    stats = make_stats("solo", mode="local")
    _record(stats)
    assert stats.flush() is False
    assert stats.cluster_statistics("Geo").hit_count == 2
    stats.shutdown()
    assert r.dbsize() == 0
    assert _connections(r) == before  # not even a connect


def test_distributed_is_the_default_and_writes_through(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    stats = make_stats("d-1")
    assert stats.settings.mode == "distributed"
    _record(stats)
    assert stats.flush() is True
    assert r.hget("conduit:cache:stats:d-1:Geo", "hit_count") == "2"


def test_hybrid_writes_through_and_reads_both_views(make_stats: MakeStats, r: redis.Redis) -> None:
    a = make_stats("h-1", mode="hybrid")
    b = make_stats("h-2", mode="hybrid")
    _record(a)
    b.record_hit("Geo")
    assert a.flush() and b.flush()
    assert r.zrange("conduit:cache:instances", 0, -1) == ["h-1", "h-2"]
    assert a.local_statistics("Geo").hit_count == 2  # this process
    assert a.cluster_statistics("Geo").hit_count == 3  # the whole cluster


# -- enabled=False ------------------------------------------------------------------------


def _meter_providers() -> int:
    gc.collect()
    return sum(isinstance(o, MeterProvider) for o in gc.get_objects())


def test_disabled_handle_is_a_no_op_without_provider_or_redis(
    r: redis.Redis, redis_url: str
) -> None:
    connections, providers, global_provider = (
        _connections(r), _meter_providers(), metrics.get_meter_provider())  # fmt: skip
    stats = setup(redis_url=redis_url, enabled=False, instance_id="off")  # set_global default
    assert isinstance(stats, CacheStatistics) and isinstance(stats.recorder, NullRecorder)
    assert stats.exporter is None and stats.aggregator is None
    _record(stats)
    with stats.timed_lookup("Geo") as lookup:
        lookup.hit()
    assert stats.snapshot() == {}
    assert stats.local_statistics("Geo").hit_count == 0
    assert stats.cluster_statistics("Geo") == Statistics()
    assert stats.per_instance_statistics("Geo") == {}
    assert stats.cluster_view().regions == {}
    assert stats.flush() is False and stats.flush_errors == 0
    stats.shutdown()
    assert _meter_providers() == providers
    assert metrics.get_meter_provider() is global_provider
    assert _connections(r) == connections
    assert r.dbsize() == 0


def test_disabled_by_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDUIT_CACHE_STATS_ENABLED", "false")
    stats = setup(instance_id="off")
    assert isinstance(stats.recorder, NullRecorder)
    stats.record_miss("Geo", 0.5)
    assert stats.local_statistics("Geo").miss_count == 0


def test_disabled_record_costs_less_than_enabled_record() -> None:
    off = setup(enabled=False, instance_id="off")
    on = setup(set_global=False, flush_interval=None, instance_id="on")
    try:
        on.record_hit("Geo")  # first event of the thread and region is the slow path

        def best(fn: object) -> float:
            return min(timeit.repeat(fn, number=20_000, repeat=7))  # type: ignore[arg-type]

        disabled = best(lambda: off.record_hit("Geo", 0.001))
        enabled = best(lambda: on.record_hit("Geo", 0.001))
        assert disabled < enabled, (disabled, enabled)
        assert on.local_statistics("Geo").hit_count > 1 and off.snapshot() == {}
    finally:
        on.shutdown()


def test_local_mode_stats_api_says_there_is_no_cluster_view(make_stats: MakeStats) -> None:
    """``/api/cache/stats/distributed`` of a ``local`` instance answers 503 naming the mode,
    not this instance's numbers as if they were the cluster's."""
    stats = make_stats("solo", mode="local")
    _record(stats)
    replies: list[str] = []
    app = stats.wsgi_app()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/cache/stats/distributed"}
    body = b"".join(app(environ, lambda status, headers: replies.append(status)))
    assert replies == ["503 Service Unavailable"]
    assert "mode local: no cluster view here" in body.decode()
    environ["PATH_INFO"] = "/api/cache/stats/local"
    assert b'"Geo"' in b"".join(app(environ, lambda status, headers: replies.append(status)))
    stats.shutdown()

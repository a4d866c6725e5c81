"""A `serve` replica cut off from Redis (through a real TCP proxy) publishes no cluster
series, only its own (``redis_up`` 0, data age, health), so that its last good values never
mask the replicas that read Redis; it publishes them again once it reads Redis again. Missing
instances are named, and a malformed entry is counted once, not at every read."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import Settings
from conduit_otel_cache.health import evaluate
from conduit_otel_cache.keys import KeySchema
from conduit_otel_cache.serve.service import ExporterService

from .conftest import MakeStats, wait_for
from .tcp_proxy import TcpProxy

#: series read from Redis: a replica publishes them only while its last read succeeded
CLUSTER = {
    "conduit_cache_hits_total",
    "conduit_cache_misses_total",
    "conduit_cache_size_bytes",
    "conduit_cache_hit_ratio",
    "conduit_cache_response_time_seconds_count",
    "conduit_cache_drift_percent",
    "conduit_cache_instance_hit_ratio",
    "conduit_cache_instances_active",
    "conduit_cache_instances_missing",
    "conduit_cache_instance_missing_seconds",
    "conduit_cache_redis_memory_bytes",
    "conduit_cache_malformed_entries",
}
#: the replica's own series, published whatever Redis does
OWN = {
    "conduit_cache_redis_up",
    "conduit_cache_health_status",
    "conduit_cache_exporter_data_age_seconds",
    "conduit_cache_last_successful_aggregation_timestamp_seconds",
    "conduit_cache_aggregation_latency_seconds",
    "conduit_cache_aggregation_errors_total",
}

KEYS = KeySchema()
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(service: ExporterService) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def proxy(redis_server: Any) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        yield proxy


@pytest.fixture
def replica(proxy: TcpProxy) -> Iterator[ExporterService]:
    """An exporter reading Redis through ``proxy``; every scrape reads Redis."""
    settings = Settings.load(redis_url=proxy.url(), aggregation_cache_ttl=0, socket_timeout=1,
                             connect_timeout=1)  # fmt: skip
    service = ExporterService(settings, port=0).start()
    yield service
    service.stop()


def test_a_replica_cut_off_from_redis_publishes_only_its_own_series(
    make_stats: MakeStats, proxy: TcpProxy, replica: ExporterService
) -> None:
    for n in (1, 2):
        stats = make_stats(f"app-{n}")
        stats.record_hit("Orders")
        stats.record_miss("Orders", 0.01)
        stats.set_size_bytes("Orders", 100)
        assert stats.flush()
    replica.aggregator.refresh_instances()
    before = scrape(replica)
    # drift is unknown (left out) while the instances have under 10 requests each
    only_when_needed = {"conduit_cache_instance_missing_seconds", "conduit_cache_malformed_entries",
                        "conduit_cache_drift_percent"}  # fmt: skip
    assert names(before) >= CLUSTER - only_when_needed
    assert names(before) >= OWN
    assert before[("conduit_cache_redis_up", ())] == 1
    assert before[("conduit_cache_instances_active", ())] == 2

    proxy.cut()
    cut = scrape(replica)
    assert cut[("conduit_cache_redis_up", ())] == 0
    assert cut[("conduit_cache_health_status", ())] == 2  # Unhealthy
    assert names(cut) >= OWN
    assert not names(cut) & CLUSTER, sorted(names(cut) & CLUSTER)
    time.sleep(0.2)  # the age to measure is the time itself
    later = scrape(replica)  # the data age keeps growing while it is cut off
    age = ("conduit_cache_exporter_data_age_seconds", ())
    assert later[age] > cut[age] >= 0

    proxy.restore()
    again = wait_for(lambda: (s := scrape(replica))[("conduit_cache_redis_up", ())] == 1 and s,
                     what="the replica to read Redis again")  # fmt: skip
    assert again[("conduit_cache_instances_active", ())] == 2
    assert again[("conduit_cache_hits_total", (("region", "Orders"),))] == 2


def test_missing_instances_are_named_and_counted_once(
    make_stats: MakeStats, replica: ExporterService, r: Any
) -> None:
    gone = make_stats("app-gone")
    gone.record_hit("Orders")
    assert gone.flush()
    # its heartbeat expires: stamped far in the past, as if the process had been killed
    beat = r.zscore(KEYS.instances, "app-gone")
    r.zadd(KEYS.instances, {"app-gone": beat - 3600})
    found = scrape(replica)
    assert found[("conduit_cache_instances_missing", ())] == 1
    missing = found[("conduit_cache_instance_missing_seconds", (("instance_id", "app-gone"),))]
    assert 3600 - 60 - 5 < missing < 3600


def test_a_malformed_entry_is_counted_once(
    make_stats: MakeStats, replica: ExporterService, r: Any
) -> None:
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    stats.record_hit("Sessions")
    assert stats.flush()
    errors = ("conduit_cache_aggregation_errors_total", ())
    assert scrape(replica)[errors] == 0
    key = KEYS.aggregate("Orders")
    assert r.hexists(key, "hit_count")
    r.hset(key, "hit_count", "x y")
    for _ in range(5):
        assert scrape(replica)[errors] == 1  # one bad entry, read five times
    found = scrape(replica)
    assert found[("conduit_cache_malformed_entries", (("key", key),))] == 1
    health = evaluate(replica.aggregator.view(), replica.settings.health)
    assert f"{key}: invalid literal" in health.check_json()["description"]  # names the key
    r.hset(KEYS.aggregate("Sessions"), "miss_count", "z")  # another bad entry
    assert scrape(replica)[errors] == 2
    r.hset(key, "hit_count", "1")  # repaired, then broken again: a new bad entry
    assert scrape(replica)[errors] == 2
    r.hset(key, "hit_count", "x y")
    assert scrape(replica)[errors] == 3

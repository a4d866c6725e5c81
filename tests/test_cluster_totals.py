"""The cluster: write-through and aggregation of many instances against a real redis-server
(tests/test_redis_cluster.py runs the same on a real Redis Cluster)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster

from conduit_otel_cache.aggregate import Aggregator
from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.keys import KeySchema
from conduit_otel_cache.report import view_json
from conduit_otel_cache.store import Store

from .conftest import MakeStats, scrape_once

REGION = "ProviderResponses"


def record(stats, hits: int, misses: int, sets: int = 0, evictions: int = 0, size: int = 0):
    for _ in range(hits):
        stats.record_hit(REGION, 0.002)
    for _ in range(misses):
        stats.record_miss(REGION, 0.03)
    for _ in range(sets):
        stats.record_set(REGION)
    for _ in range(evictions):
        stats.record_eviction(REGION)
    stats.set_size_bytes(REGION, size)


def test_three_instances_exact_in_redis_and_cluster(make_stats: MakeStats, r: redis.Redis) -> None:
    plan = {"api-1": (100, 10, 5, 1, 1000), "api-2": (200, 50, 7, 2, 2000),
            "api-3": (50, 50, 9, 3, 4000)}  # fmt: skip
    handles = {i: make_stats(i) for i in plan}
    for i, counts in plan.items():
        record(handles[i], *counts)
        assert handles[i].flush()
    for i, (h, m, s, e, size) in plan.items():
        stored = r.hgetall(f"conduit:cache:stats:{i}:{REGION}")
        assert (stored["hit_count"], stored["miss_count"], stored["set_count"],
                stored["eviction_count"], stored["size_bytes"]) == tuple(
                    str(x) for x in (h, m, s, e, size))  # fmt: skip
    cluster = handles["api-1"].cluster_statistics(REGION)
    assert cluster.hit_count == 350
    assert cluster.miss_count == 110
    assert cluster.set_count == 21
    assert cluster.eviction_count == 6
    assert cluster.size_bytes == 7000
    assert cluster.instance_count == 3
    assert cluster.response_times.count == 460
    assert cluster.hit_ratio == pytest.approx(350 / 460)
    agg = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    assert agg["hit_count"] == "350" and agg["instance_count"] == "3"
    beats = dict(r.zrange("conduit:cache:instances", 0, -1, withscores=True))
    assert set(beats) == set(plan)
    per = handles["api-2"].per_instance_statistics(REGION)
    assert {i: s.hit_count for i, s in per.items()} == {"api-1": 100, "api-2": 200, "api-3": 50}


def test_every_key_has_a_ttl(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1", statistics_ttl=3600)
    record(stats, 1, 1)
    stats.flush()
    keys = list(r.scan_iter("conduit:*"))
    assert keys
    for key in keys:
        assert 0 < r.ttl(key) <= 3600, key


def test_same_flush_twice_changes_nothing(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    record(stats, 10, 5, size=100)
    stats.flush()
    before = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    stats.flush()
    stats.flush()
    after = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    before.pop("last_aggregated"), after.pop("last_aggregated")
    assert before == after
    assert stats.cluster_statistics(REGION).hit_count == 10


def test_shutdown_keeps_counters_and_drops_live_gauges(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, 10, 0, size=100)
    record(b, 20, 0, size=200)
    a.flush(), b.flush()
    assert a.cluster_view().active_count == 2
    b.shutdown()
    b.shutdown()  # idempotent
    cluster = a.cluster_statistics(REGION)
    assert cluster.hit_count == 30  # what b counted stays in the total
    assert cluster.size_bytes == 100 and cluster.instance_count == 1
    assert a.health().data["ActiveInstances"] == 1
    assert r.zscore("conduit:cache:instances", "api-2") is None
    assert not r.exists(f"conduit:cache:stats:api-2:{REGION}")
    record(b, 5, 0)  # recording after shutdown is harmless and writes nothing
    assert not b.flush()
    assert a.cluster_statistics(REGION).hit_count == 30


def test_expired_heartbeat_leaves_live_gauges(make_stats: MakeStats, r: redis.Redis) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, 10, 0, size=100)
    record(b, 20, 0, size=200)
    a.flush(), b.flush()
    # api-2 last beat 2 minutes ago (server clock): older than instance_timeout (60 s)
    now = float(r.time()[0])
    r.zadd("conduit:cache:instances", {"api-2": now - 120})
    view = a.cluster_view()
    assert view.active_count == 1
    assert view.missing_instances == ("api-2",)
    assert view.missing_for("api-2", 60) == pytest.approx(60, abs=2)
    assert a.aggregator.instances() == (["api-1"], ["api-2"])
    cluster = view.regions[REGION]
    assert cluster.hit_count == 30 and cluster.size_bytes == 100 and cluster.instance_count == 1
    health = a.health()
    assert health.data["MissingInstances"] == 1
    assert health.status.label == "Degraded"  # missing for 60 s > missing_instance_grace
    # a late flush brings it back: gauges count again, counters are not counted twice
    b.flush()
    cluster = a.cluster_statistics(REGION)
    assert cluster.hit_count == 30 and cluster.size_bytes == 300 and cluster.instance_count == 2


def test_the_counts_hash_lists_live_instances_only(make_stats: MakeStats, r: redis.Redis) -> None:
    """The per-instance pass reads one hash per region of the live instances' hits and
    misses: a flush writes an instance's field, and shutdown, reaping and cleanup each take
    it out (the last one out deletes the hash)."""
    key = f"conduit:cache:counts:{REGION}"
    a, b, c = make_stats("api-1"), make_stats("api-2"), make_stats("api-3")
    for stats, hits, misses in ((a, 3, 1), (b, 2, 2), (c, 1, 3)):
        record(stats, hits, misses)
        assert stats.flush()
    assert r.hgetall(key) == {"api-1": "3 1", "api-2": "2 2", "api-3": "1 3"}
    record(a, 2, 0)
    assert a.flush()
    assert r.hget(key, "api-1") == "5 1"
    b.shutdown()
    assert set(r.hgetall(key)) == {"api-1", "api-3"}
    now = float(r.time()[0])
    r.zadd("conduit:cache:instances", {"api-3": now - 120})  # crashed: its heartbeat expired
    store = a.aggregator.store
    assert store.reap(60) == ["api-3"]
    assert r.hgetall(key) == {"api-1": "5 1"}
    r.zadd("conduit:cache:instances", {"api-1": now - 7200})  # gone longer than retention
    assert store.cleanup(3600) == ["api-1"]
    assert not r.exists(key)


def test_restart_with_same_id_keeps_cluster_counter_monotonic(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    first = make_stats("api-1")
    record(first, 100, 10, size=500)
    first.flush()
    first.pipeline.closed = True  # it crashed: no more flushes, no deregistration
    # a new process (new token) with the same id starts again from zero
    second = make_stats("api-1")
    record(second, 7, 3, size=50)
    second.flush()
    cluster = second.cluster_statistics(REGION)
    assert cluster.hit_count == 107 and cluster.miss_count == 13
    assert cluster.size_bytes == 50 and cluster.instance_count == 1
    record(second, 3, 0, size=60)
    second.flush()
    assert second.cluster_statistics(REGION).hit_count == 110


@pytest.mark.usefixtures("private_redis")  # stops and restarts Redis
def test_redis_down_then_back(redis_server: RedisServer, make_stats: MakeStats) -> None:
    stats = make_stats("api-1", socket_timeout=1, connect_timeout=1)
    record(stats, 10, 0)
    assert stats.flush()
    redis_server.stop()
    record(stats, 5, 5)  # never raises
    assert not stats.flush()
    assert stats.exporter.flush_errors >= 1
    health = stats.health()
    assert health.status.label == "Unhealthy" and health.data["RedisConnected"] is False
    assert health.http_status == 503
    redis_server.start()  # empty: no persistence
    assert stats.flush()
    cluster = stats.cluster_statistics(REGION)
    assert (cluster.hit_count, cluster.miss_count) == (15, 5)
    assert stats.health().data["RedisConnected"] is True


def test_drift_with_one_instance_is_zero(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    record(stats, 10, 90)
    stats.flush()
    assert stats.cluster_view().drift[REGION] == 0.0


def test_drift_is_largest_distance_to_live_cluster(make_stats: MakeStats) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, 90, 10)  # 90 %
    record(b, 50, 50)  # 50 %, cluster 70 %
    a.flush(), b.flush()
    assert a.cluster_view().drift[REGION] == pytest.approx(20.0)
    assert a.health().status.label == "Degraded"


def test_drift_is_over_the_window_since_the_previous_pass(make_stats: MakeStats) -> None:
    """A diverging instance shows at the next pass and stops showing once it is fixed
    (over lifetime ratios it would have shown 3.6 points, then stayed at 3.3)."""
    a, b = make_stats("api-1"), make_stats("api-2")
    drifts = []
    for b_hits in (900, 10, 90, 9):  # per 1000, 100, 100, 10 requests: b breaks, is fixed
        requests = 1000 if b_hits == 900 else 100 if b_hits != 9 else 10
        record(a, requests * 9 // 10, requests // 10)
        record(b, b_hits, requests - b_hits)
        a.flush(), b.flush()
        drifts.append(a.cluster_view().drift[REGION])
    assert drifts == [pytest.approx(0.0), pytest.approx(40.0), pytest.approx(0.0), 0.0]
    record(a, 9, 1)  # under 10 requests for b in this window: the last drift is kept
    record(b, 1, 4)
    a.flush(), b.flush()
    assert a.cluster_view().drift[REGION] == 0.0
    record(b, 0, 10)  # the window grew on: a 9 / 10, b 1 / 15, together 10 / 25
    a.flush(), b.flush()
    assert a.cluster_view().drift[REGION] == pytest.approx(100 * (9 / 10 - 10 / 25))


def test_key_prefix_separates_products(make_stats: MakeStats) -> None:
    a = make_stats("api-1", key_prefix="one:")
    b = make_stats("api-1", key_prefix="two:")
    record(a, 3, 0)
    record(b, 5, 0)
    a.flush(), b.flush()
    assert a.cluster_statistics(REGION).hit_count == 3
    assert b.cluster_statistics(REGION).hit_count == 5


def test_local_mode_without_redis() -> None:
    from conduit_otel_cache import setup

    stats = setup(set_global=False, instance_id="solo")
    record(stats, 4, 1)
    assert stats.local_statistics(REGION).hit_count == 4
    assert stats.cluster_statistics(REGION).hit_count == 4
    assert not stats.flush()
    stats.shutdown()


def test_drift_follows_live_instances_only(make_stats: MakeStats) -> None:
    a, b, c = make_stats("api-1"), make_stats("api-2"), make_stats("api-3")
    record(a, 90, 10)
    record(b, 50, 50)
    record(c, 70, 30)  # live cluster: 210 / 300 = 70 %
    for h in (a, b, c):
        h.flush()
    assert a.cluster_view().drift[REGION] == pytest.approx(20.0)
    assert a.cluster_view().instance_hit_ratios[REGION] == {
        "api-1": pytest.approx(0.9), "api-2": pytest.approx(0.5), "api-3": pytest.approx(0.7)
    }  # fmt: skip
    b.shutdown()  # the lifetime totals keep b's events
    view = a.cluster_view()
    assert view.drift[REGION] == pytest.approx(20.0)  # no traffic since: the last window's
    record(a, 90, 10)
    record(c, 70, 30)  # the window since the last pass: 160 / 200 = 80 %
    a.flush(), c.flush()
    view = a.cluster_view()
    assert view.drift[REGION] == pytest.approx(10.0)
    assert view.live_hit_ratios[REGION] == pytest.approx(0.8)
    assert view.regions[REGION].hit_count == 370
    assert set(view.instance_hit_ratios[REGION]) == {"api-1", "api-3"}


@pytest.mark.parametrize("protocol", [2, 3])
def test_sorted_sets_read_the_same_over_resp2_and_resp3(
    make_stats: MakeStats, redis_url: str, protocol: int
) -> None:
    """Heartbeats and hit ratios are read raw (flat on RESP2, nested on RESP3)."""
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, 30, 10)
    record(b, 10, 30)
    a.flush()
    b.flush()
    reader = make_stats("reader", redis_url=f"{redis_url}?protocol={protocol}")
    beats = reader.aggregator.store.heartbeats()
    assert set(beats.beats) == {"api-1", "api-2"} and not beats.errors
    assert all(abs(beat - beats.server_time) < 60 for beat in beats.beats.values())
    view = reader.cluster_view()
    assert view.active_count == 2 and view.missing_instances == ()
    assert view.instance_hit_ratios[REGION] == {"api-1": 0.75, "api-2": 0.25}
    assert view.drift[REGION] == pytest.approx(25.0)


def test_per_instance_series_are_capped_farthest_first(make_stats: MakeStats, redis_url: str):
    from prometheus_client.parser import text_string_to_metric_families

    for n, hits in enumerate((50, 52, 10, 95)):  # live cluster 207/400 = 51.75 %
        h = make_stats(f"api-{n}")
        record(h, hits, 100 - hits)
        h.flush()
    text = scrape_once(redis_url=redis_url, max_instance_series=2)
    series = {
        s.labels["instance_id"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "conduit_cache_instance_hit_ratio"
    }
    assert series == {"api-2": pytest.approx(0.10), "api-3": pytest.approx(0.95)}


@pytest.mark.parametrize(
    "topology", ["standalone", pytest.param("redis_cluster", marks=pytest.mark.redis_cluster)]
)
def test_two_live_processes_with_one_id_stay_exact(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """The second process that finds its explicit id written by a live one moves aside
    to <id>-<pid> before writing anything (on a Redis Cluster the first write of an
    incarnation checks the id before any region is written): the totals stay exact."""
    from .test_processes import start_instance

    if topology == "standalone":
        url, client = request.getfixturevalue("redis_url"), request.getfixturevalue("r")
    else:
        port = request.getfixturevalue("redis_cluster").servers[0].port
        url = f"redis+cluster://127.0.0.1:{port}"
        client = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
        request.addfinalizer(client.close)
    keys = KeySchema(redis_cluster=topology == "redis_cluster")
    first = start_instance(url, "api-1", 30, 10)
    second = start_instance(url, "api-1", 5, 1)
    try:
        ids = sorted(client.zrange(keys.instances, 0, -1))
        assert ids == ["api-1", f"api-1-{second.pid}"]
        totals = client.hgetall(keys.aggregate("ProviderResponses"))
        assert (totals["hit_count"], totals["miss_count"], totals["instance_count"]) == (
            "35", "11", "2")  # fmt: skip
    finally:
        for proc in (first, second):
            proc.communicate("", timeout=30)
    totals = client.hgetall(keys.aggregate("ProviderResponses"))
    assert (totals["hit_count"], totals["instance_count"]) == ("35", "0")


def test_a_view_after_invalidate_reflects_earlier_flushes_while_a_read_is_under_way(
    make_stats: MakeStats, redis_url: str
) -> None:
    writer = make_stats("writer")
    record(writer, 1, 0)
    assert writer.flush()
    settings = Settings.load(redis_url=redis_url, aggregation_cache_ttl=60.0)
    store = Store.from_settings(settings.connection)
    read, release = threading.Event(), threading.Event()

    class HeldStore:
        """The real store; a read marked ``hold`` waits after reading, before it returns."""

        hold = False

        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        @property
        def parts(self) -> list[object]:
            return [self]

        def read_cluster(self, *args: object, **kwargs: object) -> object:
            data = store.read_cluster(*args, **kwargs)  # type: ignore[arg-type]
            if self.hold:
                read.set()
                release.wait(30)
            return data

    held = HeldStore()
    aggregator = Aggregator(held, settings.aggregation)  # type: ignore[arg-type]
    assert aggregator.view().regions[REGION].hit_count == 1
    held.hold = True
    aggregator.invalidate()
    views: dict[str, int] = {}
    first = threading.Thread(
        target=lambda: views.__setitem__("first", aggregator.view().regions[REGION].hit_count)
    )
    first.start()
    assert read.wait(30)  # the first reader has read 1 hit and holds the refresh
    held.hold = False
    record(writer, 1, 0)
    assert writer.flush()
    aggregator.invalidate()
    second = threading.Thread(
        target=lambda: views.__setitem__("second", aggregator.view().regions[REGION].hit_count)
    )
    second.start()
    release.set()
    first.join(30)
    second.join(30)
    # was: the second reader got the first reader's view (1) at once, and so did every
    # reader for aggregation_cache_ttl after it
    assert views == {"first": 1, "second": 2}
    assert aggregator.view().regions[REGION].hit_count == 2
    store.close()


def test_drift_is_absent_until_the_first_per_instance_pass(
    make_stats: MakeStats, redis_url: str
) -> None:
    """An unknown drift is left out, never read as 0: ``serve``'s per-instance pass runs
    in the background, and a scrape before it must not say "no drift"."""
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, 90, 10)
    record(b, 50, 50)
    a.flush(), b.flush()
    settings = Settings.load(redis_url=redis_url)
    aggregator = Aggregator(
        Store.from_settings(settings.connection), settings.aggregation, background=True
    )
    view = aggregator.view()
    assert REGION in view.regions and REGION not in view.drift
    assert view_json(view, {})["regions"][REGION]["drift_percent"] is None
    aggregator.refresh_instances()
    aggregator.invalidate()
    assert aggregator.view().drift[REGION] == pytest.approx(20.0)


@pytest.mark.slow
def test_the_per_instance_pass_outlasting_socket_timeout_reads_in_bounded_round_trips(
    redis_url: str, r: redis.Redis
) -> None:
    """Redis answers a pipeline only when it has run all of it: a pass over many instances
    and regions in one round trip would outlast ``socket_timeout`` (10,000 instances x 40
    regions failed after the default 5 s, when it read every statistics hash). The pass
    reads in round trips of a quarter of it."""
    keys = KeySchema()
    instances, regions = 10_000, [f"r{n}" for n in range(100)]
    pipe = r.pipeline(transaction=False)
    for region in regions:
        pipe.hset(keys.counts(region), mapping={f"i{n}": f"{n} 1" for n in range(instances)})
    pipe.execute()
    timeout = 0.2
    store = Store.from_settings(
        Settings.load(redis_url=redis_url, socket_timeout=timeout).connection
    )
    began = time.monotonic()
    counts, errors = store.read_request_counts(regions)
    took = time.monotonic() - began
    assert took > timeout, f"the pass took {took:.2f} s: too small to outlast socket_timeout"
    assert errors == [] and set(counts) == set(regions)
    assert all(len(counts[region]) == instances for region in regions)
    assert counts["r7"]["i42"] == "42 1"

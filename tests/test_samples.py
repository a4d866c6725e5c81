"""Raw response-time samples: bounded per instance and region, written by the flush."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import redis

from conduit_otel_cache.cli import main
from conduit_otel_cache.config import DEFAULT_BUCKETS
from conduit_otel_cache.recorder import FOLD_AT, Recorder

from .conftest import MakeStats

REGION = "ProviderResponses"
KEY = f"conduit:cache:stats:api-1:{REGION}:response_times"


def test_recorder_keeps_the_latest_samples_of_every_thread() -> None:
    rec = Recorder(DEFAULT_BUCKETS, max_samples=4)
    for ms in range(1, 4):
        rec.record_hit(REGION, ms / 1000)
    worker = threading.Thread(target=lambda: rec.record_miss(REGION, 0.5))
    worker.start()
    worker.join()
    rec.snapshot()  # folds the finished thread; its sample waits for the drain
    assert sorted(rec.drain_samples()[REGION]) == [0.001, 0.002, 0.003, 0.5]
    assert rec.drain_samples() == {}  # taken once
    for ms in range(1, 11):
        rec.record_hit(REGION, ms / 1000)
    assert rec.drain_samples()[REGION] == [0.007, 0.008, 0.009, 0.010]  # capped: the latest
    rec.record_set(REGION)  # events without a response time keep no sample
    assert rec.drain_samples() == {}


def test_a_regions_samples_keep_no_response_time_object_alive() -> None:
    """A region's raw samples keep the values of its response times, not the objects the
    application passed: once folded, those are freed (a float object kept for each event,
    until the next flush, would scatter the heap the application allocates from)."""
    rec = Recorder(DEFAULT_BUCKETS, max_samples=1000)
    seconds = float("0.0123")  # an object of its own
    held = sys.getrefcount(seconds)
    for _ in range(FOLD_AT + 3):  # FOLD_AT folded by the last recording thread, 3 waiting
        rec.record_hit(REGION, seconds)
    assert sys.getrefcount(seconds) == held + 3
    rec.snapshot()  # a reader folds the rest
    assert sys.getrefcount(seconds) == held
    assert rec.drain_samples()[REGION] == [seconds] * (FOLD_AT + 3)


def test_flush_appends_capped_samples(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1", max_response_time_samples=5, response_time_sample_ttl=600)
    for ms in range(1, 8):
        stats.record_hit(REGION, ms / 1000)
    assert stats.flush()
    assert [float(x) for x in r.lrange(KEY, 0, -1)] == [0.003, 0.004, 0.005, 0.006, 0.007]
    assert 0 < r.ttl(KEY) <= 600
    assert stats.flush()  # nothing new: nothing appended
    assert r.llen(KEY) == 5
    stats.record_miss(REGION, 0.25)
    assert stats.flush()
    assert [float(x) for x in r.lrange(KEY, -2, -1)] == [0.007, 0.25]
    assert r.llen(KEY) == 5
    assert stats.cluster_statistics(REGION).response_times.count == 8  # histogram is exact


@pytest.mark.usefixtures("private_redis")  # stops and restarts Redis
def test_samples_survive_a_failed_flush(make_stats: MakeStats, redis_server, r) -> None:
    stats = make_stats("api-1", socket_timeout=0.5, connect_timeout=0.5)
    stats.record_hit(REGION, 0.002)
    redis_server.stop()
    assert not stats.flush()
    redis_server.start()
    stats.record_hit(REGION, 0.003)
    assert stats.flush()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert [float(x) for x in client.lrange(KEY, 0, -1)] == [0.002, 0.003]


def test_tracking_off_keeps_no_list(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1", enable_response_time_tracking=False)
    stats.record_hit(REGION, 0.002)
    assert stats.flush()
    assert not r.exists(KEY)
    assert stats.cluster_statistics(REGION).response_times.count == 1


def test_shutdown_removes_the_samples(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    stats.record_hit(REGION, 0.002)
    stats.flush()
    assert r.exists(KEY)
    stats.shutdown()
    assert not r.exists(KEY)


def test_stats_samples_command(make_stats: MakeStats, redis_url: str, capsys) -> None:
    stats = make_stats("api-1")
    for ms in (1, 2, 3):
        stats.record_hit(REGION, ms / 1000)
    stats.flush()
    assert main(["stats", "--redis-url", redis_url, "--samples", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples_seconds"][REGION]["api-1"] == [0.002, 0.003]
    assert main(["stats", "--redis-url", redis_url, "--samples", "2"]) == 0
    assert "api-1  last 2 ms: 2.00 3.00" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_sample_count_is_rejected(bad: int) -> None:
    from conduit_otel_cache import ConfigError, Settings

    with pytest.raises(ConfigError, match="max_response_time_samples"):
        Settings.load({}, max_response_time_samples=bad)

"""dogpile.cache through RecordingProxy: the memory backend, and the Redis backend (with and
without its distributed lock) on a real Redis; get_or_create's re-check under its lock, soft
invalidation and two threads regenerating one key."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations.dogpile import RecordingProxy, instrument

from .conftest import MakeStats, wait_for
from .test_integrations_recording import BrokenStats


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int]:
    """(hits, misses, sets, evictions, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.response_times.count


def exercise(region: CacheRegion) -> None:
    """The same calls on any backend; the expected counts are in the tests."""
    made: list[str] = []

    def creator(key: str) -> Any:
        def create() -> str:
            made.append(key)
            return f"made {key}"

        return create

    assert region.get("a") is NO_VALUE  # miss
    region.set("a", "1")  # set
    assert region.get("a") == "1"  # hit
    assert region.get_or_create("b", creator("b")) == "made b"  # miss (re-check not counted), set
    assert region.get_or_create("b", creator("b")) == "made b"  # hit
    assert region.get_multi(["a", "b", "x"]) == ["1", "made b", NO_VALUE]  # 2 hits, 1 miss
    region.set_multi({"c": "3", "d": "4"})  # 2 sets
    assert region.get_or_create_multi(["c", "e"], lambda *keys: [f"m{k}" for k in keys]) == [
        "3",
        "me",
    ]  # hit, miss, set
    region.delete("a")  # nothing
    assert region.get("a") is NO_VALUE  # miss

    @region.cache_on_arguments()
    def square(n: int) -> int:
        made.append(str(n))
        return n * n

    assert [square(3), square(3)] == [9, 9]  # miss + set, hit
    assert made == ["b", "3"]


# hits, misses, sets, evictions, timed lookups of exercise()
COUNTS = (6, 6, 6, 0, 12)


def test_memory_backend(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    region = make_region(name="Users").configure("dogpile.cache.memory")
    instrument(region, stats)  # region: the region's name
    assert isinstance(region.backend, RecordingProxy)
    exercise(region)
    assert counts(stats, "Users") == COUNTS
    assert stats.flush()
    fields = r.hgetall("conduit:cache:stats:api-1:Users")
    assert (fields["hit_count"], fields["miss_count"], fields["set_count"]) == ("6", "6", "6")


@pytest.mark.parametrize("distributed_lock", [False, True])
def test_redis_backend(make_stats: MakeStats, redis_server: Any, distributed_lock: bool) -> None:
    stats = make_stats("api-1")
    region = make_region().configure(
        "dogpile.cache.redis",
        arguments={"host": "127.0.0.1", "port": redis_server.port, "db": 5,
                   "distributed_lock": distributed_lock,
                   "thread_local_lock": not distributed_lock},
        wrap=[RecordingProxy(stats, "Pages")],
    )  # fmt: skip
    exercise(region)
    assert counts(stats, "Pages") == COUNTS
    data = redis.Redis(port=redis_server.port, db=5, decode_responses=True)
    try:  # the values really are in Redis (the lock keys are gone again)
        assert sorted(data.keys()) == ["b", "c", "d", "e", f"{__name__}:square|3"]
    finally:
        data.close()


def test_soft_invalidation_is_a_hit_then_a_set(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    region = make_region(name="Soft").configure("dogpile.cache.memory", expiration_time=3600)
    instrument(region, stats, "Renamed")
    values = iter(["v1", "v2"])
    assert region.get_or_create("k", lambda: next(values)) == "v1"  # miss, set
    region.invalidate(hard=False)  # the value stays, but dogpile regenerates it
    assert region.get_or_create("k", lambda: next(values)) == "v2"  # hit of the backend, set
    assert counts(stats, "Renamed") == (1, 1, 2, 0, 2)
    assert counts(stats, "Soft") == (0, 0, 0, 0, 0)


def test_two_threads_regenerating_one_key(make_stats: MakeStats) -> None:
    """B misses while A creates the value; B then waits for A's lock and re-reads: two
    lookups that missed, one value made and written."""
    stats = make_stats("api-1")
    region = make_region(name="Race").configure("dogpile.cache.memory")
    instrument(region, stats)
    creating, release = threading.Event(), threading.Event()
    made: list[str] = []

    def slow() -> str:
        made.append("A")
        creating.set()
        assert release.wait(10)
        return "value"

    results: list[str] = []
    a = threading.Thread(target=lambda: results.append(region.get_or_create("k", slow)))
    b = threading.Thread(target=lambda: results.append(region.get_or_create("k", slow)))
    a.start()
    assert creating.wait(10)
    b.start()
    wait_for(lambda: stats.local_statistics("Race").miss_count == 2)  # B's first read
    release.set()
    a.join(10)
    b.join(10)
    assert results == ["value", "value"] and made == ["A"]
    assert counts(stats, "Race") == (0, 2, 1, 0, 2)


def test_failing_statistics_never_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    region = make_region(name="Broken").configure("dogpile.cache.memory")
    instrument(region, BrokenStats())
    exercise(region)
    assert "recording cache statistics of region 'Broken' failed" in caplog.text


def test_bad_arguments(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    region = make_region().configure("dogpile.cache.memory")
    with pytest.raises(ValueError, match=r"make_region\(name=\.\.\.\)"):
        instrument(region, stats)
    with pytest.raises(ValueError, match=r"^RecordingProxy region: region 'a b'"):
        RecordingProxy(stats, "a b")
    with pytest.raises(ValueError, match=r"^RecordingProxy stats must be"):
        RecordingProxy(object(), "R")  # type: ignore[arg-type]

"""aiocache with RecordingPlugin, under a running event loop: SimpleMemoryCache, RedisCache on a
real Redis, the ``caches`` configuration, and an event loop that recording never blocks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from aiocache import RedisCache, SimpleMemoryCache, cached, caches

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations.aiocache import RecordingPlugin

from .conftest import MakeStats
from .test_integrations_recording import BrokenStats

#: For the dotted-path form of ``stats`` in ``caches.set_config``.
DOTTED_STATS: CacheStatistics | None = None


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int]:
    """(hits, misses, sets, evictions, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.response_times.count


async def exercise(cache: Any) -> None:
    """The same calls on any backend; the expected counts are in the tests."""
    assert await cache.get("a") is None  # miss
    assert await cache.get("a", default="d") == "d"  # miss (the default came back)
    assert await cache.get("a", "d") == "d"  # miss (default given positionally)
    assert await cache.set("a", "1")  # set
    assert await cache.get("a") == "1"  # hit
    assert await cache.get("a", default="d") == "1"  # hit
    assert await cache.multi_get(["a", "x", "y"]) == ["1", None, None]  # hit, 2 misses
    assert await cache.add("b", "2")  # set
    with pytest.raises(ValueError):
        await cache.add("b", "3")  # present: raises, nothing counted
    assert await cache.multi_set([("c", "3"), ("d", "4")])  # 2 sets
    assert await cache.increment("n", 2) == 2  # set
    assert await cache.exists("a")  # nothing
    assert await cache.delete("a") == 1  # nothing
    assert await cache.expire("b", 60)  # nothing


# hits, misses, sets, evictions, timed lookups of exercise()
COUNTS = (3, 5, 5, 0, 8)


@pytest.fixture
def restore_caches() -> Iterator[None]:
    config = caches.get_config()
    yield
    caches.set_config(config)


def test_memory_cache_and_decorator(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")

    async def main() -> None:
        cache = SimpleMemoryCache(plugins=[RecordingPlugin(stats, "Sessions")])
        await exercise(cache)

        calls: list[int] = []

        @cached(cache=SimpleMemoryCache, plugins=[RecordingPlugin(stats, "Deco")])
        async def square(n: int) -> int:
            calls.append(n)
            return n * n

        assert [await square(2), await square(2), await square(3)] == [4, 4, 9]
        assert calls == [2, 3]

    asyncio.run(main())
    assert counts(stats, "Sessions") == COUNTS
    assert counts(stats, "Deco") == (1, 2, 2, 0, 3)
    assert stats.local_statistics("Sessions").response_times.sum > 0  # aiocache's own timing
    assert stats.flush()
    fields = r.hgetall("conduit:cache:stats:api-1:Sessions")
    assert (fields["hit_count"], fields["miss_count"], fields["set_count"]) == ("3", "5", "5")


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")  # aiocache's
def test_redis_cache(make_stats: MakeStats, redis_server: Any) -> None:
    stats = make_stats("api-1")

    async def main() -> None:
        cache = RedisCache(
            endpoint="127.0.0.1",
            port=redis_server.port,
            db=4,
            namespace="users",
            plugins=[RecordingPlugin(stats)],  # region: the namespace
        )
        try:
            await exercise(cache)
        finally:
            await cache.close()

    asyncio.run(main())
    assert counts(stats, "users") == COUNTS
    data = redis.Redis(port=redis_server.port, db=4, decode_responses=True)
    try:  # the values really are in Redis, under the namespace
        assert sorted(data.keys()) == ["users:b", "users:c", "users:d", "users:n"]
    finally:
        data.close()


def test_default_regions_and_caches_config(make_stats: MakeStats, restore_caches: None) -> None:
    global DOTTED_STATS
    DOTTED_STATS = stats = make_stats("api-1")
    plugin = {"class": "conduit_otel_cache.integrations.aiocache.RecordingPlugin",
              "stats": f"{__name__}.DOTTED_STATS"}  # fmt: skip
    caches.set_config(
        {
            "default": {"cache": "aiocache.SimpleMemoryCache", "plugins": [plugin]},
            "named": {
                "cache": "aiocache.SimpleMemoryCache",
                "plugins": [{**plugin, "region": "Named"}],
            },
        }
    )

    async def main() -> None:
        shared = RecordingPlugin(stats)  # one plugin, two caches: a region each
        plain, spaced = (
            SimpleMemoryCache(plugins=[shared]),
            SimpleMemoryCache(plugins=[shared], namespace="tokens:"),
        )
        await plain.get("k")
        await spaced.get("k")
        await spaced.set("k", "v")
        await caches.get("default").set("k", "v")
        await caches.get("named").get("k")

        @cached(alias="default", key="fixed")
        async def value() -> str:
            return "computed"

        assert [await value(), await value()] == ["computed", "computed"]

    asyncio.run(main())
    DOTTED_STATS = None
    assert counts(stats, "memory")[:3] == (1, 2, 2)  # plain, "default" and the decorator
    assert counts(stats, "tokens")[:3] == (0, 1, 1)
    assert counts(stats, "Named")[:3] == (0, 1, 0)


def test_recording_never_blocks_the_event_loop(
    make_stats: MakeStats, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """With the statistics' Redis paused for 5 s, 1200 recorded cache calls finish before it
    resumes, no step of the loop takes 1 s, and another task runs between every 4 calls:
    recording does no I/O and never waits."""
    stats = make_stats("api-1")
    cache = SimpleMemoryCache(plugins=[RecordingPlugin(stats, "Loop")])
    ticks: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 1.0
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        start = time.monotonic()
        for i in range(300):
            await cache.set(f"k{i}", "v")
            await cache.get(f"k{i}")
            await cache.get(f"absent{i}")
            await cache.multi_get([f"k{i}"])
            # the loop's turn: aiocache's calls never suspend on Python 3.12+ (its
            # asyncio.wait_for no longer yields), so the ticker runs only here
            await asyncio.sleep(0)
        elapsed = time.monotonic() - start
        stop.set()
        await task
        return elapsed

    r.execute_command("CLIENT", "PAUSE", "5000", "ALL")  # it ends by itself
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        elapsed = asyncio.run(main(), debug=True)
    assert elapsed < 5.0, elapsed  # a Redis round trip would have waited for the pause to end
    assert not [rec for rec in caplog.records if "Executing" in rec.getMessage()]
    assert len(ticks) >= 300  # the other task ran at every turn of the loop
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 1.0  # and never waited for Redis
    assert counts(stats, "Loop") == (600, 300, 300, 0, 900)
    assert stats.flush()  # after the pause


def test_failing_statistics_never_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        await exercise(SimpleMemoryCache(plugins=[RecordingPlugin(BrokenStats(), "Broken")]))

    asyncio.run(main())
    assert "recording cache statistics of region 'Broken' failed" in caplog.text


def test_bad_arguments_name_the_setting(make_stats: MakeStats) -> None:
    with pytest.raises(ValueError, match=r"^RecordingPlugin stats must be"):
        RecordingPlugin(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^RecordingPlugin region: region 'a b'"):
        RecordingPlugin(make_stats("api-1"), "a b")

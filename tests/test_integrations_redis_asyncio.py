"""AsyncRedisCache: a redis.asyncio client used as a cache, on a real Redis under a running loop."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations import AsyncRedisCache

from .conftest import MakeStats
from .test_integrations_recording import BrokenStats


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int]:
    """(hits, misses, sets, evictions, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.response_times.count


async def exercise(cache: AsyncRedisCache) -> None:
    assert await cache.get("user:1") is None  # miss
    assert await cache.set("user:1", "alice", ex=60)  # set
    assert await cache.get("user:1") == b"alice"  # hit
    assert not await cache.set("user:1", "bob", nx=True)  # not stored: no set
    assert await cache.client.ttl("user:1") > 0
    assert await cache.delete("user:1", "user:2") == 1  # nothing
    assert await cache.get("user:1") is None  # miss


def test_async_redis_cache(make_stats: MakeStats, redis_url: str, r: redis.Redis) -> None:
    stats = make_stats("api-1")

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, db=1)
        try:
            await exercise(AsyncRedisCache(client, stats, "Provider"))
            # concurrent lookups from many tasks are all counted
            cache = AsyncRedisCache(client, stats, "Many")
            await cache.set("k", "v")
            found = await asyncio.gather(*(cache.get("k" if i % 2 else "nope") for i in range(100)))
            assert found.count(b"v") == 50
        finally:
            await client.aclose()

    asyncio.run(main())
    assert counts(stats, "Provider") == (1, 2, 1, 0, 3)
    assert counts(stats, "Many") == (50, 50, 1, 0, 100)
    assert stats.flush()
    fields = r.hgetall("conduit:cache:stats:api-1:Provider")
    assert (fields["hit_count"], fields["miss_count"], fields["set_count"]) == ("1", "2", "1")


def test_failing_statistics_never_break_the_cache(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, db=1)
        try:
            await exercise(AsyncRedisCache(client, BrokenStats(), "Broken"))
        finally:
            await client.aclose()

    asyncio.run(main())
    assert "recording cache statistics of region 'Broken' failed" in caplog.text

"""``AsyncRedisCache``: a ``redis.asyncio`` client used as a cache, recording its statistics."""

from __future__ import annotations

from time import perf_counter
from typing import Any

import redis.asyncio

from .recording import Recording, RegionRecorder


class AsyncRedisCache:
    """The async twin of :class:`~conduit_otel_cache.integrations.RedisCache`.

    ``await get(key)`` counts a hit, or a miss when Redis answers ``None``, with the
    round-trip time; ``await set(...)`` counts a set when Redis stored the value (not when
    ``nx``/``xx`` prevented it); ``delete`` counts nothing. A call that raises counts
    nothing. Recording is in memory, so it never blocks the event loop.
    """

    def __init__(self, client: redis.asyncio.Redis, stats: Recording, region: str) -> None:
        self.client, self.region = client, region
        self._record = RegionRecorder(stats, region)

    async def get(self, key: str) -> Any:
        """The cached value of ``key``, or ``None``."""
        start = perf_counter()
        value = await self.client.get(key)
        self._record.lookup(value is not None, perf_counter() - start)
        return value

    async def set(self, key: str, value: Any, ex: int | None = None, **kwargs: Any) -> bool:
        """Store ``value`` (``ex``: TTL in seconds; other keywords go to ``client.set``)."""
        stored = bool(await self.client.set(key, value, ex=ex, **kwargs))
        if stored:
            self._record.sets()
        return stored

    async def delete(self, *keys: str) -> int:
        """Delete ``keys``; returns how many existed."""
        return int(await self.client.delete(*keys))

"""``RedisCache``: a redis-py client used as a cache, recording its statistics."""

from __future__ import annotations

from time import perf_counter
from typing import Any

import redis

from .recording import Recording


class RedisCache:
    """``get``/``set``/``delete`` through ``client``, recorded under ``region``.

    ``get`` counts a hit, or a miss when Redis answers ``None``, with the round-trip time;
    ``set`` counts a set when Redis stored the value (not when ``nx``/``xx`` prevented it).
    ``delete`` counts nothing, and Redis's own evictions and expiries are not seen. A
    call that raises (Redis unreachable) counts nothing and the exception propagates.
    """

    def __init__(self, client: redis.Redis, stats: Recording, region: str) -> None:
        self.client, self.stats, self.region = client, stats, region

    def get(self, key: str) -> Any:
        """The cached value of ``key``, or ``None``."""
        start = perf_counter()
        value = self.client.get(key)
        elapsed = perf_counter() - start
        if value is None:
            self.stats.record_miss(self.region, elapsed)
        else:
            self.stats.record_hit(self.region, elapsed)
        return value

    def set(self, key: str, value: Any, ex: int | None = None, **kwargs: Any) -> bool:
        """Store ``value`` (``ex``: TTL in seconds; other keywords go to ``client.set``)."""
        stored = bool(self.client.set(key, value, ex=ex, **kwargs))
        if stored:
            self.stats.record_set(self.region)
        return stored

    def delete(self, *keys: str) -> int:
        """Delete ``keys``; returns how many existed."""
        return int(self.client.delete(*keys))

"""Drop-in cache integrations that record into a :class:`~conduit_otel_cache.CacheStatistics`.

* :func:`cached` (``lru``): a ``functools.lru_cache`` decorator.
* :class:`RedisCache` (``redis_cache``): a redis-py client used as a cache.
* :class:`AsyncRedisCache` (``redis_asyncio``): its ``redis.asyncio`` twin.
* :class:`TimedLookup` (``lookup``): ``with stats.timed_lookup(region) as lookup:`` for any cache.
* :class:`Recording` (``recording``): the protocol of what they record into.

Each of these needs an extra, so it is not imported here:
:mod:`~conduit_otel_cache.integrations.cachetools` (any ``cachetools.Cache``),
:mod:`~conduit_otel_cache.integrations.django` (Django's cache framework),
:mod:`~conduit_otel_cache.integrations.flask_caching` (Flask-Caching),
:mod:`~conduit_otel_cache.integrations.aiocache` (aiocache) and
:mod:`~conduit_otel_cache.integrations.dogpile` (dogpile.cache).
"""

from __future__ import annotations

from .lookup import TimedLookup
from .lru import CachedFunction, cached
from .recording import Recording
from .redis_asyncio import AsyncRedisCache
from .redis_cache import RedisCache

__all__ = ["AsyncRedisCache", "CachedFunction", "Recording", "RedisCache", "TimedLookup", "cached"]

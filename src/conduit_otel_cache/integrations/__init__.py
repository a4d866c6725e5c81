"""Drop-in cache integrations that record into a :class:`~conduit_otel_cache.CacheStatistics`.

* :func:`cached` (``lru``): a ``functools.lru_cache`` decorator.
* :class:`RedisCache` (``redis_cache``): a redis-py client used as a cache.
* :class:`TimedLookup` (``lookup``): ``with stats.timed_lookup(region) as lookup:`` for any cache.
* :mod:`conduit_otel_cache.integrations.cachetools`: any ``cachetools.Cache`` subclass
  (needs the ``cachetools`` extra, so it is not imported here).
"""

from __future__ import annotations

from .lookup import TimedLookup
from .lru import CachedFunction, cached
from .redis_cache import RedisCache

__all__ = ["CachedFunction", "RedisCache", "TimedLookup", "cached"]

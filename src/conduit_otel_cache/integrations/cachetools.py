"""Instrumented ``cachetools`` caches (``pip install 'conduit-otel-cache[cachetools]'``).

>>> cache = instrumented(TTLCache, stats, "Users", maxsize=1024, ttl=60, getsizeof=len)

Counted: a **hit** or **miss** for every ``cache[key]`` and ``cache.get(key)``, with its
response time (a ``__missing__`` that supplies the value is a miss; ``key in cache`` is not a
lookup, and ``pop``/``setdefault`` of a present key count a hit as they read it); a **set** for
every stored ``cache[key] = value`` (also from ``__missing__`` or ``@cachetools.cached``); an
**eviction** for every ``popitem()`` (the method every cachetools cache calls to make room;
calling it yourself counts too) and every item ``expire()`` removes (TTL/TLRU expiry, which
the cache runs on writes). ``size_bytes`` is the cache's ``currsize`` after every change, but
only when the cache measures sizes (``getsizeof`` given): otherwise ``currsize`` counts items.
Like the caches themselves, instances are not thread-safe: use cachetools' ``lock`` argument.
"""

from __future__ import annotations

import functools
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .recording import Recording, missing_extra

try:
    import cachetools
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra(__name__, "cachetools>=5", "cachetools") from exc

__all__ = ["instrumented", "instrumented_class"]

C = TypeVar("C", bound="cachetools.Cache[Any, Any]")
_ABSENT: Any = object()

if TYPE_CHECKING:
    _CacheBase = cachetools.Cache[Any, Any]
    _TimedBase = cachetools.TTLCache[Any, Any]
else:
    _CacheBase = _TimedBase = object


class _CacheStats(_CacheBase):
    """Mixin recording lookups, sets, evictions and size of a ``cachetools.Cache``."""

    _conduit_stats: Recording
    _conduit_region: str
    _conduit_sized: bool
    _conduit_missed: bool

    def __init__(self, *args: Any, stats: Recording, region: str, **kwargs: Any) -> None:
        self._conduit_stats, self._conduit_region = stats, region
        self._conduit_missed = False
        super().__init__(*args, **kwargs)
        self._conduit_sized = self.getsizeof is not cachetools.Cache.getsizeof
        self._conduit_size()

    def _conduit_size(self) -> None:
        if self._conduit_sized:  # Cache's own currsize: no expiry as a side effect
            size = cachetools.Cache.currsize.fget(self)  # type: ignore[attr-defined]
            self._conduit_stats.set_size_bytes(self._conduit_region, int(size))

    def __getitem__(self, key: Any) -> Any:
        self._conduit_missed = False
        start = perf_counter()
        try:
            value = super().__getitem__(key)
        except KeyError:
            self._conduit_stats.record_miss(self._conduit_region, perf_counter() - start)
            raise
        if self._conduit_missed:
            self._conduit_stats.record_miss(self._conduit_region, perf_counter() - start)
        else:
            self._conduit_stats.record_hit(self._conduit_region, perf_counter() - start)
        return value

    def __missing__(self, key: Any) -> Any:
        value = super().__missing__(key)
        self._conduit_missed = True  # after any nested lookups it made
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        start = perf_counter()
        value = super().get(key, _ABSENT)  # a present key goes through __getitem__
        if value is _ABSENT:
            self._conduit_stats.record_miss(self._conduit_region, perf_counter() - start)
            return default
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._conduit_stats.record_set(self._conduit_region)
        self._conduit_size()

    def __delitem__(self, key: Any) -> None:
        try:
            super().__delitem__(key)
        finally:
            self._conduit_size()

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self._conduit_stats.record_eviction(self._conduit_region)
        self._conduit_size()
        return item

    def clear(self) -> None:
        super().clear()
        self._conduit_size()


class _ExpiryStats(_CacheStats, _TimedBase):
    """Adds expiry counting for caches with ``expire()`` (``TTLCache``, ``TLRUCache``)."""

    def expire(self, time: Any = None) -> list[tuple[Any, Any]]:
        expired = list(super().expire(time))
        if expired:
            for _ in expired:
                self._conduit_stats.record_eviction(self._conduit_region)
            self._conduit_size()
        return expired


@functools.cache
def instrumented_class(base: type[C]) -> type[C]:
    """A subclass of the ``cachetools.Cache`` subclass ``base`` that records statistics.

    Its constructor takes ``base``'s arguments plus the keywords ``stats`` and ``region``.
    """
    mixin = _ExpiryStats if hasattr(base, "expire") else _CacheStats
    name = f"Instrumented{base.__name__}"
    return cast("type[C]", type(name, (mixin, base), {"__module__": __name__}))


def instrumented(base: type[C], stats: Recording, region: str, /, *args: Any, **kwargs: Any) -> C:
    """A ``base(*args, **kwargs)`` cache recording into ``stats`` under ``region``."""
    cache: C = instrumented_class(base)(*args, stats=stats, region=region, **kwargs)
    return cache

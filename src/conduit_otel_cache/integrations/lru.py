"""``cached``: a ``functools.lru_cache`` decorator that records cache statistics."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from .recording import Recording

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class CachedFunction(Protocol[P, R_co]):
    """What :func:`cached` returns: the function with ``cache_info()`` and ``cache_clear()``."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def cache_info(self) -> functools._CacheInfo: ...

    def cache_clear(self) -> None: ...


def cached(
    stats: Recording, region: str, maxsize: int | None = 128, *, typed: bool = False
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Memoize a function with ``functools.lru_cache(maxsize, typed)`` and record each call.

    Counted per call: a **hit** when ``lru_cache`` answered; otherwise a **miss**, plus a
    **set** when the result is stored (not with ``maxsize=0``, nor when the function raised)
    and an **eviction** when the store found a bounded cache full (``lru_cache`` then drops
    its least recently used entry). The response time is the whole call, computation
    included. ``cache_clear()`` is not counted. Hits and misses are exact under threads and
    recursion; two threads missing the same key at once count a set each.
    """
    bounded = maxsize is not None and maxsize > 0
    stores = maxsize is None or maxsize > 0

    def decorate(func: Callable[P, R]) -> CachedFunction[P, R]:
        state = threading.local()

        def compute(*args: Any, **kwargs: Any) -> R:
            value = func(*args, **kwargs)
            # Only a miss gets here, in the calling thread, just before lru_cache stores value
            # (after any recursive calls, so the flags belong to this call).
            state.evicts = bounded and lru.cache_info().currsize >= cast(int, maxsize)
            state.missed = True
            return value

        lru = functools.lru_cache(maxsize=maxsize, typed=typed)(compute)
        call: Callable[..., R] = lru

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            state.missed = False
            start = perf_counter()
            try:
                value = call(*args, **kwargs)
            except BaseException:
                stats.record_miss(region, perf_counter() - start)
                raise
            elapsed = perf_counter() - start
            if not state.missed:
                stats.record_hit(region, elapsed)
                return value
            stats.record_miss(region, elapsed)
            if stores:
                stats.record_set(region)
            if state.evicts:
                stats.record_eviction(region)
            return value

        wrapper.cache_info = lru.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = lru.cache_clear  # type: ignore[attr-defined]
        return cast(CachedFunction[P, R], wrapper)

    return decorate

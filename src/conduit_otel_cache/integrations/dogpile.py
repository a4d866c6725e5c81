"""dogpile.cache statistics through a ``ProxyBackend``
(``pip install 'conduit-otel-cache[dogpile]'``).

>>> region = make_region(name="Users").configure("dogpile.cache.redis", arguments={...})
>>> instrument(region, stats)  # region.wrap(RecordingProxy(stats, "Users"))

or ``configure(..., wrap=[RecordingProxy(stats, "Users")])``.

Counted at the backend, so ``get``, ``get_or_create``, ``get_multi`` and the
``cache_on_arguments`` decorators alike: every read of a key a **hit**, or a **miss** when
the backend has no value (``NO_VALUE``), with the backend's round-trip time (a multi-key
read: each key an equal share); every value written a **set**. ``get_or_create`` reads a
missing key once more under its creation lock, to see whether another thread made it
meanwhile: that re-check is part of the same lookup and not counted again. A value found
but expired by the region's ``expiration_time`` is a hit of the backend, then a set when
dogpile regenerates it. ``delete`` counts nothing, and dogpile's backends do not report
evictions. A call that raises counts nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import Any

from .recording import Recording, RegionRecorder, missing_extra, resolve_region, resolve_stats

try:
    from dogpile.cache.api import NO_VALUE, CacheMutex
    from dogpile.cache.proxy import ProxyBackend
    from dogpile.cache.region import CacheRegion
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra(__name__, "dogpile.cache>=1.1", "dogpile") from exc

__all__ = ["RecordingProxy", "instrument"]


class RecordingProxy(ProxyBackend):
    """Records every read and write that reaches the backend (see the module)."""

    def __init__(self, stats: Recording | str, region: str) -> None:
        stats = resolve_stats(stats, "RecordingProxy stats")
        self.region = resolve_region(region, "RecordingProxy region")
        self._record = RegionRecorder(stats, self.region)
        # key -> id of the thread holding its creation lock: its reads are re-checks
        self._held: dict[Any, int] = {}

    def get_mutex(self, key: Any) -> CacheMutex:
        """The backend's creation lock of ``key`` (or the thread lock dogpile would use),
        noting who holds it."""
        return _NotingMutex(self.proxied.get_mutex(key) or _ThreadMutex(), key, self._held)

    def _rechecks(self, key: Any) -> bool:
        return self._held.get(key) == threading.get_ident()

    def _one(self, value: Any, start: float) -> Any:
        self._record.lookup(value is not NO_VALUE, perf_counter() - start)
        return value

    def _read_many(
        self, read: Callable[[list[Any]], Sequence[Any]], keys: Iterable[Any]
    ) -> Sequence[Any]:
        """``read(keys)``, recording each key not being re-checked (see ``get_mutex``)."""
        keys = list(keys)
        start = perf_counter()
        values = read(keys)
        elapsed = perf_counter() - start
        counted = [v for k, v in zip(keys, values) if not self._rechecks(k)]
        hits = sum(v is not NO_VALUE for v in counted)
        self._record.lookups(hits, len(counted), elapsed * len(counted) / max(len(keys), 1))
        return values

    def get(self, key: Any) -> Any:
        if self._rechecks(key):
            return self.proxied.get(key)
        start = perf_counter()
        return self._one(self.proxied.get(key), start)

    def get_serialized(self, key: Any) -> Any:
        if self._rechecks(key):
            return self.proxied.get_serialized(key)
        start = perf_counter()
        return self._one(self.proxied.get_serialized(key), start)

    def get_multi(self, keys: Iterable[Any]) -> Sequence[Any]:
        return self._read_many(self.proxied.get_multi, keys)

    def get_serialized_multi(self, keys: Iterable[Any]) -> Sequence[Any]:
        return self._read_many(self.proxied.get_serialized_multi, keys)

    def set(self, key: Any, value: Any) -> None:
        self.proxied.set(key, value)
        self._record.sets()

    def set_serialized(self, key: Any, value: bytes) -> None:
        self.proxied.set_serialized(key, value)
        self._record.sets()

    def set_multi(self, mapping: Mapping[Any, Any]) -> None:
        self.proxied.set_multi(mapping)
        self._record.sets(len(mapping))

    def set_serialized_multi(self, mapping: Mapping[Any, bytes]) -> None:
        self.proxied.set_serialized_multi(mapping)
        self._record.sets(len(mapping))


class _ThreadMutex(CacheMutex):
    """A ``threading.Lock``, as dogpile uses when the backend has no lock of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, wait: bool = True) -> bool:
        return self._lock.acquire(wait)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class _NotingMutex(CacheMutex):
    """``mutex``, recording in ``held`` which thread holds it for ``key``."""

    def __init__(self, mutex: CacheMutex, key: Any, held: dict[Any, int]) -> None:
        self._mutex, self._key, self._held = mutex, key, held

    def acquire(self, wait: bool = True) -> bool:
        acquired = bool(self._mutex.acquire(wait))
        if acquired:
            self._held[self._key] = threading.get_ident()
        return acquired

    def release(self) -> None:
        self._held.pop(self._key, None)
        self._mutex.release()

    def locked(self) -> bool:
        return bool(self._mutex.locked())


def instrument(region: CacheRegion, stats: Recording | str, name: str | None = None) -> None:
    """Wrap the configured ``region``'s backend in a :class:`RecordingProxy` recording
    under ``name``, by default the region's own name (``make_region(name=...)``)."""
    name = name if name is not None else region.name
    if name is None:
        raise ValueError("instrument(): give the region a name (make_region(name=...)) or name=")
    region.wrap(RecordingProxy(stats, name))

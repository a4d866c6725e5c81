"""A Django cache backend recording the statistics of any other backend
(``pip install 'conduit-otel-cache[django]'``).

In ``settings.py``, point ``BACKEND`` at :class:`RecordingCache`, move the real backend to
``WRAPS`` and name the statistics handle in ``STATS``; everything else (``LOCATION``,
``OPTIONS``, ``TIMEOUT``, ``KEY_PREFIX``...) goes to the wrapped backend unchanged::

    CACHES = {
        "default": {
            "BACKEND": "conduit_otel_cache.integrations.django.RecordingCache",
            "WRAPS": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/0",
            "STATS": "myproject.stats.cache_stats",  # the setup() handle, or its dotted path
            # "REGION": "Pages",  # default: the alias, here "default"
        },
    }

Counted, sync and async (``aget``...) alike: ``get`` a **hit** or **miss** (a stored
``None`` is a hit); ``get_many`` a hit or miss per key, each with an equal share of the
round trip; ``get_or_set`` one hit or miss (the time of that lookup), plus a **set** when
its ``add`` stored the default; ``set`` a set; ``add`` a set when it stored; ``set_many``
a set per key stored; ``incr``/``decr`` a hit and a set when the key existed, a miss when it
did not (Django raises ``ValueError``). ``touch``, ``delete``, ``has_key``/``in`` and
``clear`` count nothing (not lookups, and no value written); Django's backends do not
report their evictions. A call that raises counts nothing, except the missing key of
``incr``/``decr``. Every other attribute is the wrapped backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from typing import Any, TypeVar

from .recording import RegionRecorder, missing_extra, resolve_region, resolve_stats

try:
    from django.apps import AppConfig
    from django.conf import settings
    from django.core.cache.backends.base import DEFAULT_TIMEOUT
    from django.core.exceptions import ImproperlyConfigured
    from django.utils.module_loading import import_string
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra(__name__, "Django>=4.2", "django") from exc

__all__ = ["ConduitCacheConfig", "RecordingCache"]

_OWN_KEYS = ("WRAPS", "STATS", "REGION")
_MISSING: Any = object()
T = TypeVar("T")


class RecordingCache:
    """Wraps the backend named by ``WRAPS`` and records its statistics (see the module)."""

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        alias = _alias_of(location, params)
        backend_class, stats, region = _configured(alias, params)
        inner_params = {k: v for k, v in params.items() if k not in _OWN_KEYS}
        #: The wrapped backend.
        self.backend: Any = backend_class(location, inner_params)
        self.region = region
        self._record = RegionRecorder(stats, region)

    def __getattr__(self, name: str) -> Any:
        if name == "backend" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __contains__(self, key: Any) -> bool:
        return key in self.backend

    def __repr__(self) -> str:
        return f"<RecordingCache region={self.region!r} of {self.backend!r}>"

    # -- lookups ------------------------------------------------------------------------

    def _found(self, value: Any, start: float) -> bool:
        elapsed = perf_counter() - start
        if value is _MISSING:
            self._record.miss(elapsed)
            return False
        self._record.hit(elapsed)
        return True

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        start = perf_counter()
        value = self.backend.get(key, _MISSING, version=version)
        return value if self._found(value, start) else default

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        start = perf_counter()
        value = await self.backend.aget(key, _MISSING, version=version)
        return value if self._found(value, start) else default

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        keys = list(keys)
        start = perf_counter()
        found: dict[Any, Any] = self.backend.get_many(keys, version=version)
        self._record.lookups(sum(k in found for k in keys), len(keys), perf_counter() - start)
        return found

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        keys = list(keys)
        start = perf_counter()
        found: dict[Any, Any] = await self.backend.aget_many(keys, version=version)
        self._record.lookups(sum(k in found for k in keys), len(keys), perf_counter() - start)
        return found

    def get_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        start = perf_counter()
        value = self.backend.get(key, _MISSING, version=version)
        if self._found(value, start):
            return value
        if callable(default):
            default = default()
        if self.backend.add(key, default, timeout=timeout, version=version):
            self._record.sets()
        # As Django does: read again in case another caller added a value meanwhile.
        return self.backend.get(key, default, version=version)

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        start = perf_counter()
        value = await self.backend.aget(key, _MISSING, version=version)
        if self._found(value, start):
            return value
        if callable(default):
            default = default()
        if await self.backend.aadd(key, default, timeout=timeout, version=version):
            self._record.sets()
        return await self.backend.aget(key, default, version=version)

    # -- writes -------------------------------------------------------------------------

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        result = self.backend.set(key, value, timeout=timeout, version=version)
        self._record.sets()
        return result

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        result = await self.backend.aset(key, value, timeout=timeout, version=version)
        self._record.sets()
        return result

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        stored = bool(self.backend.add(key, value, timeout=timeout, version=version))
        if stored:
            self._record.sets()
        return stored

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        stored = bool(await self.backend.aadd(key, value, timeout=timeout, version=version))
        if stored:
            self._record.sets()
        return stored

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        failed: list[Any] = self.backend.set_many(data, timeout=timeout, version=version)
        self._record.sets(len(data) - len(failed or ()))
        return failed

    async def aset_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        failed: list[Any] = await self.backend.aset_many(data, timeout=timeout, version=version)
        self._record.sets(len(data) - len(failed or ()))
        return failed

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self._counted(self.backend.incr, key, delta, version)

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self._counted(self.backend.decr, key, delta, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._acounted(self.backend.aincr, key, delta, version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._acounted(self.backend.adecr, key, delta, version)

    def _counted(self, op: Callable[..., T], key: Any, delta: int, version: int | None) -> T:
        start = perf_counter()
        try:
            value = op(key, delta, version=version)
        except ValueError:  # Django's "Key not found"
            self._record.miss(perf_counter() - start)
            raise
        self._record.hit(perf_counter() - start)
        self._record.sets()
        return value

    async def _acounted(
        self, op: Callable[..., Any], key: Any, delta: int, version: int | None
    ) -> Any:
        start = perf_counter()
        try:
            value = await op(key, delta, version=version)
        except ValueError:
            self._record.miss(perf_counter() - start)
            raise
        self._record.hit(perf_counter() - start)
        self._record.sets()
        return value


def _configured(alias: str | None, params: Mapping[str, Any]) -> tuple[Any, Any, str]:
    """The wrapped backend's class, the statistics handle and the region of one
    ``CACHES`` entry; :class:`ImproperlyConfigured` naming the setting when one is wrong."""
    where = f"CACHES[{alias!r}]" if alias is not None else "CACHES[...]"
    backend = params.get("WRAPS")
    if not backend:
        raise ImproperlyConfigured(
            f"{where}['WRAPS'] must name the backend to wrap, such as "
            "'django.core.cache.backends.locmem.LocMemCache'"
        )
    try:
        backend_class = import_string(backend) if isinstance(backend, str) else backend
    except ImportError as exc:
        raise ImproperlyConfigured(f"{where}['WRAPS']: cannot import {backend!r}") from exc
    if backend_class is RecordingCache:
        raise ImproperlyConfigured(f"{where}['WRAPS'] cannot be RecordingCache itself")
    try:
        stats = resolve_stats(params.get("STATS"), f"{where}['STATS']")
        region = params.get("REGION", alias)
        if region is None:
            raise ValueError(f"{where}['REGION'] is needed: these settings match no single alias")
        region = resolve_region(region, f"{where}['REGION']")
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    return backend_class, stats, region


class ConduitCacheConfig(AppConfig):  # type: ignore[misc]
    """Add ``"conduit_otel_cache.integrations.django.ConduitCacheConfig"`` to
    ``INSTALLED_APPS`` and a wrong ``WRAPS``, ``STATS`` or ``REGION`` of a
    :class:`RecordingCache` fails when Django starts (Django builds caches at first use)."""

    name = "conduit_otel_cache.integrations.django"
    label = "conduit_otel_cache"
    verbose_name = "conduit-otel-cache"

    def ready(self) -> None:
        backend = f"{RecordingCache.__module__}.{RecordingCache.__qualname__}"
        for alias, params in getattr(settings, "CACHES", {}).items():
            if params.get("BACKEND") in (backend, RecordingCache):
                _configured(alias, params)


def _alias_of(location: str, params: dict[str, Any]) -> str | None:
    """The alias in ``settings.CACHES`` whose entry these are, if exactly one matches."""
    caches = getattr(settings, "CACHES", None) or {}
    matches = [
        alias
        for alias, entry in caches.items()
        if isinstance(entry, dict)
        and entry.get("LOCATION", "") == location
        and {k: v for k, v in entry.items() if k not in ("BACKEND", "LOCATION")} == params
        and str(entry.get("BACKEND", "")).endswith("RecordingCache")
    ]
    return matches[0] if len(matches) == 1 else None

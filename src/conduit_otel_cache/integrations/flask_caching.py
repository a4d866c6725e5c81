"""Flask-Caching with statistics, for any of its backends
(``pip install 'conduit-otel-cache[flask]'``).

Set ``CACHE_TYPE`` to :func:`recording`, move the real ``CACHE_TYPE`` to ``CACHE_WRAPS`` and
name the statistics handle in ``CACHE_STATS``; every other ``CACHE_*`` setting still
configures the wrapped backend::

    cache = Cache(app, config={
        "CACHE_TYPE": "conduit_otel_cache.integrations.flask_caching.recording",
        "CACHE_WRAPS": "RedisCache",            # any CACHE_TYPE
        "CACHE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "CACHE_STATS": stats,                   # the setup() handle, or its dotted path
        # "CACHE_REGION": "Pages",  # default: CACHE_KEY_PREFIX without trailing _ : . -
    })

Counted (the backend API, so ``@cache.cached``, ``@cache.memoize`` and direct calls alike):
``get`` a **hit**, or a **miss** when the backend answers ``None`` (Flask-Caching's own
test); ``get_many``/``get_dict`` a hit or miss per key, each with an equal share of the
round trip; ``set`` a **set** unless the backend reports failure (``False``); ``add`` a set
when it stored; ``set_many`` a set per key stored; ``inc``/``dec`` a set when they stored.
The version keys ``@cache.memoize`` keeps (``*_memver``) are bookkeeping, not counted.
``has``, ``delete*`` and ``clear`` count nothing; cachelib's backends do not report
evictions. A call that raises counts nothing. Every other attribute is the backend's.
"""

from __future__ import annotations

from collections.abc import Mapping
from time import perf_counter
from typing import Any

from .recording import Recording, RegionRecorder, missing_extra, resolve_region, resolve_stats

try:
    from flask import Flask
    from flask_caching.backends.base import BaseCache
    from werkzeug.utils import import_string
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra(__name__, "Flask-Caching>=2", "flask") from exc

__all__ = ["RecordingBackend", "recording"]

_VERSION_SUFFIX = "_memver"  # flask_caching.Cache._memvname


def _counted(key: Any) -> bool:
    return not (isinstance(key, str) and key.endswith(_VERSION_SUFFIX))


class RecordingBackend:
    """A Flask-Caching (cachelib) backend ``backend`` recording into ``stats`` under
    ``region``; see the module for what is counted."""

    def __init__(self, backend: Any, stats: Recording, region: str) -> None:
        self.backend, self.region = backend, region
        self._record = RegionRecorder(stats, region)

    def __getattr__(self, name: str) -> Any:
        if name == "backend" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.backend, name)

    @property
    def serializer(self) -> Any:
        """The backend's serializer (``CACHE_SERIALIZER`` sets it on the backend)."""
        return self.backend.serializer

    @serializer.setter
    def serializer(self, value: Any) -> None:
        self.backend.serializer = value

    def __repr__(self) -> str:
        return f"<RecordingBackend region={self.region!r} of {self.backend!r}>"

    def get(self, key: str) -> Any:
        start = perf_counter()
        value = self.backend.get(key)
        if _counted(key):
            self._record.lookup(value is not None, perf_counter() - start)
        return value

    def get_many(self, *keys: str) -> list[Any]:
        start = perf_counter()
        values = list(self.backend.get_many(*keys))
        elapsed = perf_counter() - start
        pairs = [(k, v) for k, v in zip(keys, values) if _counted(k)]
        self._record.lookups(sum(v is not None for _, v in pairs), len(pairs), elapsed)
        return values

    def get_dict(self, *keys: str) -> dict[str, Any]:
        start = perf_counter()
        found: dict[str, Any] = self.backend.get_dict(*keys)
        elapsed = perf_counter() - start
        counted = [k for k in keys if _counted(k)]
        hits = sum(found.get(k) is not None for k in counted)
        self._record.lookups(hits, len(counted), elapsed)
        return found

    def set(self, key: str, value: Any, timeout: int | None = None) -> Any:
        result = self.backend.set(key, value, timeout=timeout)
        if result is not False and _counted(key):
            self._record.sets()
        return result

    def add(self, key: str, value: Any, timeout: int | None = None) -> Any:
        result = self.backend.add(key, value, timeout=timeout)
        if result and _counted(key):
            self._record.sets()
        return result

    def set_many(self, mapping: Mapping[str, Any], timeout: int | None = None) -> Any:
        result = self.backend.set_many(mapping, timeout=timeout)
        stored = mapping.keys() if result is None else result  # None: an older backend API
        self._record.sets(sum(_counted(k) for k in stored))
        return result

    def inc(self, key: str, delta: int = 1) -> Any:
        result = self.backend.inc(key, delta=delta)
        if result is not None and _counted(key):
            self._record.sets()
        return result

    def dec(self, key: str, delta: int = 1) -> Any:
        result = self.backend.dec(key, delta=delta)
        if result is not None and _counted(key):
            self._record.sets()
        return result


def recording(
    app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
) -> RecordingBackend:
    """The ``CACHE_TYPE`` factory: the ``CACHE_WRAPS`` backend, built as Flask-Caching
    builds a ``CACHE_TYPE``, recording into ``CACHE_STATS`` under ``CACHE_REGION``."""
    try:
        stats = resolve_stats(config.get("CACHE_STATS"), "CACHE_STATS")
        region = config.get("CACHE_REGION")
        if region is None:
            region = str(config.get("CACHE_KEY_PREFIX") or "").rstrip("_:.-")
        region = resolve_region(region, "CACHE_REGION")
    except ValueError as exc:
        raise ValueError(f"Flask-Caching: {exc}") from None
    wrapped = config.get("CACHE_WRAPS")
    if not isinstance(wrapped, str) or not wrapped:
        raise ValueError(
            "Flask-Caching: CACHE_WRAPS must name the backend to record, such as "
            "'SimpleCache' or 'RedisCache'"
        )
    import_me = wrapped if "." in wrapped else f"flask_caching.backends.{wrapped}"
    try:
        factory = import_string(import_me)
    except ImportError as exc:
        raise ValueError(f"Flask-Caching: CACHE_WRAPS: cannot import {wrapped!r}") from exc
    if factory is recording:
        raise ValueError("Flask-Caching: CACHE_WRAPS cannot be the recording factory itself")
    if isinstance(factory, type) and issubclass(factory, BaseCache):
        factory = factory.factory
    if "cachelib" in import_me:  # as Flask-Caching does for cachelib's own classes
        backend = factory(*args, **kwargs)
    else:
        backend = factory(app, config, args, kwargs)
    return RecordingBackend(backend, stats, region)

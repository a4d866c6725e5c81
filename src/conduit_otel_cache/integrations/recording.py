"""What the integrations record into, and the guard that keeps statistics off the cache's path.

:class:`Recording` is the protocol every integration is typed against (the handle returned by
:func:`conduit_otel_cache.setup` satisfies it). :class:`RegionRecorder` binds one to a region
and swallows anything it raises, so a cache call never fails because of its statistics; it
does no I/O either (the ``record_*`` methods are in-memory tallies).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..config import valid_name
from ..ratelimit import RateLimitedLog

__all__ = ["Recording", "RegionRecorder", "missing_extra", "resolve_region", "resolve_stats"]

log = logging.getLogger(__name__)


@runtime_checkable
class Recording(Protocol):
    """The ``record_*`` methods an integration calls (``region`` is always a str here)."""

    def record_hit(self, region: str, response_time: float | None = None, /) -> None: ...

    def record_miss(self, region: str, response_time: float | None = None, /) -> None: ...

    def record_set(self, region: str, /) -> None: ...

    def record_eviction(self, region: str, /) -> None: ...

    def set_size_bytes(self, region: str, size_bytes: int, /) -> None: ...


class RegionRecorder:
    """``stats`` bound to ``region``; an exception raised by ``stats`` is swallowed (and
    logged at most every 5 minutes), never passed to the cache's caller."""

    __slots__ = ("_errors", "region", "stats")

    def __init__(self, stats: Recording, region: str) -> None:
        self.stats, self.region = stats, region
        self._errors = RateLimitedLog(log, interval=300.0)

    def _failed(self, exc: Exception) -> None:
        self._errors.error("recording cache statistics of region %r failed: %r", self.region, exc)

    def hit(self, seconds: float) -> None:
        """One lookup that found its value, taking ``seconds``."""
        try:
            self.stats.record_hit(self.region, seconds)
        except Exception as exc:
            self._failed(exc)

    def miss(self, seconds: float) -> None:
        """One lookup that did not find its value, taking ``seconds``."""
        try:
            self.stats.record_miss(self.region, seconds)
        except Exception as exc:
            self._failed(exc)

    def lookup(self, found: bool, seconds: float) -> None:
        """One lookup taking ``seconds``: a hit when ``found``, else a miss."""
        if found:
            self.hit(seconds)
        else:
            self.miss(seconds)

    def lookups(self, hits: int, total: int, seconds: float) -> None:
        """``total`` lookups made in one call of ``seconds``, ``hits`` of them found; each
        is recorded with an equal share of the call's time."""
        if total <= 0:
            return
        share = seconds / total
        try:
            for _ in range(hits):
                self.stats.record_hit(self.region, share)
            for _ in range(total - hits):
                self.stats.record_miss(self.region, share)
        except Exception as exc:
            self._failed(exc)

    def sets(self, count: int = 1) -> None:
        """``count`` values written."""
        self._repeat(self.stats.record_set, count)

    def evictions(self, count: int = 1) -> None:
        """``count`` values evicted or expired."""
        self._repeat(self.stats.record_eviction, count)

    def _repeat(self, record: Callable[[str], None], count: int) -> None:
        try:
            for _ in range(count):
                record(self.region)
        except Exception as exc:
            self._failed(exc)


def missing_extra(module: str, requirement: str, extra: str) -> ImportError:
    """The error an integration module raises when the library it wraps is missing."""
    return ImportError(f"{module} needs {requirement}: pip install 'conduit-otel-cache[{extra}]'")


def resolve_stats(value: object, setting: str) -> Recording:
    """``value`` itself when it records, else the object the dotted path ``value`` names
    (``"package.module.attribute"``), called first if it is a factory; anything else
    raises ``ValueError`` naming ``setting``."""
    if isinstance(value, str):
        module_name, _, attribute = value.rpartition(".")
        try:
            found: object = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"{setting}: cannot import {value!r} ({exc})") from exc
        if not isinstance(found, Recording) and callable(found):
            found = found()
        value = found
    if not isinstance(value, Recording):
        raise ValueError(
            f"{setting} must be the statistics handle from conduit_otel_cache.setup() "
            f"or the dotted path of one, not {type(value).__name__}"
        )
    return value


def resolve_region(value: object, setting: str) -> str:
    """``value`` when it is a valid region name, else ``ValueError`` naming ``setting``."""
    if not valid_name(value):
        raise ValueError(
            f"{setting}: region {value!r} must be 1-128 characters of A-Z a-z 0-9 _ . -"
        )
    return str(value)

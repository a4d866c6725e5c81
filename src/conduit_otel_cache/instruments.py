"""OpenTelemetry instruments over pre-aggregated tallies.

Counters and gauges are observable instruments whose callbacks read the tallies.
The OpenTelemetry API has no asynchronous histogram, so a response-time histogram
that is already aggregated (exact bucket counts) is reported through an observable
instrument whose :class:`~conduit_otel_cache.sdk_hook.PreAggregatedHistogram` view turns
the observed :class:`~conduit_otel_cache.model.ResponseTimes` into a histogram data point
(the one private SDK hook, kept and checked in :mod:`conduit_otel_cache.sdk_hook`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import View

from .model import Statistics
from .sdk_hook import HistogramObservation, PreAggregatedHistogram

SCOPE = "conduit_otel_cache"

#: (instrument name, unit, description, Statistics attribute) of the event counters.
COUNTER_INSTRUMENTS = (
    ("conduit.cache.hits", "{hit}", "Cache hits", "hit_count"),
    ("conduit.cache.misses", "{miss}", "Cache misses", "miss_count"),
    ("conduit.cache.sets", "{set}", "Cache writes", "set_count"),
    ("conduit.cache.evictions", "{eviction}", "Cache evictions and expiries", "eviction_count"),
)
SIZE_INSTRUMENT = "conduit.cache.size"
RESPONSE_TIME_INSTRUMENT = "conduit.cache.response_time"

Snapshot = Callable[[], Mapping[str, Statistics]]


def observe(
    snapshot: Snapshot, value: Callable[[Statistics], Any], key: str = "region"
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """A callback that reports ``value(stats)`` for every region of ``snapshot()``."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value(stats), {key: name}) for name, stats in snapshot().items()]

    return callback


class OncePerCollection:
    """One ``snapshot()`` shared by the callbacks of one collection, whatever order the SDK
    calls them in: a callback that asks again has started the next collection, which
    takes a fresh one (so a final collection sees every event recorded before it)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._current: Mapping[str, Statistics] | None = None
        self._used: set[int] = set()
        self._lock = threading.Lock()
        self._keys = itertools.count()

    def reader(self) -> Snapshot:
        """A ``snapshot`` for one callback."""
        key = next(self._keys)

        def read() -> Mapping[str, Statistics]:
            with self._lock:
                if self._current is None or key in self._used:
                    self._current = self._snapshot()
                    self._used = set()
                self._used.add(key)
                return self._current

        return read


def register_cache_instruments(meter: Meter, snapshot: Snapshot) -> None:
    """Create the ``conduit.cache.*`` instruments on ``meter``, reading ``snapshot()`` once
    per collection."""
    once = OncePerCollection(snapshot)
    for name, unit, description, attr in COUNTER_INSTRUMENTS:
        meter.create_observable_counter(
            name,
            callbacks=[observe(once.reader(), _getter(attr))],
            unit=unit,
            description=description,
        )
    meter.create_observable_gauge(
        SIZE_INSTRUMENT,
        callbacks=[observe(once.reader(), _getter("size_bytes"))],
        unit="By",
        description="Cache size",
    )
    meter.create_observable_gauge(
        RESPONSE_TIME_INSTRUMENT,
        callbacks=[
            observe(once.reader(), lambda stats: HistogramObservation(stats.response_times))
        ],
        unit="s",
        description="Cache lookup response time",
    )


class _Folded(Protocol):
    """What the recorder folded or dropped."""

    @property
    def invalid_events(self) -> int: ...
    @property
    def overflow_events(self) -> int: ...
    @property
    def rejected_values(self) -> int: ...


def register_self_instruments(
    meter: Meter, state: _Folded, flush_errors: Callable[[], int]
) -> None:
    """Instruments about this instance's own statistics pipeline: failed flushes,
    events folded into ``_invalid``/``_overflow``, rejected values."""

    def counter(name: str, unit: str, description: str, read: Callable[[], Any]) -> None:
        meter.create_observable_counter(
            name,
            callbacks=[lambda options: [Observation(read())]],
            unit=unit,
            description=description,
        )

    counter(
        "conduit.cache.flush.errors",
        "{error}",
        "Failed write-throughs to Redis",
        flush_errors,
    )
    counter(
        "conduit.cache.rejected_values",
        "{value}",
        "Invalid response times or sizes dropped",
        lambda: state.rejected_values,
    )
    meter.create_observable_counter(
        "conduit.cache.folded_events",
        callbacks=[
            lambda options: [
                Observation(state.invalid_events, {"reason": "invalid_region"}),
                Observation(state.overflow_events, {"reason": "max_regions"}),
            ]
        ],
        unit="{event}",
        description="Events counted under _invalid or _overflow instead of their region",
    )


def _getter(attr: str) -> Callable[[Statistics], Any]:
    return lambda stats: getattr(stats, attr)


def histogram_views(*names: str) -> list[View]:
    """Views that report the named observable instruments as histograms."""
    return [View(instrument_name=name, aggregation=PreAggregatedHistogram()) for name in names]

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
from opentelemetry.sdk.metrics import Exemplar, ExemplarReservoir
from opentelemetry.sdk.metrics.view import View

from .background import let_others_run
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
#: the instruments about the pipeline itself (:func:`register_self_instruments`)
SELF_INSTRUMENTS = (
    "conduit.cache.flush.errors",
    "conduit.cache.rejected_values",
    "conduit.cache.folded_events",
)

Snapshot = Callable[[], Mapping[str, Statistics]]
#: ``{(instrument name, region): value}`` last observed by the write-through's collections
Observed = dict[tuple[str, str], Any]


def observe(
    snapshot: Snapshot,
    value: Callable[[Statistics], Any],
    key: str = "region",
    *,
    changed: Observed | None = None,
    name: str = "",
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """A callback that reports ``value(stats)`` for every region of ``snapshot()`` (taken
    when the SDK starts reading the observations). With ``changed`` (the write-through's
    own provider), only the regions whose value of instrument ``name`` differs from what
    ``changed`` holds, noted there once the SDK took the observation in: the exporter keeps
    the others (:class:`~.writethrough.RedisMetricExporter`), so that a flush does not make
    the SDK collect what did not change."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        # the SDK takes in each observation as it is produced: between them, the
        # application's threads get their turn every STEP
        for region, stats in snapshot().items():
            let_others_run()
            observed = value(stats)
            if changed is None:
                yield Observation(observed, {key: region})
            elif changed.get((name, region)) != observed:  # a histogram's: its count
                yield Observation(observed, {key: region})
                changed[(name, region)] = observed  # taken in: the SDK asked for the next

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


def register_cache_instruments(
    meter: Meter, snapshot: Snapshot, *, changed: Observed | None = None
) -> None:
    """Create the ``conduit.cache.*`` instruments on ``meter``, reading ``snapshot()`` once
    per collection; with ``changed``, reporting only what changed (:func:`observe`)."""
    once = OncePerCollection(snapshot)
    for name, unit, description, attr in COUNTER_INSTRUMENTS:
        meter.create_observable_counter(
            name,
            callbacks=[observe(once.reader(), _getter(attr), changed=changed, name=name)],
            unit=unit,
            description=description,
        )
    meter.create_observable_gauge(
        SIZE_INSTRUMENT,
        callbacks=[
            observe(once.reader(), _getter("size_bytes"), changed=changed, name=SIZE_INSTRUMENT)
        ],
        unit="By",
        description="Cache size",
    )
    meter.create_observable_gauge(
        RESPONSE_TIME_INSTRUMENT,
        callbacks=[
            observe(
                once.reader(),
                lambda stats: HistogramObservation(stats.response_times),
                changed=changed,
                name=RESPONSE_TIME_INSTRUMENT,
            )
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

    errors, rejected, folded = SELF_INSTRUMENTS
    counter(
        errors,
        "{error}",
        "Failed write-throughs to Redis",
        flush_errors,
    )
    counter(
        rejected,
        "{value}",
        "Invalid response times or sizes dropped",
        lambda: state.rejected_values,
    )
    meter.create_observable_counter(
        folded,
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


class NoExemplars(ExemplarReservoir):
    """The exemplar reservoir of conduit's instruments: none. They are observable, measured
    in the collection's callbacks where no span is current, so a reservoir would keep
    nothing and only cost time (about a tenth of a collection). The SDK asks it once per
    data point as it assembles a collection, the longest stretch of a flush: there it
    lets the application's threads run every :data:`~.background.STEP`."""

    def __init__(self, **kwargs: Any) -> None:
        """Whatever the aggregation passes (bucket boundaries, a size) is not needed."""

    def offer(self, value: Any, time_unix_nano: int, attributes: Any, context: Any) -> None:
        """Kept nowhere."""

    def collect(self, point_attributes: Any) -> list[Exemplar]:
        """None."""
        let_others_run()
        return []


def views() -> list[View]:
    """One view per conduit instrument (of the :data:`SCOPE` meter only): the response-time
    histogram from pre-aggregated observations, and no exemplars."""
    names = (
        *(name for name, *_ in COUNTER_INSTRUMENTS),
        SIZE_INSTRUMENT,
        RESPONSE_TIME_INSTRUMENT,
        *SELF_INSTRUMENTS,
    )
    return [
        View(
            instrument_name=name,
            meter_name=SCOPE,
            aggregation=PreAggregatedHistogram() if name == RESPONSE_TIME_INSTRUMENT else None,
            exemplar_reservoir_factory=_no_exemplars,
        )
        for name in names
    ]


def _no_exemplars(aggregation: type) -> Callable[..., ExemplarReservoir]:
    return NoExemplars

"""OpenTelemetry instruments over pre-aggregated tallies.

Counters and gauges are observable instruments whose callbacks read the tallies.
The OpenTelemetry API has no asynchronous histogram, so a response-time histogram
that is already aggregated (exact bucket counts) is reported through an observable
instrument whose :class:`PreAggregatedHistogram` view turns the observed
:class:`~conduit_otel_cache.model.ResponseTimes` into a histogram data point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics._internal.aggregation import (
    AggregationTemporality,
    _ExplicitBucketHistogramAggregation,
)
from opentelemetry.sdk.metrics._internal.measurement import Measurement
from opentelemetry.sdk.metrics._internal.point import HistogramDataPoint
from opentelemetry.sdk.metrics.view import Aggregation, View

from .model import ResponseTimes, Statistics

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


def register_cache_instruments(meter: Meter, snapshot: Snapshot) -> None:
    """Create the ``conduit.cache.*`` instruments on ``meter``, reading ``snapshot()``."""
    for name, unit, description, attr in COUNTER_INSTRUMENTS:
        meter.create_observable_counter(
            name,
            callbacks=[observe(snapshot, _getter(attr))],
            unit=unit,
            description=description,
        )
    meter.create_observable_gauge(
        SIZE_INSTRUMENT,
        callbacks=[observe(snapshot, _getter("size_bytes"))],
        unit="By",
        description="Cache size",
    )
    meter.create_observable_gauge(
        RESPONSE_TIME_INSTRUMENT,
        callbacks=[observe(snapshot, lambda stats: HistogramObservation(stats.response_times))],
        unit="s",
        description="Cache lookup response time",
    )


class HistogramObservation(float):
    """An observed value that carries a whole histogram.

    Its float value is the observation count, which is what a reader without the
    :class:`PreAggregatedHistogram` view reports (as a gauge).
    """

    histogram: ResponseTimes

    def __new__(cls, histogram: ResponseTimes) -> HistogramObservation:
        obj = super().__new__(cls, histogram.count)
        obj.histogram = histogram
        return obj


class _SelfState(Protocol):
    @property
    def invalid_events(self) -> int: ...
    @property
    def overflow_events(self) -> int: ...
    @property
    def rejected_values(self) -> int: ...
    @property
    def flush_errors(self) -> int: ...


def register_self_instruments(meter: Meter, state: _SelfState) -> None:
    """Instruments about this instance's own statistics pipeline: failed flushes,
    events folded into ``_invalid``/``_overflow``, rejected values."""

    def counter(name: str, unit: str, description: str, read: Callable[[], Any]) -> None:
        meter.create_observable_counter(
            name, callbacks=[lambda options: [Observation(read())]], unit=unit,
            description=description,
        )  # fmt: skip

    counter("conduit.cache.flush.errors", "{error}", "Failed write-throughs to Redis",
            lambda: state.flush_errors)  # fmt: skip
    counter("conduit.cache.rejected_values", "{value}", "Invalid response times or sizes dropped",
            lambda: state.rejected_values)  # fmt: skip
    meter.create_observable_counter(
        "conduit.cache.folded_events",
        callbacks=[lambda options: [
            Observation(state.invalid_events, {"reason": "invalid_region"}),
            Observation(state.overflow_events, {"reason": "max_regions"}),
        ]],
        unit="{event}",
        description="Events counted under _invalid or _overflow instead of their region",
    )  # fmt: skip


def _getter(attr: str) -> Callable[[Statistics], Any]:
    return lambda stats: getattr(stats, attr)


def histogram_views(*names: str) -> list[View]:
    """Views that report the named observable instruments as histograms."""
    return [View(instrument_name=name, aggregation=PreAggregatedHistogram()) for name in names]


class PreAggregatedHistogram(Aggregation):
    """Aggregation for an observable instrument whose observations are whole histograms."""

    def _create_aggregation(
        self,
        instrument: Any,
        attributes: Any,
        reservoir_factory: Any,
        start_time_unix_nano: int,
    ) -> _PreAggregatedHistogramAggregation:
        return _PreAggregatedHistogramAggregation(
            attributes,
            AggregationTemporality.CUMULATIVE,
            start_time_unix_nano,
            reservoir_factory(_ExplicitBucketHistogramAggregation),
            boundaries=(),
            record_min_max=False,
        )


class _PreAggregatedHistogramAggregation(_ExplicitBucketHistogramAggregation):
    """Keeps the last observed cumulative histogram; reports it cumulative or as a delta."""

    _latest: ResponseTimes | None = None
    _reported: ResponseTimes | None = None

    def aggregate(self, measurement: Measurement, should_sample_exemplar: bool = True) -> None:
        value: Any = measurement.value
        if isinstance(value, HistogramObservation):
            with self._lock:
                self._latest = value.histogram

    def collect(  # type: ignore[override]
        self,
        collection_aggregation_temporality: AggregationTemporality,
        collection_start_nano: int,
    ) -> HistogramDataPoint | None:
        with self._lock:
            latest, self._latest = self._latest, None
            if latest is None:
                return None
            start = self._start_time_unix_nano
            point = latest
            if collection_aggregation_temporality is AggregationTemporality.DELTA:
                previous = self._reported
                start = self._previous_collection_start_nano
                self._previous_collection_start_nano = collection_start_nano
                self._reported = latest
                if previous is not None and previous.bounds == latest.bounds:
                    point = ResponseTimes(
                        latest.bounds,
                        tuple(a - b for a, b in zip(latest.counts, previous.counts)),
                        latest.sum - previous.sum,
                    )
            return HistogramDataPoint(
                attributes=self._attributes,
                exemplars=[],
                start_time_unix_nano=start,
                time_unix_nano=collection_start_nano,
                count=point.count,
                sum=point.sum,
                bucket_counts=point.counts,
                explicit_bounds=point.bounds,
                min=float("inf"),
                max=float("-inf"),
            )

"""The one module that uses private OpenTelemetry SDK API, each use checked first.

Nothing public does these jobs:

- :class:`PreAggregatedHistogram` reports an observable instrument whose observations are
  whole histograms (the API has no asynchronous histogram) by subclassing the SDK's
  ``_ExplicitBucketHistogramAggregation`` and implementing ``Aggregation._create_aggregation``
  (:class:`PreAggregatedHistogramFor` chooses it for one instrument on a reader).
- :func:`collecting_readers` and :func:`exporter_of` tell which exporter a ``MeterProvider``
  already drives (``MeterProvider`` lists no readers publicly).
- :func:`reader_locks` gives the locks of a ``PeriodicExportingMetricReader`` that a fork
  must not find taken (the SDK keeps them in a forked child).

Each hook verifies, on first use, the signatures and attributes it relies on, and the
histogram hook runs an end-to-end self-test through a real ``MeterProvider``. A mismatch
raises :class:`SdkCompatibilityError` naming the installed SDK version: never wrong numbers.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import (
    AlignedHistogramBucketExemplarReservoir,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
)
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import Aggregation, DefaultAggregation

from .model import ResponseTimes

if TYPE_CHECKING:  # no public path for the measurement type
    from opentelemetry.sdk.metrics._internal.measurement import Measurement

__all__ = [
    "HistogramObservation",
    "PreAggregatedHistogram",
    "PreAggregatedHistogramFor",
    "SdkCompatibilityError",
    "check_histogram_hook",
    "collecting_readers",
    "collection_lock",
    "exporter_of",
    "histogram_point",
    "reader_locks",
    "stop_reader_thread",
]


class SdkCompatibilityError(RuntimeError):
    """The installed OpenTelemetry SDK lacks a private API this package relies on."""


def sdk_version(package: str = "opentelemetry-sdk") -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover - the SDK is a dependency
        return "unknown"


def _incompatible(what: str, package: str = "opentelemetry-sdk") -> SdkCompatibilityError:
    return SdkCompatibilityError(
        f"conduit-otel-cache does not support {package} {sdk_version(package)}: {what}. "
        f"Install a {package} version that conduit-otel-cache supports "
        "(README, Supported versions) or upgrade conduit-otel-cache."
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


class PreAggregatedHistogram(Aggregation):
    """Aggregation for an observable instrument whose observations are whole histograms."""

    def __init__(self) -> None:
        check_histogram_hook()

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


class PreAggregatedHistogramFor(Aggregation):
    """:class:`PreAggregatedHistogram` for the instrument named ``name``, the SDK's default
    aggregation for every other instrument (for a reader whose provider has no views)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._histogram = PreAggregatedHistogram()
        self._default = DefaultAggregation()

    def _create_aggregation(
        self,
        instrument: Any,
        attributes: Any,
        reservoir_factory: Any,
        start_time_unix_nano: int,
    ) -> Any:
        named = getattr(instrument, "name", None) == self._name
        chosen: Aggregation = self._histogram if named else self._default
        return chosen._create_aggregation(
            instrument, attributes, reservoir_factory, start_time_unix_nano
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
            return histogram_point(self._attributes, point, start, collection_start_nano)


def histogram_point(
    attributes: Any, histogram: ResponseTimes, start_ns: int, time_ns: int
) -> HistogramDataPoint:
    """``histogram`` as the SDK's data point (no min and max: the buckets hold none)."""
    return HistogramDataPoint(
        attributes=attributes,
        exemplars=[],
        start_time_unix_nano=start_ns,
        time_unix_nano=time_ns,
        count=histogram.count,
        sum=histogram.sum,
        bucket_counts=histogram.counts,
        explicit_bounds=histogram.bounds,
        min=math.inf,
        max=-math.inf,
    )


# -- checks -------------------------------------------------------------------------------

#: (class, method, parameters after self) as the hook calls or overrides them; the class
#: None stands for the histogram aggregation the hook subclasses
_EXPECTED_PARAMETERS: tuple[tuple[type | None, str, tuple[str, ...]], ...] = (
    (
        Aggregation,
        "_create_aggregation",
        ("instrument", "attributes", "reservoir_factory", "start_time_unix_nano"),
    ),
    (
        None,
        "__init__",
        (
            "attributes",
            "instrument_aggregation_temporality",
            "start_time_unix_nano",
            "reservoir_builder",
            "boundaries",
            "record_min_max",
        ),
    ),
    (None, "aggregate", ("measurement", "should_sample_exemplar")),
    (None, "collect", ("collection_aggregation_temporality", "collection_start_nano")),
)
_EXPECTED_ATTRIBUTES = (
    "_lock",
    "_attributes",
    "_start_time_unix_nano",
    "_previous_collection_start_nano",
)

_checked: dict[type, SdkCompatibilityError | None] = {}
_check_lock = threading.Lock()


def check_histogram_hook(base: type = _ExplicitBucketHistogramAggregation) -> None:
    """Raise :class:`SdkCompatibilityError` unless the private aggregation API that
    :class:`PreAggregatedHistogram` builds on is the one it was written for (checked once
    per ``base``; ``base`` is a parameter so that a test can hand in a changed class)."""
    with _check_lock:
        if base not in _checked:
            _checked[base] = _histogram_hook_error(base)
        error = _checked[base]
    if error is not None:
        raise error


def _histogram_hook_error(base: type) -> SdkCompatibilityError | None:
    for owner, method, expected in _EXPECTED_PARAMETERS:
        cls = base if owner is None else owner
        name = f"{cls.__name__}.{method}"
        try:
            parameters = tuple(inspect.signature(getattr(cls, method)).parameters)[1:]
        except (AttributeError, TypeError, ValueError) as exc:
            return _incompatible(f"{name} is missing ({exc})")
        if parameters != expected:
            return _incompatible(f"{name}{parameters} is not {name}{expected}")
    try:
        probe = base(
            {},
            AggregationTemporality.CUMULATIVE,
            1,
            AlignedHistogramBucketExemplarReservoir,
            boundaries=(),
            record_min_max=False,
        )
    except Exception as exc:
        return _incompatible(f"{base.__name__}(...) failed: {type(exc).__name__}: {exc}")
    missing = [a for a in _EXPECTED_ATTRIBUTES if not hasattr(probe, a)]
    if missing:
        return _incompatible(f"{base.__name__} has no {', '.join(missing)}")
    return _self_test() if base is _ExplicitBucketHistogramAggregation else None


def _self_test() -> SdkCompatibilityError | None:
    """Report a known histogram through a real provider; compare what comes out."""
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import View

    sent = [ResponseTimes((0.1, 1.0), (2, 1, 0), 0.75), ResponseTimes((0.1, 1.0), (3, 1, 1), 3.0)]
    kinds = _observable_kinds()
    readers = {
        temporality: InMemoryMetricReader(preferred_temporality=dict.fromkeys(kinds, temporality))
        for temporality in (AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA)
    }
    view = View(instrument_name="probe", aggregation=_UncheckedHistogram())
    provider = MeterProvider(
        metric_readers=list(readers.values()), views=[view], shutdown_on_exit=False
    )
    current: list[ResponseTimes] = []

    def observe(options: CallbackOptions) -> list[Observation]:
        return [Observation(HistogramObservation(current[0]), {"k": "v"})]

    try:
        provider.get_meter("conduit_otel_cache.sdk_hook").create_observable_gauge(
            "probe", callbacks=[observe]
        )
        got: dict[AggregationTemporality, list[tuple[Any, ...]]] = {t: [] for t in readers}
        for histogram in sent:
            current[:] = [histogram]
            for temporality, reader in readers.items():
                got[temporality].extend(_points(reader))
    except Exception as exc:
        return _incompatible(f"the histogram self-test failed: {type(exc).__name__}: {exc}")
    finally:
        provider.shutdown()
    bounds = (0.1, 1.0)
    expected = {
        AggregationTemporality.CUMULATIVE: [(bounds, (2, 1, 0), 0.75), (bounds, (3, 1, 1), 3.0)],
        AggregationTemporality.DELTA: [(bounds, (2, 1, 0), 0.75), (bounds, (1, 0, 1), 2.25)],
    }
    for temporality, points in got.items():
        if points != expected[temporality]:
            return _incompatible(
                f"the histogram self-test ({temporality.name}) reported {points}, "
                f"not {expected[temporality]}"
            )
    return None


class _UncheckedHistogram(PreAggregatedHistogram):
    def __init__(self) -> None:  # the self-test runs inside the check
        pass


def _points(reader: Any) -> list[tuple[Any, ...]]:
    data = reader.get_metrics_data()
    return [
        (tuple(p.explicit_bounds), tuple(p.bucket_counts), p.sum)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for p in metric.data.data_points
        if isinstance(p, HistogramDataPoint) and dict(p.attributes or {}) == {"k": "v"}
    ]


def _observable_kinds() -> list[type]:
    return [ObservableCounter, ObservableGauge]


# -- exporters and readers ----------------------------------------------------------------


def collecting_readers(provider: object) -> Sequence[MetricReader]:
    """The readers ``provider`` collects for now (those given to it and those added later);
    empty for a provider that is not the SDK's."""
    if not isinstance(provider, MeterProvider):
        return ()
    storages = getattr(getattr(provider, "_measurement_consumer", None), "_reader_storages", None)
    if not isinstance(storages, Mapping) or not all(
        isinstance(reader, MetricReader) for reader in storages
    ):
        raise _incompatible("MeterProvider._measurement_consumer._reader_storages changed")
    return list(storages)


def exporter_of(reader: MetricReader) -> MetricExporter | None:
    """The exporter a ``PeriodicExportingMetricReader`` drives; None for other readers."""
    if not isinstance(reader, PeriodicExportingMetricReader):
        return None
    exporter = getattr(reader, "_exporter", None)
    if not isinstance(exporter, MetricExporter):
        raise _incompatible("PeriodicExportingMetricReader._exporter is not its exporter")
    return exporter


def reader_locks(reader: PeriodicExportingMetricReader) -> tuple[Any, Any]:
    """The locks of ``reader`` that a fork must not find taken, in the order to take them:
    the lock it holds while it exports, and the lock of the event its thread waits on
    between exports, which that thread holds at each wake-up. The SDK starts the thread again
    in a forked child but keeps both: inherited taken, the child's thread never exports and
    its shutdown waits for ever (in ``Event.set``)."""
    lock = getattr(reader, "_export_lock", None)
    event = getattr(reader, "_shutdown_event", None)
    if not (hasattr(lock, "acquire") and hasattr(lock, "release")):
        raise _incompatible("PeriodicExportingMetricReader._export_lock is not a lock")
    if not (hasattr(event, "set") and hasattr(event, "wait")):
        raise _incompatible("PeriodicExportingMetricReader._shutdown_event is not an Event")
    # ``threading``'s Event waits on a Condition; gevent's (monkey-patched) takes no lock
    condition = getattr(event, "_cond", None)
    return lock, condition if isinstance(condition, threading.Condition) else None


def stop_reader_thread(reader: MetricReader) -> None:
    """Stop a ``PeriodicExportingMetricReader``'s thread without shutting the reader down
    (its shutdown would close the exporter, which a uWSGI master's workers inherit)."""
    event = getattr(reader, "_shutdown_event", None)
    thread = getattr(reader, "_daemon_thread", None)
    if isinstance(event, threading.Event):
        event.set()
    if isinstance(thread, threading.Thread) and thread.is_alive():
        thread.join(1.0)


def collection_lock(provider: object) -> Any:
    """The lock a ``MeterProvider`` holds while it collects (runs the callbacks); None if
    absent. Held across a fork, it would leave a child unable to collect."""
    consumer = getattr(provider, "_measurement_consumer", None)
    lock = getattr(consumer, "_lock", None)
    return lock if hasattr(lock, "acquire") and hasattr(lock, "release") else None

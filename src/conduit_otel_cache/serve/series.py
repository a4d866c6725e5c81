"""The cluster's series of one view, as data: a view goes in, series come out.

:func:`series` is a pure function of a :class:`~conduit_otel_cache.aggregate.ClusterView`
and the little state it needs besides (the settings, the aggregator's error count, the
time of collection): no instrument, callback or pinned view. Both outputs of ``serve``
derive from it: :func:`families` gives the prometheus_client families that ``/metrics``
renders (the serving process and its render child call the same function), and
:mod:`.otlp` turns the same series into OTLP data points.

Each series is named once, as an OpenTelemetry instrument (dots, UCUM unit, description);
its Prometheus family follows the OpenTelemetry-to-Prometheus conventions (underscores,
the unit's suffix, ``_total`` on counters, the description as ``HELP``), as
``opentelemetry-exporter-prometheus`` named them when it rendered these series. A family
with no point is left out.

A replica cut off from Redis (the last read failed) publishes no cluster series, only its
own: ``redis_up`` 0, data age, health and the counters, so that its last good values never
mask the replicas that can read Redis (docs/metrics.md, "Replicas").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..aggregate import ClusterView
from ..config import ServeSettings
from ..health import evaluate
from ..instruments import COUNTER_INSTRUMENTS, RESPONSE_TIME_INSTRUMENT, SIZE_INSTRUMENT
from ..model import ResponseTimes, Statistics

#: the response header with the age in seconds of the Redis read a scrape reflects
DATA_AGE_HEADER = "X-Conduit-Data-Age"
#: at most this many keys with malformed entries get a series (the first found)
MAX_MALFORMED_KEYS = 20
#: flush error kinds published at 0 until an instance reports one (a breakdown by kind:
#: other kinds appear when first reported, born at their count; the kindless
#: ``conduit_cache_instances_flush_errors_all_kinds_total``, published from 0, counts
#: every failure, the first of a new kind too)
FLUSH_ERROR_KINDS = (
    "ConnectionError",
    "TimeoutError",
    "OutOfMemoryError",
    "NoPermissionError",
    "AuthenticationError",
    "ReadOnlyError",
    "ResponseError",
)
#: UCUM units and the Prometheus unit suffix of each (the others, ``1`` and ``{...}``, none)
PROMETHEUS_UNITS = {"s": "seconds", "By": "bytes", "%": "percent"}

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]
Value = int | float | ResponseTimes
Point = tuple[Labels, Value]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One series: its OpenTelemetry instrument name, unit, description and kind."""

    name: str
    unit: str
    description: str
    kind: Kind


@dataclasses.dataclass(frozen=True)
class Series:
    """A spec and its points (labels, value) in one view."""

    spec: Spec
    points: Sequence[Point]


def _spec(name: str, unit: str, description: str, kind: Kind = "gauge") -> Spec:
    return Spec(name, unit, description, kind)


#: the event counters, one per :data:`~conduit_otel_cache.instruments.COUNTER_INSTRUMENTS`
COUNTERS = tuple(
    (_spec(name, unit, description, "counter"), attr)
    for name, unit, description, attr in COUNTER_INSTRUMENTS
)
SIZE = _spec(SIZE_INSTRUMENT, "By", "Cache size")
RESPONSE_TIME = _spec(RESPONSE_TIME_INSTRUMENT, "s", "Cache lookup response time", "histogram")
HIT_RATIO = _spec(
    "conduit.cache.hit_ratio", "1", "Cluster hit ratio (0-1) over the lifetime totals"
)
DRIFT = _spec(
    "conduit.cache.drift",
    "%",
    "Largest distance between a live instance's hit ratio and the live cluster's over the "
    "hits and misses since the previous per-instance pass, in percentage points (hit ratio "
    "x 100)",
)
INSTANCE_HIT_RATIO = _spec(
    "conduit.cache.instance.hit_ratio", "1", "Hit ratio (0-1) of one live instance"
)
INSTANCES_ACTIVE = _spec("conduit.cache.instances.active", "{instance}", "Live instances")
INSTANCES_MISSING = _spec(
    "conduit.cache.instances.missing",
    "{instance}",
    "Registered instances whose heartbeat expired",
)
INSTANCE_MISSING = _spec(
    "conduit.cache.instance.missing",
    "s",
    "Seconds since the heartbeat of a registered instance expired (until cleanup removes it)",
)
MALFORMED_ENTRIES = _spec(
    "conduit.cache.malformed_entries",
    "{entry}",
    f"Malformed entries skipped in one Redis key at the last read (at most "
    f"{MAX_MALFORMED_KEYS} keys)",
)
REDIS_UP = _spec("conduit.cache.redis.up", "1", "1 when the last aggregation reached Redis")
AGGREGATION_LATENCY = _spec(
    "conduit.cache.aggregation.latency", "s", "Duration of the last aggregation"
)
REDIS_MEMORY = _spec("conduit.cache.redis.memory", "By", "used_memory of the whole Redis server")
LAST_SUCCESS = _spec(
    "conduit.cache.last_successful_aggregation.timestamp",
    "s",
    "Unix time of the last successful aggregation",
)
HEALTH_STATUS = _spec("conduit.cache.health.status", "1", "0 Healthy, 1 Degraded, 2 Unhealthy")
DATA_AGE = _spec(
    "conduit.cache.exporter.data_age",
    "s",
    "Seconds from the Redis read these series reflect to their collection (a scrape's own "
    f"data age is its {DATA_AGE_HEADER} header)",
)
AGGREGATION_ERRORS = _spec(
    "conduit.cache.aggregation.errors",
    "{error}",
    "Malformed entries skipped by aggregation",
    "counter",
)
FLUSH_ERRORS = _spec(
    "conduit.cache.instances.flush_errors",
    "{error}",
    "Failed flushes of every instance by error kind, carried through Redis by the instance's "
    "next successful write",
    "counter",
)
FLUSH_ERRORS_ALL_KINDS = _spec(
    "conduit.cache.instances.flush_errors.all_kinds",
    "{error}",
    "Failed flushes of every instance, every error kind together (published from 0: a first "
    "failure of any kind is an increase)",
    "counter",
)
DATA_LOSSES = _spec(
    "conduit.cache.data_losses",
    "{loss}",
    "Times Redis was found to have lost part of a region's statistics that no live instance "
    "could rebuild (what ended instances had added, or live gauges of departed ones)",
    "counter",
)


def stale(view: ClusterView, settings: ServeSettings, now: float) -> bool:
    """Whether ``view`` reached Redis but is older than ``settings.stale_after`` (its
    refresh has not ended: a Redis that trickles a reply, each piece within
    ``socket_timeout``)."""
    age = data_age(view, now)
    return view.redis_up and age is not None and age > settings.stale_after


def series(
    view: ClusterView, *, settings: ServeSettings, errors_total: int, now: float
) -> list[Series]:
    """Every cluster series of ``view`` (``errors_total``: the aggregator's malformed
    entries so far; ``now``: Unix time of the collection), in publishing order. A replica
    cut off from Redis, or whose view is :func:`stale`, publishes its own series only, so
    that rules taking the largest value over replicas use the fresh ones."""
    fresh = view.redis_up and not stale(view, settings, now)
    regions: Mapping[str, Statistics] = view.regions if fresh else {}

    def per_region(value: Callable[[Statistics], Value]) -> list[Point]:
        return [((("region", name),), value(stats)) for name, stats in regions.items()]

    def scalar(value: float | None) -> list[Point]:
        return [] if value is None else [((), value)]

    def cluster(value: Callable[[], float]) -> list[Point]:
        return scalar(value() if fresh else None)

    missing = view.missing_instances[: settings.max_instance_series] if fresh else ()
    flush_errors = dict.fromkeys(FLUSH_ERROR_KINDS, 0) | view.instance_flush_errors
    found: list[tuple[Spec, list[Point]]] = [
        *((spec, per_region(_attribute(attr))) for spec, attr in COUNTERS),
        (SIZE, per_region(lambda s: s.size_bytes)),
        (RESPONSE_TIME, per_region(lambda s: s.response_times)),
        (HIT_RATIO, per_region(lambda s: s.hit_ratio)),
        (DRIFT, [((("region", r),), d) for r, d in (view.drift if fresh else {}).items()]),
        (
            INSTANCE_HIT_RATIO,
            [
                ((("instance_id", instance_id), ("region", region)), ratio)
                for region, instance_id, ratio in (view.instance_series if fresh else ())
            ],
        ),
        (INSTANCES_ACTIVE, cluster(lambda: view.active_count)),
        (INSTANCES_MISSING, cluster(lambda: len(view.missing_instances))),
        (
            INSTANCE_MISSING,
            [
                ((("instance_id", i),), view.missing_for(i, settings.instance_timeout))
                for i in missing
            ],
        ),
        (
            MALFORMED_ENTRIES,
            [((("key", k),), n) for k, n in _malformed(view.data_errors if fresh else ())],
        ),
        (REDIS_UP, scalar(int(view.redis_up))),
        (AGGREGATION_LATENCY, scalar(view.aggregation_latency)),
        (REDIS_MEMORY, cluster(lambda: view.redis_memory_bytes)),
        (LAST_SUCCESS, scalar(view.last_successful_aggregation)),
        (HEALTH_STATUS, scalar(int(evaluate(view, settings.health).status))),
        (DATA_AGE, scalar(data_age(view, now))),
        (AGGREGATION_ERRORS, scalar(errors_total)),
        (FLUSH_ERRORS, [((("kind", k),), n) for k, n in sorted(flush_errors.items())]),
        (FLUSH_ERRORS_ALL_KINDS, scalar(sum(view.instance_flush_errors.values()))),
        (DATA_LOSSES, [((("region", r),), n) for r, n in sorted(view.losses_published.items())]),
    ]
    return [Series(spec, points) for spec, points in found if points]


def families(
    view: ClusterView, *, settings: ServeSettings, errors_total: int, now: float
) -> list[Metric]:
    """The prometheus_client families of :func:`series` of ``view``."""
    return [family(s) for s in series(view, settings=settings, errors_total=errors_total, now=now)]


def family(found: Series) -> Metric:
    """One series as a prometheus_client family (labels in sorted order)."""
    spec = found.spec
    names = sorted({key for labels, _ in found.points for key, _ in labels})
    unit = PROMETHEUS_UNITS.get(spec.unit, "")
    name = spec.name.replace(".", "_")
    if spec.kind == "histogram":
        histogram = HistogramMetricFamily(name, spec.description, labels=names, unit=unit)
        for labels, value in found.points:
            assert isinstance(value, ResponseTimes)
            histogram.add_metric(_values(labels, names), _buckets(value), value.sum)
        return histogram
    kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    result = kind(name, spec.description, labels=names, unit=unit)
    for labels, value in found.points:
        assert not isinstance(value, ResponseTimes)
        result.add_metric(_values(labels, names), value)
    return result


def data_time(view: ClusterView) -> float | None:
    """Unix time of the Redis read ``view`` reflects (when its last good aggregation began)."""
    if view.last_successful_aggregation is None:
        return None
    return view.last_successful_aggregation - view.aggregation_latency


def data_age(view: ClusterView, now: float) -> float | None:
    """Seconds from the Redis read ``view`` reflects to ``now``; None before any."""
    found = data_time(view)
    return None if found is None else max(0.0, now - found)


def _values(labels: Labels, names: list[str]) -> list[str]:
    found = dict(labels)
    return [found.get(name, "") for name in names]


def _buckets(histogram: ResponseTimes) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, the bounds written as floats are (``+Inf`` last)."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*map(str, histogram.bounds), "+Inf"], histogram.counts):
        total += count
        buckets.append((bound, total))
    return buckets


def _malformed(errors: Iterable[str]) -> list[tuple[str, int]]:
    """The keys with malformed entries (every report names its key first, ``<key>: <what
    is wrong>``), at most :data:`MAX_MALFORMED_KEYS`, with their count."""
    keys: dict[str, int] = {}
    for error in errors:
        key = error.split(": ", 1)[0]
        if key in keys or len(keys) < MAX_MALFORMED_KEYS:
            keys[key] = keys.get(key, 0) + 1
    return list(keys.items())


def _attribute(attr: str) -> Callable[[Statistics], Value]:
    return lambda stats: getattr(stats, attr)

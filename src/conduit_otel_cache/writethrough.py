"""The write-through: an OpenTelemetry ``MetricExporter`` that turns one collection of the
``conduit.cache.*`` instruments into one Redis write (cumulative values + heartbeat)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
)

from .config import Settings
from .instruments import COUNTER_INSTRUMENTS, RESPONSE_TIME_INSTRUMENT, SCOPE, SIZE_INSTRUMENT
from .model import ResponseTimes
from .ratelimit import RateLimitedLog
from .store import Store

log = logging.getLogger(__name__)

_FIELDS = {name: attr for name, _, _, attr in COUNTER_INSTRUMENTS} | {SIZE_INSTRUMENT: "size_bytes"}


def points_to_fields(metrics_data: MetricsData) -> dict[str, dict[str, str]]:
    """``{region: {hash field: cumulative value}}`` from the ``conduit.cache.*`` metrics."""
    regions: dict[str, dict[str, str]] = {}
    for resource_metrics in metrics_data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SCOPE:
                continue
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    region = str(point.attributes.get("region", "")) if point.attributes else ""
                    if not region:
                        continue
                    fields = regions.setdefault(region, {"size_bytes": "0"})
                    if metric.name == RESPONSE_TIME_INSTRUMENT and isinstance(
                        point, HistogramDataPoint
                    ):
                        hist = ResponseTimes(
                            tuple(point.explicit_bounds), tuple(point.bucket_counts), point.sum
                        )
                        fields.update(hist.to_fields())
                    elif metric.name in _FIELDS and isinstance(point, NumberDataPoint):
                        fields[_FIELDS[metric.name]] = str(int(point.value))
    return regions


class RedisMetricExporter(MetricExporter):
    """Writes this instance's cumulative cache statistics through to Redis.

    Each ``export`` is one round trip; a failed export loses nothing because the
    next one sends the cumulative values again. Failures are counted and logged at
    a bounded rate, never raised into the application.
    """

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        super().__init__(
            preferred_temporality={cls: AggregationTemporality.CUMULATIVE for cls in _all_kinds()}
        )
        self.settings = settings
        self.store = store if store is not None else Store.from_settings(settings)
        self.token = uuid.uuid4().hex
        self.flush_count = 0
        self.flush_errors = 0
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.last_ok = False
        self._lock = threading.Lock()
        self._closed = False
        self._errors = RateLimitedLog(log)
        self._warned_duplicate = False
        #: where raw response times come from (set by the handle that records them)
        self.samples: Callable[[], dict[str, list[float]]] | None = None
        self._pending: dict[str, deque[float]] = {}

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Write the collected points to Redis (one script call)."""
        with self._lock:
            if self._closed:
                return MetricExportResult.FAILURE
            fields = points_to_fields(metrics_data)
            self._add_samples(fields)
            try:
                result = self.store.flush(
                    self.settings.instance_id,
                    self.token,
                    fields,
                    ttl=self.settings.statistics_ttl,
                    instance_timeout=self.settings.instance_timeout,
                )
            except Exception as exc:
                self.flush_errors += 1
                self.last_ok = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._errors.error(
                    "conduit-otel-cache: flush of instance %s to %s failed: %s",
                    self.settings.instance_id, self.settings.safe_redis_url, self.last_error,
                )  # fmt: skip
                return MetricExportResult.FAILURE
            self.flush_count += 1
            self._pending.clear()
            self.last_ok = True
            self.last_success = result.server_time
            if result.duplicate and not self._warned_duplicate:
                self._warned_duplicate = True
                log.warning(
                    "conduit-otel-cache: another live process flushes as instance %r; "
                    "give each process its own instance_id or totals will be wrong",
                    self.settings.instance_id,
                )
            return MetricExportResult.SUCCESS

    def _add_samples(self, fields: dict[str, dict[str, str]]) -> None:
        """Raw response times since the last successful flush, as one field per region
        (``samples:<max>:<ttl>``) that the flush script appends to a capped list."""
        if self.samples is None:
            return
        limit = self.settings.max_response_time_samples
        for region, new in self.samples().items():
            self._pending.setdefault(region, deque(maxlen=limit)).extend(new)
        ttl = max(1, int(self.settings.response_time_sample_ttl))
        for region, pending in self._pending.items():
            if pending and region in fields:
                fields[region][f"samples:{limit}:{ttl}"] = ",".join(repr(x) for x in pending)

    def heartbeat(self) -> bool:
        """Beat the heartbeat without a flush (``heartbeat_interval``); True on success.
        A failure is counted with the flush errors and logged at a bounded rate."""
        with self._lock:
            if self._closed:
                return False
            try:
                self.store.heartbeat(
                    self.settings.instance_id,
                    self.token,
                    ttl=self.settings.statistics_ttl,
                    instance_timeout=self.settings.instance_timeout,
                )
            except Exception as exc:
                self.flush_errors += 1
                self._errors.error(
                    "conduit-otel-cache: heartbeat of instance %s to %s failed: %s: %s",
                    self.settings.instance_id, self.settings.safe_redis_url,
                    type(exc).__name__, exc,
                )  # fmt: skip
                return False
            return True

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Exports are synchronous; nothing is buffered."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Deregister: take this instance's gauges out and remove its keys (counters stay)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.store.depart(self.settings.instance_id, remove=True)
            except Exception as exc:
                log.warning(
                    "conduit-otel-cache: could not deregister %s: %s; it expires after %gs",
                    self.settings.instance_id, type(exc).__name__, self.settings.instance_timeout,
                )  # fmt: skip
            finally:
                self.store.close()


def _all_kinds() -> list[type]:
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )

    return [Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter,
            ObservableGauge]  # fmt: skip

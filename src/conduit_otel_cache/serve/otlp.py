"""Pushing the cluster view over OTLP/HTTP (``serve --otlp-endpoint``).

No second list of series: every ``otlp_interval`` :class:`OtlpPush` takes the series that
``/metrics`` is rendered from (:func:`~conduit_otel_cache.serve.series.series` of the
aggregator's view), turns them into the SDK's ``MetricsData`` (:func:`metrics_data`: the
same instrument names, units, descriptions and attributes) and hands that to the SDK's
OTLP/HTTP exporter (``opentelemetry-exporter-otlp-proto-http``, the ``otlp`` extra). Every
series is reported cumulatively (one start time per replica), whatever
``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` says: the counters are the cluster's
totals, monotonic across a Redis data loss (:mod:`.continuity`), and the response-time
histogram is the exactly merged one, as on ``/metrics``. The resource is
``service.name`` ``conduit-otel-cache-exporter`` and ``service.instance.id`` the
replica's ``instance_id``. The exporter reads every other ``OTEL_EXPORTER_OTLP_*`` and
``OTEL_EXPORTER_OTLP_METRICS_*`` variable (headers, TLS files, timeout, compression) itself.

A push that fails is counted (``conduit_cache_exporter_otlp_pushes_total{result}`` on
``/metrics``) and logged at a bounded rate; the next one carries the cumulative values
again, so nothing is lost but resolution.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import Counter

from ..background import quietly
from ..config import ConfigError, ServeSettings, redact_url
from ..instruments import SCOPE
from ..model import ResponseTimes
from ..ratelimit import RateLimitedLog
from ..sdk_hook import histogram_point
from .series import Series

log = logging.getLogger(__name__)

#: the path of the metrics signal under an OTLP/HTTP endpoint
METRICS_PATH = "/v1/metrics"
#: ``service.name`` of the pushed resource (``service.instance.id`` is its ``instance_id``)
SERVICE_NAME = "conduit-otel-cache-exporter"
#: seconds :meth:`OtlpPush.stop` waits for a push in flight
STOP_TIMEOUT = 5.0


def metrics_url(endpoint: str) -> str:
    """``endpoint`` (a base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT``) with the metrics path
    appended; a URL that already ends in it is taken as it is."""
    base = endpoint.rstrip("/")
    return base if base.endswith(METRICS_PATH) else base + METRICS_PATH


def otlp_exporter(endpoint: str) -> MetricExporter:
    """The SDK's OTLP/HTTP metric exporter for ``endpoint``; :class:`ConfigError` naming
    ``otlp_endpoint`` when the ``otlp`` extra is not installed."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise ConfigError(
            f"otlp_endpoint: needs the otlp extra: pip install 'conduit-otel-cache[otlp]' ({exc})"
        ) from None
    exporter: MetricExporter = OTLPMetricExporter(endpoint=metrics_url(endpoint))
    return exporter


def metrics_data(
    found: Sequence[Series], resource: Resource, start_ns: int, now_ns: int
) -> MetricsData:
    """``found`` as OpenTelemetry data of ``resource``: counters as cumulative monotonic
    sums from ``start_ns``, gauges, and the response times as cumulative histograms, all
    at ``now_ns``."""
    metrics = []
    for one in found:
        spec = one.spec
        data: Sum | Gauge | Histogram
        if spec.kind == "histogram":
            data = Histogram(
                data_points=[
                    histogram_point(dict(labels), value, start_ns, now_ns)
                    for labels, value in one.points
                    if isinstance(value, ResponseTimes)
                ],
                aggregation_temporality=AggregationTemporality.CUMULATIVE,
            )
        else:
            points = [
                NumberDataPoint(
                    attributes=dict(labels),
                    start_time_unix_nano=start_ns if spec.kind == "counter" else 0,
                    time_unix_nano=now_ns,
                    value=value,
                )
                for labels, value in one.points
                if not isinstance(value, ResponseTimes)
            ]
            data = (
                Sum(
                    data_points=points,
                    aggregation_temporality=AggregationTemporality.CUMULATIVE,
                    is_monotonic=True,
                )
                if spec.kind == "counter"
                else Gauge(data_points=points)
            )
        metrics.append(
            Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data)
        )
    scope = ScopeMetrics(scope=InstrumentationScope(SCOPE), metrics=metrics, schema_url="")
    return MetricsData(
        resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[scope], schema_url="")]
    )


class OtlpPush:
    """Pushes the series that a function returns every ``settings.otlp_interval`` seconds
    (:meth:`start` it with :meth:`~conduit_otel_cache.serve.exposition.Exposition.series`).
    The resource is ``service.name`` :data:`SERVICE_NAME` and ``service.instance.id`` the
    replica's ``instance_id``."""

    def __init__(self, settings: ServeSettings, exporter: MetricExporter | None = None) -> None:
        if settings.otlp_endpoint is None and exporter is None:
            raise ConfigError("otlp_endpoint: required for an OTLP push")
        self.interval = settings.otlp_interval
        self.endpoint = redact_url(metrics_url(settings.otlp_endpoint or ""))
        self.exporter = exporter or otlp_exporter(settings.otlp_endpoint or "")
        self.resource = Resource.create(
            {"service.name": SERVICE_NAME, "service.instance.id": settings.instance_id}
        )
        #: the start of every cumulative series this replica pushes
        self.start_ns = time.time_ns()
        #: pushes by result (``success``, ``failure``), for ``/metrics``
        self.pushes = Counter(
            "conduit_cache_exporter_otlp_pushes",
            "OTLP pushes of the cluster view by result (success, failure)",
            ["result"],
            registry=None,
        )
        for result in ("success", "failure"):
            self.pushes.labels(result)
        self._collect: Callable[[], Sequence[Series]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = RateLimitedLog(log)

    def start(self, collect: Callable[[], Sequence[Series]]) -> None:
        """Push what ``collect()`` returns now and every ``interval`` seconds after."""
        self._collect = collect
        self._thread = threading.Thread(target=self._loop, daemon=True, name="conduit-otlp-push")
        self._thread.start()

    def push(self) -> bool:
        """Collect and push once; whether the receiver took it."""
        assert self._collect is not None, "start() first"
        try:
            with quietly():  # collecting is pure Python: scrapes being answered go first
                found = self._collect()
            data = metrics_data(found, self.resource, self.start_ns, time.time_ns())
            ok = self.exporter.export(data) is MetricExportResult.SUCCESS
            problem = "the receiver refused it or could not be reached (logged above)"
        except Exception as exc:
            ok, problem = False, f"{type(exc).__name__}: {exc}"
        self.pushes.labels("success" if ok else "failure").inc()
        if not ok:
            self._errors.error(
                "conduit-otel-cache: OTLP push to %s failed: %s", self.endpoint, problem
            )
        return ok

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.push()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop pushing and shut the exporter down (which cuts short a push that waits to
        retry)."""
        self._stop.set()
        self.exporter.shutdown()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT)

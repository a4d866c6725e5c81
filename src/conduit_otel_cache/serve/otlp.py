"""Pushing the cluster view over OTLP/HTTP (``serve --otlp-endpoint``).

No second list of series: :class:`OtlpPush` is one more reader of the exposition's
``MeterProvider`` (an ``InMemoryMetricReader``, public SDK API), so every
``otlp_interval`` it collects the very instruments and callbacks that ``/metrics`` is
rendered from, all over one view of the aggregator (:meth:`Exposition.read`), and hands
the data to the SDK's OTLP/HTTP exporter (``opentelemetry-exporter-otlp-proto-http``, the
``otlp`` extra). Every instrument is reported cumulatively, whatever
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

import dataclasses
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from opentelemetry.sdk.metrics import ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from prometheus_client import Counter

from ..background import quietly
from ..config import ConfigError, Settings, redact_url
from ..ratelimit import RateLimitedLog
from .exposition import series_limit

log = logging.getLogger(__name__)

#: the path of the metrics signal under an OTLP/HTTP endpoint
METRICS_PATH = "/v1/metrics"
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


def without_exemplars(data: MetricsData) -> MetricsData:
    """``data`` without exemplars. ``serve`` records no spans, and its provider samples no
    exemplars, but older SDKs (1.28, the floor) attach one to every observation of an
    observable instrument whatever the exemplar filter, with no span and trace id, which
    their OTLP exporter cannot encode (``EncodingException``: every push failed)."""
    if not any(
        p.exemplars
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    ):
        return data
    return dataclasses.replace(
        data,
        resource_metrics=[
            dataclasses.replace(
                rm,
                scope_metrics=[
                    dataclasses.replace(
                        sm,
                        metrics=[
                            dataclasses.replace(
                                m,
                                data=dataclasses.replace(
                                    cast(Any, m.data),
                                    data_points=[
                                        dataclasses.replace(p, exemplars=[])
                                        for p in m.data.data_points
                                    ],
                                ),
                            )
                            for m in sm.metrics
                        ],
                    )
                    for sm in rm.scope_metrics
                ],
            )
            for rm in data.resource_metrics
        ],
    )


class OtlpPush:
    """Pushes what :attr:`reader` collects every ``settings.otlp_interval`` seconds.

    Give :attr:`reader` to the :class:`~conduit_otel_cache.serve.exposition.Exposition`
    (``readers``), then :meth:`start` it with that exposition's :meth:`read`.
    """

    def __init__(self, settings: Settings, exporter: MetricExporter | None = None) -> None:
        if settings.otlp_endpoint is None and exporter is None:
            raise ConfigError("otlp_endpoint: required for an OTLP push")
        self.interval = settings.otlp_interval
        self.endpoint = redact_url(metrics_url(settings.otlp_endpoint or ""))
        self.exporter = exporter or otlp_exporter(settings.otlp_endpoint or "")
        options: dict[str, Any] = {}  # the SDK's default temporality: cumulative for all
        if "cardinality_limits" in inspect.signature(InMemoryMetricReader).parameters:
            limit = series_limit(settings)  # since sdk 1.45.2; no limit before
            options["cardinality_limits"] = {ObservableCounter: limit, ObservableGauge: limit}
        self.reader = InMemoryMetricReader(**options)
        #: pushes by result (``success``, ``failure``), for ``/metrics``
        self.pushes = Counter(
            "conduit_cache_exporter_otlp_pushes",
            "OTLP pushes of the cluster view by result (success, failure)",
            ["result"],
            registry=None,
        )
        for result in ("success", "failure"):
            self.pushes.labels(result)
        self._read: Callable[[InMemoryMetricReader], MetricsData | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = RateLimitedLog(log)

    def start(self, read: Callable[[InMemoryMetricReader], MetricsData | None]) -> None:
        """Push what ``read(reader)`` returns now and every ``interval`` seconds after."""
        self._read = read
        self._thread = threading.Thread(target=self._loop, daemon=True, name="conduit-otlp-push")
        self._thread.start()

    def push(self) -> bool:
        """Collect and push once; whether the receiver took it."""
        assert self._read is not None, "start() first"
        try:
            with quietly():  # collecting is pure Python: scrapes being answered go first
                data = self._read(self.reader)
            ok = data is None or self.exporter.export(without_exemplars(data)) is (
                MetricExportResult.SUCCESS
            )
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

"""The cluster view as observable OpenTelemetry instruments, exposed to Prometheus
through ``opentelemetry-exporter-prometheus`` on a private ``CollectorRegistry``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import Metric

from .aggregate import Aggregator, ClusterView
from .health import evaluate
from .instruments import (
    RESPONSE_TIME_INSTRUMENT,
    SCOPE,
    histogram_views,
    observe,
    register_cache_instruments,
)
from .model import Statistics


class ClusterExporter:
    """Publishes cluster totals, hit rates, drift and health for Prometheus to scrape."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.registry = CollectorRegistry(auto_describe=False)
        # Registered first, so each scrape takes one view that every callback then reads:
        # one scrape costs at most one aggregation, and its series are consistent.
        self._pinned: ClusterView | None = None
        self.registry.register(_PinView(self))
        # Series are bounded here (regions, max_instance_series), not folded by the SDK.
        limit = max(2000, aggregator.settings.max_instance_series + 1)
        self._reader = PrometheusMetricReader(
            registry=self.registry,
            scope_info_enabled=False,
            disable_target_info=True,
            cardinality_limits={ObservableGauge: limit, ObservableCounter: limit},
        )
        self.meter_provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "conduit-otel-cache-exporter"}),
            views=histogram_views(RESPONSE_TIME_INSTRUMENT),
            shutdown_on_exit=False,
            exemplar_filter=AlwaysOffExemplarFilter(),  # no spans here; Prometheus text has none
        )
        meter = self.meter_provider.get_meter(SCOPE)
        regions = self._regions
        register_cache_instruments(meter, regions)
        gauges: list[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]]] = [
            ("conduit.cache.hit_ratio", "1", "Cluster hit ratio (0-1) over the lifetime totals",
             observe(regions, lambda s: s.hit_ratio)),
            ("conduit.cache.hit_rate", "{percent}", "Cluster hit rate in percent (0-100)",
             observe(regions, lambda s: s.hit_rate)),
            ("conduit.cache.drift", "%", "Largest distance in percentage points between a live "
             "instance's hit rate and the live cluster's", self._drift),
            ("conduit.cache.instance.hit_ratio", "1", "Hit ratio (0-1) of one live instance",
             self._instance_ratios),
            ("conduit.cache.instances.active", "{instance}", "Live instances",
             self._scalar(lambda v: v.active_count)),
            ("conduit.cache.instances.missing", "{instance}",
             "Registered instances whose heartbeat expired",
             self._scalar(lambda v: len(v.missing_instances))),
            ("conduit.cache.redis.up", "1", "1 when the last aggregation reached Redis",
             self._scalar(lambda v: int(v.redis_up))),
            ("conduit.cache.aggregation.latency", "s", "Duration of the last aggregation",
             self._scalar(lambda v: v.aggregation_latency)),
            ("conduit.cache.redis.memory", "By", "Redis used_memory",
             self._scalar(lambda v: v.redis_memory_bytes)),
            ("conduit.cache.last_successful_aggregation.timestamp", "s",
             "Unix time of the last successful aggregation",
             self._scalar(lambda v: v.last_successful_aggregation)),
            ("conduit.cache.health.status", "1", "0 Healthy, 1 Degraded, 2 Unhealthy",
             self._scalar(lambda v: int(evaluate(v, aggregator.settings).status))),
        ]  # fmt: skip
        for name, unit, description, callback in gauges:
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )
        meter.create_observable_counter(
            "conduit.cache.aggregation.errors",
            callbacks=[self._scalar(lambda v: self.aggregator.errors_total)],
            unit="{error}",
            description="Malformed entries skipped by aggregation",
        )

    def pin(self) -> None:
        """Take the view that the callbacks of this scrape will read."""
        self._pinned = self.aggregator.view()

    def _view(self) -> ClusterView:
        return self._pinned if self._pinned is not None else self.aggregator.view()

    def _regions(self) -> dict[str, Statistics]:
        return self._view().regions

    def _drift(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(d, {"region": r}) for r, d in self._view().drift.items()]

    def _instance_ratios(self, options: CallbackOptions) -> Iterable[Observation]:
        """Live instances' hit ratios, the ``max_instance_series`` farthest from their
        region's live hit rate (selected by the aggregator's per-instance pass)."""
        return [
            Observation(rate / 100.0, {"region": region, "instance_id": instance_id})
            for region, instance_id, rate in self._view().instance_series
        ]

    def _scalar(
        self, value: Callable[[ClusterView], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            result = value(self._view())
            return [] if result is None else [Observation(result)]

        return callback

    def wsgi_app(self) -> Callable[..., Any]:
        """The WSGI app that answers ``GET /metrics`` with this exporter's series."""
        return make_wsgi_app(self.registry)

    def shutdown(self) -> None:
        """Stop the meter provider and unregister from the registry."""
        self.meter_provider.shutdown()


class _PinView:
    """A collector without metrics that pins the exporter's view for one scrape."""

    def __init__(self, exporter: ClusterExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        self._exporter.pin()
        return []

"""The handle ``setup()`` returns: the hot path plus flush, cluster reads and shutdown."""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections.abc import Sequence

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .aggregate import Aggregator, ClusterView
from .api import ASGIApp, WSGIApp, make_stats_app, make_stats_asgi_app
from .autoconfig import shared_write_through
from .config import Settings
from .health import Health, evaluate
from .instruments import (
    RESPONSE_TIME_INSTRUMENT,
    SCOPE,
    histogram_views,
    register_cache_instruments,
    register_self_instruments,
)
from .integrations.lookup import TimedLookup
from .model import Statistics
from .recorder import Recorder
from .strategies import AggregationStrategy, strategy_named
from .writethrough import RedisMetricExporter

log = logging.getLogger(__name__)

_open_handles: weakref.WeakSet[CacheStatistics] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for handle in list(_open_handles):
        handle.shutdown()


def views() -> list[object]:
    """Views to pass to your own ``MeterProvider`` so it can report the response-time
    histogram (``MeterProvider(views=conduit_otel_cache.views(), ...)``)."""
    return list(histogram_views(RESPONSE_TIME_INSTRUMENT))


def _beat_until(exporter: RedisMetricExporter, every: float, stop: threading.Event) -> None:
    # a module function: the thread holds the exporter, not the handle
    while not stop.wait(every):
        exporter.heartbeat()


class CacheStatistics(Recorder):
    """Cache statistics of this instance, written through to Redis every ``flush_interval``."""

    def __init__(
        self,
        settings: Settings,
        *,
        meter_provider: MeterProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
        aggregation_strategy: AggregationStrategy | None = None,
    ) -> None:
        # mode "local" (or enabled=False on a direct construction): no exporter, no reader,
        # no Redis call at all, even with a redis_url
        distributed = settings.redis_url is not None and settings.mode != "local"
        distributed = distributed and settings.enabled
        keep = settings.enable_response_time_tracking and distributed
        super().__init__(
            settings.response_time_buckets,
            settings.max_regions,
            settings.default_region,
            max_samples=settings.max_response_time_samples if keep else 0,
        )
        self.settings = settings
        self.strategy: AggregationStrategy = aggregation_strategy or strategy_named(
            settings.aggregation_strategy, settings.aggregation_cache_ttl
        )
        self.exporter: RedisMetricExporter | None = None
        self._aggregator: Aggregator | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._flushes = threading.Condition()  # batches concurrent flush() calls
        self._flushing = False
        self._flush_started = -math.inf
        self._flush_result = False
        readers = list(metric_readers)
        self._reader: PeriodicExportingMetricReader | None = None
        shared = (
            shared_write_through(meter_provider, settings)
            if meter_provider is not None and distributed
            else None
        )
        if distributed and shared is None:
            self.exporter = RedisMetricExporter(settings)
            interval = settings.flush_interval
            self._reader = PeriodicExportingMetricReader(
                self.exporter,
                export_interval_millis=math.inf if interval is None else interval * 1000,
                export_timeout_millis=max(settings.socket_timeout * 2000, 1000),
            )
        resource = Resource.create(
            {"service.name": settings.service_name, "service.instance.id": settings.instance_id}
        )
        private_readers = [self._reader] if self._reader else []
        if meter_provider is None:
            provider = MeterProvider(
                metric_readers=[*readers, *private_readers],
                resource=resource,
                views=histogram_views(RESPONSE_TIME_INSTRUMENT),
                shutdown_on_exit=False,
            )
            self.meter_provider = provider
            self._owned = [provider]
            if settings.set_global:
                metrics.set_meter_provider(provider)
        else:
            # The user's provider gets the instruments; the write-through gets its own.
            self.meter_provider = meter_provider
            self._owned = []
            register_cache_instruments(meter_provider.get_meter(SCOPE), self.snapshot)
            if shared is not None:  # it writes through already (conduit_redis exporter)
                self._reader, self.exporter = shared
            elif private_readers:
                self._owned.append(
                    MeterProvider(
                        metric_readers=private_readers,
                        resource=resource,
                        views=histogram_views(RESPONSE_TIME_INSTRUMENT),
                        shutdown_on_exit=False,
                    )
                )
        for provider in self._owned:
            register_cache_instruments(provider.get_meter(SCOPE), self.snapshot)
        register_self_instruments(self.meter_provider.get_meter(SCOPE), self)
        if self.exporter is not None:
            self.exporter.samples = self.drain_samples
        self._stop_beats = threading.Event()
        if self.exporter is not None and settings.heartbeat_interval is not None:
            exporter, every = self.exporter, settings.heartbeat_interval
            threading.Thread(
                target=_beat_until, args=(exporter, every, self._stop_beats), daemon=True,
                name="conduit-heartbeat",
            ).start()  # fmt: skip
        _open_handles.add(self)

    # -- this instance ------------------------------------------------------------------

    def local_statistics(self, region: str) -> Statistics:
        """This instance's statistics of ``region`` (zeros for an unknown region)."""
        return self.snapshot().get(region, Statistics(instance_count=1))

    def wsgi_app(self) -> WSGIApp:
        """A WSGI app serving ``GET /api/cache/stats/local`` (this instance) and
        ``/api/cache/stats/distributed`` (the cluster view) as JSON per region."""
        return make_stats_app(local=self.snapshot, cluster=lambda: self.cluster_view().regions)

    def asgi_app(self) -> ASGIApp:
        """The same API as :meth:`wsgi_app` as an ASGI app (Starlette, FastAPI, uvicorn)."""
        return make_stats_asgi_app(local=self.snapshot, cluster=lambda: self.cluster_view().regions)

    def timed_lookup(self, region: str) -> TimedLookup:
        """``with stats.timed_lookup(region) as lookup:`` ... ``lookup.hit()`` or
        ``lookup.miss()``: records the outcome with its response time (nothing if it raises)."""
        return TimedLookup(self, region)

    def flush(self) -> bool:
        """Write this instance's statistics through to Redis now; True when it succeeded.

        Concurrent calls are batched: a call waits up to ``batch_timeout`` for a flush in
        progress, and when a flush that began after the call has finished, it carried the
        call's events, so its result is shared instead of writing again.
        """
        if self._reader is None or self._closed or self.exporter is None:
            return False
        requested = time.monotonic()
        wait = self.settings.batch_timeout if self.settings.enable_batching else 0.0
        with self._flushes:
            deadline = requested + wait
            while self._flushing and time.monotonic() < deadline:
                self._flushes.wait(deadline - time.monotonic())
            if not self._flushing and self._flush_started >= requested:
                return self._flush_result  # a later flush already wrote these events
            self._flushing = True
            self._flush_started = time.monotonic()
        ok = False
        try:
            self._reader.force_flush(timeout_millis=self.settings.socket_timeout * 2000)
            ok = self.exporter.last_ok
        finally:
            with self._flushes:
                self._flushing = False
                self._flush_result = ok
                self._flushes.notify_all()
        if self._aggregator is not None:
            self._aggregator.invalidate()
        return ok

    @property
    def flush_errors(self) -> int:
        """Failed write-throughs so far (``conduit_cache_flush_errors_total``)."""
        return self.exporter.flush_errors if self.exporter is not None else 0

    # -- the cluster --------------------------------------------------------------------

    @property
    def aggregator(self) -> Aggregator | None:
        """The cluster reader (None without Redis)."""
        if self._aggregator is None and self.exporter is not None:
            self._aggregator = Aggregator(self.exporter.store, self.settings)
        return self._aggregator

    def cluster_view(self) -> ClusterView:
        """The whole cluster view (cached for ``aggregation_cache_ttl``)."""
        aggregator = self.aggregator
        if aggregator is None:
            local = self.snapshot()
            return ClusterView(
                regions=local,
                drift=dict.fromkeys(local, 0.0),
                instance_hit_rates={
                    r: {self.settings.instance_id: s.hit_rate} for r, s in local.items()
                },
                active_count=1,
                redis_up=False,
                redis_error="no redis_url configured",
            )
        return aggregator.view()

    def cluster_statistics(self, region: str) -> Statistics:
        """Cluster statistics of ``region`` as the aggregation strategy combines them; by
        default counters over every instance that reported, gauges and ``instance_count``
        over live instances."""
        return self.strategy.aggregate(region, self)

    def cluster_totals(self, region: str) -> Statistics:
        """The totals kept in Redis for ``region`` (what :class:`SumStrategy` returns)."""
        return self.cluster_view().regions.get(region, Statistics())

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of ``region`` for every registered instance
        (read now: one pipelined read per instance)."""
        aggregator = self.aggregator
        if aggregator is None:
            local = self.snapshot()
            return {self.settings.instance_id: local[region]} if region in local else {}
        return aggregator.per_instance(region)

    def health(self) -> Health:
        """The health rules applied to the cluster view."""
        return evaluate(self.cluster_view(), self.settings)

    # -- lifecycle ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Final flush, then deregister from the heartbeat set. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
        _open_handles.discard(self)
        self._stop_beats.set()
        for provider in self._owned:  # the write-through reader is always on an owned one
            provider.shutdown()


class DisabledStatistics(CacheStatistics):
    """What ``setup(enabled=False)`` returns: every ``record_*`` is a no-op, reads are
    empty, and there is no ``MeterProvider``, no exporter and no Redis connection."""

    def __init__(self, settings: Settings, **_ignored: object) -> None:
        # deliberately no super().__init__(): nothing is allocated, registered or connected
        self.settings = settings
        self.exporter = None
        self._aggregator = None
        self._reader = None
        self._closed = True
        self.invalid_events = self.overflow_events = self.rejected_values = 0

    def record_hit(self, region: str | None, response_time: float | None = None) -> None:
        pass

    def record_miss(self, region: str | None, response_time: float | None = None) -> None:
        pass

    def record_set(self, region: str | None) -> None:
        pass

    def record_eviction(self, region: str | None) -> None:
        pass

    def set_size_bytes(self, region: str | None, size_bytes: int) -> None:
        pass

    def snapshot(self) -> dict[str, Statistics]:
        """Always empty."""
        return {}

    def local_statistics(self, region: str | None) -> Statistics:
        """Always zeros."""
        return Statistics()

    def flush(self) -> bool:
        """Nothing to write: always False."""
        return False

    @property
    def flush_errors(self) -> int:
        """Always 0."""
        return 0

    @property
    def aggregator(self) -> Aggregator | None:
        """Always None."""
        return None

    def cluster_view(self) -> ClusterView:
        """An empty view."""
        return ClusterView(redis_error="statistics disabled (enabled=false)")

    def cluster_statistics(self, region: str) -> Statistics:
        """Always zeros."""
        return Statistics()

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """Always empty."""
        return {}

    def shutdown(self) -> None:
        """Nothing to release."""

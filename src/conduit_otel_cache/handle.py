"""The handle ``setup()`` returns: a recorder (the hot path), a pipeline (the OTel
provider and the write-through) and a reader of the cluster; with ``enabled=false`` a null
recorder and a null pipeline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from opentelemetry.metrics import MeterProvider as APIMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader

from .aggregate import Aggregator, ClusterView
from .cluster import ClusterReader, LocalReader
from .config import Settings
from .health import Health
from .instruments import views as instrument_views
from .integrations.lookup import TimedLookup
from .model import Statistics
from .pipeline import NullPipeline, Pipeline
from .recorder import NullRecorder, Recorder, RecordTimed
from .spool import Spool
from .strategies import AggregationStrategy, strategy_named
from .writethrough import RedisMetricExporter

if TYPE_CHECKING:
    from .api import ASGIApp, WSGIApp


def views() -> list[object]:
    """Views to pass to your own ``MeterProvider`` so it can report the response-time
    histogram (``MeterProvider(views=conduit_otel_cache.views(), ...)``); they also spare
    conduit's instruments the SDK's exemplar reservoirs, which keep nothing for them."""
    return list(instrument_views())


class RecordEvent(Protocol):
    def __call__(self, region: str | None) -> None: ...


class RecordSize(Protocol):
    def __call__(self, region: str | None, size_bytes: int) -> None: ...


class CacheStatistics:
    """Cache statistics of this instance, written through to Redis every ``flush_interval``.

    ``record_hit``, ``record_miss``, ``record_set``, ``record_eviction`` and
    ``set_size_bytes`` are the recorder's own methods (no indirection on the hot path).
    """

    record_hit: RecordTimed
    record_miss: RecordTimed
    record_set: RecordEvent
    record_eviction: RecordEvent
    set_size_bytes: RecordSize

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
        keep = settings.enable_response_time_tracking and settings.writes_through
        self.settings = settings
        self.strategy: AggregationStrategy = aggregation_strategy or strategy_named(
            settings.aggregation_strategy, settings.aggregation_cache_ttl
        )
        self.recorder: Recorder | NullRecorder
        self.pipeline: Pipeline | NullPipeline
        if settings.enabled:
            self.recorder = Recorder(
                settings.response_time_buckets,
                settings.max_regions,
                settings.default_region,
                max_samples=settings.max_response_time_samples if keep else 0,
            )
            self.pipeline = Pipeline(
                settings.pipeline,
                self.recorder,
                meter_provider=meter_provider,
                metric_readers=metric_readers,
                flushed=self._flushed,
                forked=self._forked,
            )
        else:  # a null handle: no MeterProvider, no thread, no Redis
            self.recorder, self.pipeline = NullRecorder(), NullPipeline()
        recorder = self.recorder
        self.record_hit = recorder.record_hit
        self.record_miss = recorder.record_miss
        self.record_set = recorder.record_set
        self.record_eviction = recorder.record_eviction
        self.set_size_bytes = recorder.set_size_bytes
        exporter = self.pipeline.exporter
        self.reader: ClusterReader | LocalReader = (
            ClusterReader(
                exporter.store,
                settings.aggregation,
                settings.health,
                flushes=exporter,
                recoveries=self.pipeline.recoverer,
            )
            if exporter is not None
            else LocalReader(
                recorder.snapshot,
                settings.instance_id,
                settings.health,
                mode=settings.mode,
                enabled=settings.enabled,
            )
        )

    def _flushed(self) -> None:
        self.reader.invalidate()

    def _forked(self, instance_id: str) -> None:
        # with or without a spool now (its own, or none if it could not be made)
        self.record_hit = self.recorder.record_hit
        self.record_miss = self.recorder.record_miss
        self.reader.after_fork()
        self.settings = dataclasses.replace(self.settings, instance_id=instance_id)

    @property
    def meter_provider(self) -> APIMeterProvider:
        """The provider the cache instruments are on (yours when you passed one)."""
        return self.pipeline.meter_provider

    @property
    def exporter(self) -> RedisMetricExporter | None:
        """The write-through (None when nothing is written to Redis)."""
        return self.pipeline.exporter

    @property
    def spool(self) -> Spool | None:
        """This incarnation's spool (with ``spool_dir``)."""
        return self.pipeline.spool

    # -- this instance ------------------------------------------------------------------

    @property
    def invalid_events(self) -> int:
        """Events counted under ``_invalid`` (an invalid region name)."""
        return self.recorder.invalid_events

    @property
    def overflow_events(self) -> int:
        """Events counted under ``_overflow`` (more than ``max_regions`` regions)."""
        return self.recorder.overflow_events

    @property
    def rejected_values(self) -> int:
        """Invalid response times and sizes dropped."""
        return self.recorder.rejected_values

    def snapshot(self) -> dict[str, Statistics]:
        """This instance's cumulative statistics of every region seen so far."""
        return self.recorder.snapshot()

    def local_statistics(self, region: str) -> Statistics:
        """This instance's statistics of ``region`` (zeros for an unknown region)."""
        return self.snapshot().get(region, Statistics(instance_count=1))

    def wsgi_app(self) -> WSGIApp:
        """A WSGI app serving ``GET /api/cache/stats/local`` (this instance) and
        ``/api/cache/stats/distributed`` (the cluster view) as JSON per region."""
        from .api import make_stats_app

        return make_stats_app(local=self.snapshot, cluster=self.reader.regions)

    def asgi_app(self) -> ASGIApp:
        """The same API as :meth:`wsgi_app` as an ASGI app (Starlette, FastAPI, uvicorn)."""
        from .api import make_stats_asgi_app

        return make_stats_asgi_app(local=self.snapshot, cluster=self.reader.regions)

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
        return self.pipeline.flush()

    @property
    def flush_errors(self) -> int:
        """Failed write-throughs so far (``conduit_cache_flush_errors_total``)."""
        return self.pipeline.flush_errors

    # -- the cluster --------------------------------------------------------------------

    @property
    def aggregator(self) -> Aggregator | None:
        """The cluster reader's aggregator (None without Redis)."""
        return self.reader.aggregator

    def cluster_view(self) -> ClusterView:
        """The whole cluster view (cached for ``aggregation_cache_ttl``)."""
        return self.reader.view()

    def cluster_statistics(self, region: str) -> Statistics:
        """Cluster statistics of ``region`` as the aggregation strategy combines them; by
        default counters over every instance that reported, gauges and ``instance_count``
        over live instances."""
        return self.strategy.aggregate(region, self.reader)

    def cluster_totals(self, region: str) -> Statistics:
        """The totals kept in Redis for ``region`` (what :class:`SumStrategy` returns)."""
        return self.reader.cluster_totals(region)

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of ``region`` for every registered instance
        (read now: one pipelined read per instance)."""
        return self.reader.per_instance_statistics(region)

    def health(self) -> Health:
        """The health rules applied to the cluster view and this instance's flushes."""
        return self.reader.health()

    # -- lifecycle ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Final flush, then deregister from the heartbeat set; the whole of it bounded by
        ``shutdown_timeout``. Safe to call twice, and from a signal handler that
        interrupted a flush (it then returns at once and the flush finishes when the
        interrupted code goes on: at ``sys.exit``, for example)."""
        self.pipeline.shutdown()

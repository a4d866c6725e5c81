"""The cluster view published for Prometheus: the series of each view
(:mod:`.series`), rendered off the request path (:mod:`.rendering`) and served at
``/metrics`` (:mod:`.scrape`), followed by this process's own series (prometheus_client's
process, platform and GC collectors, the build info and the render failures)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric

from .. import __version__
from ..aggregate import ClusterView
from ..config import ServeSettings
from .rendering import KEEP_WARM, Encoder, Renderings, Variant
from .scrape import MetricsRoute
from .series import Series, families, series, stale

#: ``(view, aggregation errors so far, Unix time of collection, own series, {variant:
#: encoder}) -> {variant: bytes}``: the series of ``view`` and ``own`` rendered elsewhere
#: (:meth:`~conduit_otel_cache.serve.render_process.RenderProcess.render`)
RenderElsewhere = Callable[
    [ClusterView, int, float, list[Metric], dict[Variant, Encoder]], dict[Variant, bytes] | None
]


class ViewSource(Protocol):
    """What the exposition reads: the :class:`~conduit_otel_cache.aggregate.Aggregator`."""

    errors_total: int

    def view(self, max_age: float | None = None) -> ClusterView: ...


class Exposition:
    """Publishes cluster totals, hit ratios, drift and health for Prometheus to scrape."""

    def __init__(
        self,
        aggregator: ViewSource,
        settings: ServeSettings,
        *,
        prerender: bool = True,
        keep_warm: float = KEEP_WARM,
    ) -> None:
        self.aggregator = aggregator
        self.settings = settings
        ttl = settings.cache_ttl
        self.renderings = Renderings(
            lambda max_age: aggregator.view(max_age=max_age),
            self.collect,
            ttl=ttl,
            prerender=prerender,
            keep_warm=keep_warm,
            stale=lambda view: stale(view, settings, time.time()),
        )
        self.route = MetricsRoute(self.renderings)
        # this process's own series, after the cluster's
        self._own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._own)
        PlatformCollector(registry=self._own)
        GCCollector(registry=self._own)
        Info("conduit_cache_exporter_build", "The exporter's version", registry=self._own).info(
            {"version": __version__}
        )
        self._own.register(self.renderings.render_failures)
        #: every series /metrics serves, of the aggregator's current view
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Current(self))
        self.registry.register(self._own)

    def series(self, view: ClusterView | None = None) -> list[Series]:
        """The cluster series of ``view`` (of the aggregator's current one when None)."""
        return series(
            self.aggregator.view() if view is None else view,
            settings=self.settings,
            errors_total=self.aggregator.errors_total,
            now=time.time(),
        )

    def cluster_families(self, view: ClusterView) -> list[Metric]:
        """The cluster's families of ``view``."""
        return families(
            view,
            settings=self.settings,
            errors_total=self.aggregator.errors_total,
            now=time.time(),
        )

    def collect(self, view: ClusterView) -> list[Metric]:
        """Every family /metrics serves, the cluster's from ``view``."""
        return self.cluster_families(view) + self.own_series()

    def own_series(self) -> list[Metric]:
        """This process's own series: process, platform, GC, build info, render failures."""
        return list(self._own.collect())

    def register_own(self, collector: Any) -> None:
        """Publish ``collector``'s series (prometheus_client) among this process's own."""
        self._own.register(collector)

    def render_elsewhere(self, render: RenderElsewhere) -> None:
        """Have ``render`` (``serve``'s render process) render the background refreshes."""
        aggregator = self.aggregator

        def renderer(
            view: ClusterView, variants: dict[Variant, Encoder]
        ) -> dict[Variant, bytes] | None:
            return render(view, aggregator.errors_total, time.time(), self.own_series(), variants)

        self.renderings.renderer = renderer

    def shutdown(self) -> None:
        """Stop the background rendering."""
        self.renderings.shutdown()


class _Current:
    """The collector of the cluster's families of the aggregator's current view."""

    def __init__(self, exposition: Exposition) -> None:
        self._exposition = exposition

    def collect(self) -> Iterable[Metric]:
        return self._exposition.cluster_families(self._exposition.aggregator.view())

"""The cluster as a handle reads it: the view, the totals and per-instance statistics that
an aggregation strategy combines, and health. :class:`ClusterReader` reads Redis; a process that
writes nothing there reads itself alone (:class:`LocalReader`)."""

from __future__ import annotations

from collections.abc import Callable

from .aggregate import Aggregator, ClusterView
from .config import AggregationSettings, HealthSettings
from .health import Flushes, Health, Recoveries, evaluate
from .model import Statistics
from .shards import Shards
from .store import Store


class ClusterReader:
    """Reads the cluster from Redis, through an :class:`Aggregator` built at the first
    read (and again in a forked child)."""

    def __init__(
        self,
        store: Store | Shards,
        settings: AggregationSettings,
        health: HealthSettings,
        *,
        flushes: Flushes | None = None,
        recoveries: Recoveries | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.health_settings = health
        self.flushes = flushes
        self.recoveries = recoveries
        self._aggregator: Aggregator | None = None

    @property
    def aggregator(self) -> Aggregator:
        """The aggregator that reads and caches the view."""
        if self._aggregator is None:
            self._aggregator = Aggregator(self.store, self.settings)
        return self._aggregator

    def after_fork(self) -> None:
        """In a forked child: nothing of the parent's reads (its locks may be held)."""
        self._aggregator = None

    def invalidate(self) -> None:
        """The next read reads Redis again (after a flush of this process)."""
        if self._aggregator is not None:
            self._aggregator.invalidate()

    def view(self) -> ClusterView:
        """The whole cluster view (cached for ``aggregation_cache_ttl``)."""
        return self.aggregator.view()

    def regions(self) -> dict[str, Statistics]:
        """The cluster view's regions (for the stats API)."""
        return self.view().regions

    def cluster_totals(self, region: str) -> Statistics:
        """The totals kept in Redis for ``region``."""
        return self.view().regions.get(region, Statistics())

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of ``region`` for every registered instance."""
        return self.aggregator.per_instance(region)

    def health(self) -> Health:
        """The health rules applied to the view and this process's flushes and recovery."""
        return evaluate(self.view(), self.health_settings, self.flushes, self.recoveries)


class LocalReader:
    """The cluster of a process that writes nothing to Redis: itself alone (mode
    ``local``), or nothing at all (``enabled=False``: ``why`` says so)."""

    aggregator = None

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Statistics]],
        instance_id: str,
        health: HealthSettings,
        *,
        mode: str,
        enabled: bool = True,
    ) -> None:
        self.snapshot = snapshot
        self.instance_id = instance_id
        self.health_settings = health
        self.mode = mode
        self.enabled = enabled

    def after_fork(self) -> None:
        """Nothing read, nothing to forget."""

    def invalidate(self) -> None:
        """Nothing cached."""

    def view(self) -> ClusterView:
        """This process's statistics as the view of a cluster of one."""
        if not self.enabled:
            return ClusterView(redis_error="statistics disabled (enabled=false)")
        local = self.snapshot()
        return ClusterView(
            regions=local,
            drift=dict.fromkeys(local, 0.0),
            instance_hit_ratios={r: {self.instance_id: s.hit_ratio} for r, s in local.items()},
            active_count=1,
            redis_up=False,
            redis_error="no redis_url configured",
        )

    def regions(self) -> dict[str, Statistics]:
        """None: the stats API says so (503) rather than answer this process's numbers."""
        raise LookupError(
            f"mode {self.mode}: no cluster view here (mode hybrid or "
            "distributed writes through to Redis and reads the cluster)"
        )

    def cluster_totals(self, region: str) -> Statistics:
        """This process's statistics of ``region``."""
        return self.view().regions.get(region, Statistics())

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of this process alone."""
        local = self.snapshot()
        return {self.instance_id: local[region]} if region in local else {}

    def health(self) -> Health:
        """The health rules applied to the view of a cluster of one."""
        return evaluate(self.view(), self.health_settings)

"""Aggregation strategies: how ``cluster_statistics()`` combines the instances of a region.

* :class:`SumStrategy` (default, ``aggregation_strategy="sum"``): the totals every flush
  keeps in Redis, i.e. the sum over every instance that reported (departed ones included
  for counters, live ones for gauges).
* :class:`WeightedStrategy`: each instance's counters and size multiplied by a weight that
  a user callable computes from the per-instance statistics; response times are merged
  unweighted.
* :class:`LazyStrategy` (``aggregation_strategy="lazy"``): answers at once with the last
  known good result and refreshes it in the background when it is older than ``max_age``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .model import ResponseTimes, Statistics


class ClusterSource(Protocol):
    """Where a strategy reads from (a :class:`~conduit_otel_cache.CacheStatistics`)."""

    def cluster_totals(self, region: str) -> Statistics:
        """The totals kept in Redis for ``region``."""
        ...

    def per_instance_statistics(self, region: str) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of ``region``."""
        ...


class AggregationStrategy(Protocol):
    """Combines the instances of a region into one :class:`Statistics`."""

    def aggregate(self, region: str, source: ClusterSource) -> Statistics:
        """The cluster statistics of ``region``."""
        ...


class SumStrategy:
    """The totals kept at flush time: every instance counts once."""

    def aggregate(self, region: str, source: ClusterSource) -> Statistics:
        """Sum over instances (read from the aggregated hash)."""
        return source.cluster_totals(region)


Weights = Callable[[Mapping[str, Statistics]], Mapping[str, float]]


class WeightedStrategy:
    """Counters and size of each instance multiplied by ``weights(per_instance)[id]``
    (missing ids weigh 1.0); counts are rounded to whole numbers."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights

    def aggregate(self, region: str, source: ClusterSource) -> Statistics:
        """Weighted sum over the registered instances of ``region``."""
        instances = source.per_instance_statistics(region)
        weights = self.weights(instances)
        totals = dict.fromkeys(("hit_count", "miss_count", "set_count", "eviction_count"), 0.0)
        size = 0.0
        times = ResponseTimes()
        for instance_id, stats in instances.items():
            w = float(weights.get(instance_id, 1.0))
            for name in totals:
                totals[name] += w * getattr(stats, name)
            if stats.live:
                size += w * stats.size_bytes
            times = times.merge(stats.response_times)
        return Statistics(
            hit_count=round(totals["hit_count"]),
            miss_count=round(totals["miss_count"]),
            set_count=round(totals["set_count"]),
            eviction_count=round(totals["eviction_count"]),
            size_bytes=round(size),
            response_times=times,
            instance_count=sum(1 for s in instances.values() if s.live),
        )


class LazyStrategy:
    """Returns the last known good result at once and refreshes it in the background
    when it is older than ``max_age`` seconds; the first call of a region waits."""

    def __init__(self, inner: AggregationStrategy | None = None, max_age: float = 5.0) -> None:
        self.inner: AggregationStrategy = inner or SumStrategy()
        self.max_age = max_age
        self._known: dict[str, tuple[float, Statistics]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def aggregate(self, region: str, source: ClusterSource) -> Statistics:
        """The last known good statistics of ``region`` (refreshed in the background)."""
        with self._lock:
            known = self._known.get(region)
            stale = known is None or time.monotonic() - known[0] >= self.max_age
            start = stale and known is not None and region not in self._refreshing
            if start:
                self._refreshing.add(region)
        if known is None:
            return self._refresh(region, source)
        if start:
            threading.Thread(
                target=self._refresh, args=(region, source), daemon=True, name="conduit-lazy"
            ).start()
        return known[1]

    def _refresh(self, region: str, source: ClusterSource) -> Statistics:
        try:
            result = self.inner.aggregate(region, source)
            with self._lock:
                self._known[region] = (time.monotonic(), result)
            return result
        finally:
            with self._lock:
                self._refreshing.discard(region)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no background refresh runs (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._refreshing:
                    return True
            time.sleep(0.005)
        return False


def strategy_named(name: str, max_age: float) -> AggregationStrategy:
    """The strategy of the ``aggregation_strategy`` option: ``sum`` or ``lazy``."""
    return LazyStrategy(max_age=max_age) if name == "lazy" else SumStrategy()

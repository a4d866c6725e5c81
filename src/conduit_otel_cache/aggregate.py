"""The cluster view: totals, per-instance statistics, drift, liveness; cached briefly.

Cluster counters come from the aggregated hashes that every flush keeps up to date
(so they include departed instances and never go back); gauges count live instances.
Drift of a region is the largest distance, in percentage points, between a live
instance's hit rate and the hit rate of all live instances together, over live
instances that served at least one request in the region.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping

from .config import Settings
from .model import Statistics
from .store import ClusterData, Store
from .writethrough import RateLimitedLog

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """One aggregation of the cluster, as read from Redis."""

    regions: dict[str, Statistics] = dataclasses.field(default_factory=dict)
    per_instance: dict[str, dict[str, Statistics]] = dataclasses.field(default_factory=dict)
    drift: dict[str, float] = dataclasses.field(default_factory=dict)
    heartbeats: dict[str, float] = dataclasses.field(default_factory=dict)
    active_instances: tuple[str, ...] = ()
    missing_instances: tuple[str, ...] = ()
    server_time: float = 0.0
    redis_up: bool = False
    redis_error: str | None = None
    aggregation_latency: float = 0.0
    redis_memory_bytes: int = 0
    last_successful_aggregation: float | None = None
    data_errors: tuple[str, ...] = ()

    def missing_for(self, instance_id: str, instance_timeout: float) -> float:
        """Seconds an instance has been missing (since its heartbeat expired)."""
        return max(0.0, self.server_time - self.heartbeats[instance_id] - instance_timeout)


def drift_percent(instances: Mapping[str, Statistics]) -> float:
    """Largest distance in percentage points between a live instance's hit rate and
    the hit rate of all live instances together (0 with fewer than two)."""
    serving = [s for s in instances.values() if s.live and s.total_requests]
    if len(serving) < 2:
        return 0.0
    hits = sum(s.hit_count for s in serving)
    total = sum(s.total_requests for s in serving)
    cluster = 100.0 * hits / total
    return max(abs(s.hit_rate - cluster) for s in serving)


class Aggregator:
    """Reads the cluster view from Redis; a burst of readers within
    ``aggregation_cache_ttl`` shares one aggregation."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.errors_total = 0
        self._lock = threading.Lock()
        self._view: ClusterView | None = None
        self._read_at = -float("inf")
        self._last_good: ClusterView = ClusterView()
        self._errors = RateLimitedLog(log)

    def view(self) -> ClusterView:
        """The cached view, refreshed when older than ``aggregation_cache_ttl``."""
        with self._lock:
            fresh = time.monotonic() - self._read_at < self.settings.aggregation_cache_ttl
            if self._view is None or not fresh:
                self._view = self._aggregate()
                self._read_at = time.monotonic()
            return self._view

    def invalidate(self) -> None:
        """Make the next :meth:`view` read Redis again."""
        with self._lock:
            self._read_at = -float("inf")

    def _aggregate(self) -> ClusterView:
        start = time.perf_counter()
        try:
            self.store.reap(self.settings.instance_timeout)
            data = self.store.read_cluster()
            memory = self.store.used_memory()
            view = self._build(data, memory, start)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._errors.error(
                "conduit-otel-cache: aggregation from %s failed: %s",
                self.settings.safe_redis_url, error,
            )  # fmt: skip
            return dataclasses.replace(self._last_good, redis_up=False, redis_error=error)
        self._last_good = view
        return view

    def _build(self, data: ClusterData, memory: int, start: float) -> ClusterView:
        timeout = self.settings.instance_timeout
        cutoff = data.server_time - timeout
        active = tuple(sorted(i for i, beat in data.heartbeats.items() if beat >= cutoff))
        missing = tuple(sorted(i for i, beat in data.heartbeats.items() if beat < cutoff))
        errors: list[str] = []
        bounds = self.settings.response_time_buckets
        regions: dict[str, Statistics] = {}
        for region, fields in data.aggregates.items():
            try:
                regions[region] = Statistics.from_fields(
                    fields,
                    bounds,
                    instance_count=max(0, int(fields.get("instance_count", "0"))),
                    last_updated=float(fields.get("last_aggregated", "0")) or None,
                )
            except ValueError as exc:
                errors.append(f"aggregate of region {region!r}: {exc}")
        per_instance: dict[str, dict[str, Statistics]] = {r: {} for r in regions}
        raw = self.store.read_instances(sorted(data.heartbeats), sorted(regions))
        for (instance_id, region), entry in raw.items():
            if isinstance(entry, Exception):
                errors.append(f"instance {instance_id!r} region {region!r}: {entry}")
                continue
            if not entry:
                continue
            fields = entry
            try:
                per_instance[region][instance_id] = Statistics.from_fields(
                    fields,
                    bounds,
                    instance_count=1,
                    last_updated=float(fields.get("last_updated", "0")) or None,
                    live=instance_id in active and fields.get("live") == "1",
                )
            except ValueError as exc:
                errors.append(f"instance {instance_id!r} region {region!r}: {exc}")
        self.errors_total += len(errors)
        for error in errors[:1]:
            self._errors.error("conduit-otel-cache: skipped malformed data: %s", error)
        now = time.time()
        return ClusterView(
            regions=regions,
            per_instance=per_instance,
            drift={r: drift_percent(stats) for r, stats in per_instance.items()},
            heartbeats=dict(data.heartbeats),
            active_instances=active,
            missing_instances=missing,
            server_time=data.server_time,
            redis_up=True,
            aggregation_latency=time.perf_counter() - start,
            redis_memory_bytes=memory,
            last_successful_aggregation=now,
            data_errors=tuple(errors),
        )

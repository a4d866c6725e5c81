"""Health rules: a cluster view becomes Healthy, Degraded or Unhealthy, with the figures
behind it (the shape of an ASP.NET-style health report, which dashboards already read)."""

from __future__ import annotations

import dataclasses
import enum
import time
from datetime import datetime, timezone
from typing import Any, Protocol

from .aggregate import ClusterView
from .config import HealthSettings


class Status(enum.IntEnum):
    """Health status; a larger value is worse. The CLI exits with the value."""

    HEALTHY = 0
    DEGRADED = 1
    UNHEALTHY = 2

    @property
    def label(self) -> str:
        """Healthy, Degraded or Unhealthy."""
        return self.name.capitalize()


@dataclasses.dataclass(frozen=True)
class Health:
    """The result of the health rules."""

    status: Status
    reasons: tuple[str, ...]
    data: dict[str, Any]

    @property
    def http_status(self) -> int:
        """200 when Healthy or Degraded, 503 when Unhealthy."""
        return 503 if self.status is Status.UNHEALTHY else 200

    def check_json(self) -> dict[str, Any]:
        """The ``cache_statistics`` check: status, description, data."""
        return {
            "status": self.status.label,
            "description": "; ".join(self.reasons) or "all rules pass",
            "data": self.data,
        }

    def report_json(self) -> dict[str, Any]:
        """The whole ``/health`` report: the status and the ``cache_statistics`` check."""
        return {"status": self.status.label, "results": {"cache_statistics": self.check_json()}}


class Flushes(Protocol):
    """This instance's write-through, as the health rules see it."""

    last_ok: bool
    last_error: str | None
    flush_count: int
    flush_errors: int


class Recoveries(Protocol):
    """This process's recovery of dead incarnations' spools (:mod:`.recovery`)."""

    last_error: str | None
    dropped_at: float

    @property
    def last(self) -> Any: ...

    @property
    def total(self) -> Any: ...


def evaluate(
    view: ClusterView,
    settings: HealthSettings,
    flushes: Flushes | None = None,
    recoveries: Recoveries | None = None,
) -> Health:
    """Apply every rule (with ``flushes``, also to this instance's last write-through, and
    with ``recoveries`` to its recovery of dead spools); the status is the worst any rule
    gives."""
    status = Status.HEALTHY
    reasons: list[str] = []

    def fail(level: Status, reason: str) -> None:
        nonlocal status
        status = max(status, level)
        reasons.append(reason)

    if not view.redis_up:
        fail(Status.UNHEALTHY, f"Redis unreachable ({view.redis_error or 'no answer'})")
    active = view.active_count
    if active < settings.min_active_instances:
        fail(
            Status.UNHEALTHY,
            f"{active} live instances, fewer than "
            f"min_active_instances={settings.min_active_instances}",
        )
    long_missing = [
        i
        for i in view.missing_instances
        if view.missing_for(i, settings.instance_timeout) > settings.missing_instance_grace
    ]
    if long_missing:
        fail(
            Status.DEGRADED,
            f"{len(long_missing)} instance(s) missing for more than "
            f"{settings.missing_instance_grace:g}s: {', '.join(long_missing[:5])}",
        )
    if view.aggregation_latency > settings.max_aggregation_latency:
        fail(Status.DEGRADED, f"aggregation took {view.aggregation_latency * 1000:.0f} ms")
    for region, drift in sorted(view.drift.items()):
        stats = view.regions.get(region)
        busy = stats is not None and stats.total_requests >= settings.drift_min_requests
        if busy and drift > settings.max_drift_percent:
            fail(Status.DEGRADED, f"drift {drift:.1f} points in region {region}")
    if view.redis_memory_bytes > settings.max_memory_bytes:
        fail(Status.DEGRADED, f"Redis memory {view.redis_memory_bytes / 2**20:.0f} MB")
    recent = [
        (r, n, since)
        for r, (n, since, at) in sorted(view.data_losses.items())
        if n > view.losses_acknowledged.get(r, 0)
        and view.server_time - at < settings.data_loss_period
    ]
    if recent:
        named = ", ".join(
            f"region {r} since {datetime.fromtimestamp(since, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
            f" ({n} time{'s' if n != 1 else ''})"
            for r, n, since in recent[:5]
        )
        fail(
            Status.DEGRADED,
            f"Redis lost statistics that could not be rebuilt: {named}; "
            "their totals may lack what ended instances had added",
        )
    if view.data_errors:
        fail(
            Status.DEGRADED,
            f"{len(view.data_errors)} malformed entries skipped: {view.data_errors[0]}",
        )

    if flushes is not None and flushes.flush_errors and not flushes.last_ok:
        fail(
            Status.DEGRADED,
            f"the last flush failed ({flushes.last_error}); {flushes.flush_errors} failed so far",
        )
    if recoveries is not None and recoveries.last.failed:
        fail(
            Status.DEGRADED,
            f"{recoveries.last.failed} dead incarnation(s) in spool_dir "
            f"not written yet ({recoveries.last_error}); tried again later",
        )
    if recoveries is not None and time.time() - recoveries.dropped_at < settings.data_loss_period:
        fail(
            Status.DEGRADED,
            f"{recoveries.total.dropped} dead incarnation(s) in spool_dir "
            "could not be written exactly and were dropped (the log names them)",
        )
    if view.reap_error:
        fail(
            Status.DEGRADED, f"expired instances could not leave the live gauges: {view.reap_error}"
        )
    if view.redis_memory_error:
        fail(Status.DEGRADED, f"Redis memory not read: {view.redis_memory_error}")

    last = view.last_successful_aggregation
    data = {
        "ActiveInstances": active,
        "MissingInstances": len(view.missing_instances),
        "RedisConnected": view.redis_up,
        "AggregationLatencyMs": round(view.aggregation_latency * 1000, 3),
        "RedisMemoryUsageMB": round(view.redis_memory_bytes / 2**20, 3),
        "LastSuccessfulAggregation": (
            datetime.fromtimestamp(last, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            if last
            else None
        ),
        "MaxDriftPercent": round(max(view.drift.values(), default=0.0), 3),
    }
    if recoveries is not None:
        data["SpoolsRecovered"] = recoveries.total.written
    return Health(status, tuple(reasons), data)

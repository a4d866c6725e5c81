"""The cluster view as text tables and JSON: what ``stats`` and the demo print."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .aggregate import Aggregator, ClusterView
from .model import Statistics

#: ``{region: {instance_id: statistics}}``
PerInstance = dict[str, dict[str, Statistics]]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_table(view: ClusterView, instances: PerInstance) -> str:
    """The cluster and per-instance statistics as aligned text columns."""
    head = (
        "region",
        "instance",
        "hits",
        "misses",
        "hit ratio",
        "sets",
        "evictions",
        "size",
        "p95 ms",
        "drift",
    )
    rows: list[tuple[str, ...]] = [head]
    for region, total in sorted(view.regions.items()):
        p95 = total.response_times.quantile(0.95)
        rows.append(
            (
                region,
                f"cluster ({total.instance_count} live)",
                str(total.hit_count),
                str(total.miss_count),
                f"{total.hit_ratio:.1%}",
                str(total.set_count),
                str(total.eviction_count),
                _human_bytes(total.size_bytes),
                "-" if p95 is None else f"{p95 * 1000:.2f}",
                f"{view.drift[region]:.1f}" if region in view.drift else "-",
            )
        )
        for instance_id, s in sorted(instances.get(region, {}).items()):
            p95 = s.response_times.quantile(0.95)
            rows.append(
                (
                    "",
                    instance_id + ("" if s.live else " (gone)"),
                    str(s.hit_count),
                    str(s.miss_count),
                    f"{s.hit_ratio:.1%}",
                    str(s.set_count),
                    str(s.eviction_count),
                    _human_bytes(s.size_bytes),
                    "-" if p95 is None else f"{p95 * 1000:.2f}",
                    "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.append(f"live instances: {view.active_count}, missing: {len(view.missing_instances)}")
    return "\n".join(lines)


def view_json(
    view: ClusterView, instances: PerInstance, region: str | None = None
) -> dict[str, Any]:
    """The cluster view as JSON (optionally one region)."""
    regions = {r: s for r, s in view.regions.items() if region in (None, r)}
    return {
        "regions": {
            r: {
                "cluster": s.to_dict(),
                "drift_percent": view.drift.get(r),  # None before the first pass
                "instances": {i: st.to_dict() for i, st in instances.get(r, {}).items()},
            }
            for r, s in sorted(regions.items())
        },
        "active_instances": view.active_count,
        "missing_instances": list(view.missing_instances),
    }


def read_per_instance(aggregator: Aggregator, regions: Iterable[str]) -> PerInstance:
    """Every instance's statistics of every region in ``regions`` (heartbeats read once)."""
    beats = aggregator.store.heartbeats()
    return {region: aggregator.per_instance(region, beats) for region in regions}

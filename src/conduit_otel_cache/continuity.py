"""Cluster counters that never go backwards while a reader runs, across a Redis data loss.

Redis's totals of a region are the departed instances' counts plus the live instances'
(``live_hit_count`` / ``live_miss_count`` in the aggregated hash are the live part of hits
and misses). When Redis loses its data (an empty restart, a failover that lost writes), the
live instances write their lifetime counts again (the write protocol's healing) but the
departed instances' counts are gone, so the totals drop, and a reader that published them as
they are would make Prometheus see a counter reset and count the rebuilt totals as new
events (``rate()`` many times too high for a whole window).

:class:`Continuity` sees the loss (a counter of the region went down) and carries the
departed instances' part over: from then on it publishes Redis's totals plus that part, and
never less than it published before. While the live instances rebuild (until each has
written again, one ``flush_interval``) the counters hold still; once they have, they
continue exactly where they would have been. Hits and misses are exact (their departed part
is known); the departed part of sets, evictions and the response-time histogram is taken in
the proportion of hits and misses it had. A loss that the live instances have rebuilt past
the last published totals before the next read goes unseen: the counters stay monotonic but
lack the departed part from then on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from .model import ResponseTimes, Statistics

_COUNTS = ("hit_count", "miss_count", "set_count", "eviction_count")


@dataclasses.dataclass
class _Region:
    raw: Statistics  # Redis's totals at the last read
    departed: tuple[int, int]  # hits, misses of departed instances at the last read
    carried: Statistics  # what losses took, carried over (counters only)
    published: Statistics


class Continuity:
    """Keeps every region's counters monotonic across Redis data losses (per reader)."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        #: Redis data losses seen (one per region that lost counts)
        self.losses = 0

    def apply(
        self, regions: dict[str, Statistics], aggregates: dict[str, dict[str, str]]
    ) -> dict[str, Statistics]:
        """The statistics to publish for Redis's ``regions`` (parsed from ``aggregates``,
        the aggregated hashes they were read from)."""
        result = {}
        for name, raw in regions.items():
            departed = _departed(raw, aggregates.get(name, {}))
            state = self._regions.get(name)
            if state is None:
                state = _Region(raw, departed, Statistics(), raw)
            elif _lost(state, raw):
                self.losses += 1
                state.carried = _add(state.carried, _departed_part(state))
            published = _max(state.published, _add(raw, state.carried))
            state.raw, state.departed, state.published = raw, departed, published
            self._regions[name] = state
            result[name] = published
        return result


def _departed(raw: Statistics, fields: dict[str, str]) -> tuple[int, int]:
    """Hits and misses of departed instances: the totals less the live sums."""
    try:
        live_hits = int(fields.get("live_hit_count", "0"))
        live_misses = int(fields.get("live_miss_count", "0"))
    except ValueError:
        live_hits, live_misses = raw.hit_count, raw.miss_count
    return max(0, raw.hit_count - live_hits), max(0, raw.miss_count - live_misses)


def _lost(state: _Region, raw: Statistics) -> bool:
    """Redis lost counts of this region since the last read: a counter went down (the
    departed part alone may: an expired instance that writes again is live again)."""
    before = state.raw
    return (
        any(getattr(raw, f) < getattr(before, f) for f in _COUNTS)
        or raw.response_times.count < before.response_times.count
    )


def _departed_part(state: _Region) -> Statistics:
    """The departed instances' part of the last totals, which the loss took."""
    raw = state.raw
    hits, misses = state.departed
    requests = raw.hit_count + raw.miss_count
    share = (hits + misses) / requests if requests else 0.0
    rt = raw.response_times
    return Statistics(
        hit_count=hits,
        miss_count=misses,
        set_count=round(share * raw.set_count),
        eviction_count=round(share * raw.eviction_count),
        response_times=ResponseTimes(
            rt.bounds, tuple(round(share * n) for n in rt.counts), share * rt.sum
        ),
    )


def _add(a: Statistics, b: Statistics) -> Statistics:
    """``a`` with ``b``'s counters added (``a``'s gauges kept)."""
    return dataclasses.replace(
        a,
        **{f: getattr(a, f) + getattr(b, f) for f in _COUNTS},
        response_times=a.response_times.merge(b.response_times),
    )


def _max(before: Statistics, now: Statistics) -> Statistics:
    """``now``, its counters never below ``before``'s."""
    rt, old = now.response_times, before.response_times
    if rt.bounds == old.bounds:  # every bucket (so every cumulative one) and the sum
        counts = tuple(max(a, b) for a, b in zip(old.counts, rt.counts))
        rt = ResponseTimes(rt.bounds, counts, max(old.sum, rt.sum))
    return dataclasses.replace(
        now, **{f: max(getattr(before, f), getattr(now, f)) for f in _COUNTS}, response_times=rt
    )


class LossCount:
    """``conduit_cache_data_losses_total`` per region, monotonic while a reader runs.

    Every region the reader knows is published, at 0 until its first loss, so that a first
    loss is an increase Prometheus sees (a series born at 1 is not). A region's totals that
    Redis lost and rebuilt (another ``epoch``) count their losses from 1 again: that adds
    to what was published, never replaces it.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}  # region: (epoch, lost_count) last read
        self._published: dict[str, int] = {}

    def apply(
        self, regions: Iterable[str], aggregates: Mapping[str, Mapping[str, str]]
    ) -> dict[str, int]:
        """The published count of every region of ``regions``, from their aggregated hashes."""
        for region in regions:
            fields = aggregates.get(region, {})
            epoch, count = fields.get("epoch", ""), _count(fields.get("lost_count"))
            if region not in self._published:
                self._published[region] = count  # what Redis holds when first read
            else:
                last_epoch, last = self._seen[region]
                self._published[region] += max(0, count - last) if epoch == last_epoch else count
            self._seen[region] = (epoch, count)
        return {region: self._published[region] for region in regions}


def _count(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0

"""Cluster counters that never go backwards across a Redis data loss, the same on every
``serve`` replica, a replica started after the loss too.

Redis's totals of a region are the departed instances' counts plus the live instances'
(``live_hit_count`` / ``live_miss_count`` in the aggregated hash are the live part of hits
and misses). When Redis loses its data (an empty restart, an evicted or deleted aggregated
hash), the live instances write their lifetime counts again (the write protocol's healing)
but the departed instances' counts are gone, so the totals drop, and a reader that published
them as they are would make Prometheus see a counter reset and count the rebuilt totals as new
events (``rate()`` many times too high for a whole window).

A lost and rebuilt aggregated hash has another ``epoch``. A reader that read the totals of the
previous epoch sees the loss and carries the departed instances' part of its last read over:
from then on it publishes Redis's totals plus what the losses took, and never less than it
published before. While the live instances rebuild (until each has written again, one
``flush_interval``) the counters hold still; once they have, they continue exactly where
they would have been. Hits and misses are exact (their departed part is known); the departed
part of sets, evictions and the response-time histogram is taken in the proportion of hits
and misses it had. Counters that go down within one epoch (writes a failover lost, which the
live instances write again) are held where they were, nothing carried.

What the losses took is shared through Redis (``share``: the region's continuity record,
:meth:`~conduit_otel_cache.keys.KeySchema.continuity`: the epoch it is for and the counters
carried), so that every reader publishes the same counters, a reader started after the loss
too. A reader that saw the loss advances the record from the epoch it read to the new one,
only if no other reader has meanwhile (compare-and-set on the epoch: two readers that see
the same loss add it once); a reader that did not see it never writes. A record lost while
a reader runs is written again from that reader's memory. Lost with every reader stopped
(or with the totals, when no reader ran across the loss), what it carried is gone: the
counters then restart lower (Prometheus sees a reset).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

from .model import ResponseTimes, Statistics

_COUNTS = ("hit_count", "miss_count", "set_count", "eviction_count")

#: ``(region, epoch of the record as read ("" when there was none), new record) -> the
#: record Redis holds afterwards`` (the new one when written; the one another reader wrote
#: first when not)
Share = Callable[[str, str, dict[str, str]], Mapping[str, str]]


@dataclasses.dataclass
class _Region:
    epoch: str  # the epoch of Redis's totals at the last read
    raw: Statistics  # Redis's totals at the last read
    departed: tuple[int, int]  # hits, misses of departed instances at the last read
    carried: Statistics  # what losses took, carried over (counters only)
    published: Statistics


class Continuity:
    """Keeps every region's counters monotonic across Redis data losses, shared by readers
    through ``share`` (without it, in this reader's memory only)."""

    def __init__(self, bounds: Iterable[float] = (), share: Share | None = None) -> None:
        self._bounds = tuple(bounds)
        self._share = share
        self._regions: dict[str, _Region] = {}
        #: Redis data losses this reader saw (one per region that lost counts)
        self.losses = 0

    def apply(
        self,
        regions: dict[str, Statistics],
        aggregates: Mapping[str, Mapping[str, str]],
        records: Mapping[str, Mapping[str, str]] | None = None,
    ) -> dict[str, Statistics]:
        """The statistics to publish for Redis's ``regions`` (parsed from ``aggregates``,
        the aggregated hashes they were read from), with the continuity ``records`` read
        with them (``{}`` where a region has none). A region this reader read before, or
        that has a record, and whose totals Redis no longer holds (lost, and no live
        instance to write them again) is a loss too: published, with what it took carried."""
        result = {}
        records = records or {}
        gone = sorted({*self._regions, *records}.difference(regions))
        for name in [*regions, *gone]:
            raw = regions.get(name, Statistics())
            fields = aggregates.get(name, {})
            epoch, departed = fields.get("epoch", ""), _departed(raw, fields)
            record = records.get(name, {})
            shared = self._parse(record)
            state = self._regions.get(name)
            if state is None:  # what this reader knows of earlier epochs is what is shared
                carried = shared[1] if shared is not None else Statistics()
                state = _Region(epoch, raw, departed, carried, _add(raw, carried))
            else:
                state.carried = self._carried(name, state, raw, epoch, record, shared)
            state.published = _max(state.published, _add(raw, state.carried))
            state.epoch, state.raw, state.departed = epoch, raw, departed
            self._regions[name] = state
            result[name] = state.published
        return result

    def _carried(
        self,
        name: str,
        state: _Region,
        raw: Statistics,
        epoch: str,
        record: Mapping[str, str],
        shared: tuple[str, Statistics] | None,
    ) -> Statistics:
        """What the losses took, for this read: the shared record's when it is for this
        epoch; advanced (and shared) when this reader saw the loss; written again from
        memory when the record was lost."""
        if shared is not None and shared[0] == epoch:
            return shared[1]
        # a lost and rebuilt hash has another epoch (totals that adopt their first epoch
        # lost nothing unless a counter went down)
        lost = epoch != state.epoch and (state.epoch != "" or _went_down(state, raw))
        if lost:
            self.losses += 1
            base = shared[1] if shared is not None else state.carried
            carried = _add(base, _departed_part(state))
        elif shared is not None:
            return shared[1]  # a record of an epoch this reader did not see: it adds nothing
        else:
            carried = state.carried  # the record was lost: written again from memory
        if self._share is None or (not lost and carried == Statistics()):
            return carried
        proposed = {"epoch": epoch, **_fields(carried)}
        found = self._parse(self._share(name, record.get("epoch", ""), proposed))
        return found[1] if found is not None and found[0] == epoch else carried

    def _parse(self, record: Mapping[str, str]) -> tuple[str, Statistics] | None:
        """``(epoch, carried)`` of a continuity record; None when there is none (or it is
        malformed: it is written again)."""
        if "epoch" not in record:
            return None
        try:
            return record["epoch"], Statistics.from_fields(record, self._bounds)
        except ValueError:
            return None


def _fields(carried: Statistics) -> dict[str, str]:
    """A continuity record's counters (as the aggregated hash names them)."""
    return {
        **{f: str(getattr(carried, f)) for f in _COUNTS},
        **carried.response_times.to_fields(),
    }


def _departed(raw: Statistics, fields: Mapping[str, str]) -> tuple[int, int]:
    """Hits and misses of departed instances: the totals less the live sums."""
    try:
        live_hits = int(fields.get("live_hit_count", "0"))
        live_misses = int(fields.get("live_miss_count", "0"))
    except ValueError:
        live_hits, live_misses = raw.hit_count, raw.miss_count
    return max(0, raw.hit_count - live_hits), max(0, raw.miss_count - live_misses)


def _went_down(state: _Region, raw: Statistics) -> bool:
    """A counter of the region went down since the last read (the departed part alone may:
    an expired instance that writes again is live again)."""
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

"""The cluster view: totals, drift, per-instance hit ratios, liveness; cached briefly.

Cluster counters come from the aggregated hashes that every flush keeps up to date
(so they include departed instances and never go back; across a Redis data loss the
readers keep them monotonic, and the same: continuity.py); gauges count live instances.
Drift of a region is the largest distance, in percentage points (hit ratio x 100), between
a live instance's hit ratio and the hit ratio of those instances together, over a window:
the hits and misses since the previous per-instance pass (in ``serve``, in the background
every ``aggregation_interval``), of live instances with at least
``DRIFT_MIN_WINDOW_REQUESTS`` in it; 0 with fewer than two. The first pass that sees an
instance (or its new incarnation) takes all its counts. The per-instance hit-ratio series
are lifetime ratios. Both come from one hash per region of the live instances' hit and
miss counts, which every flush and departure keeps in Redis (one read per region).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import math
import threading
import time
from collections.abc import Collection, Iterable

import redis

from .background import quietly
from .config import AggregationSettings
from .continuity import Continuity, LossCount
from .model import Statistics
from .ratelimit import RateLimitedLog
from .shards import Shards
from .store import ClusterData, Heartbeats, Store, explain

log = logging.getLogger(__name__)

#: an instance counts in a region's windowed drift with at least this many hits and misses
#: since the previous per-instance pass (a handful of requests says little about a ratio)
DRIFT_MIN_WINDOW_REQUESTS = 10
_LOW = 2**64 - 1


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """One aggregation of the cluster, as read from Redis."""

    regions: dict[str, Statistics] = dataclasses.field(default_factory=dict)
    drift: dict[str, float] = dataclasses.field(default_factory=dict)
    #: ``{region: {instance_id: hit ratio}}`` of live instances
    instance_hit_ratios: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: ``{region: hit ratio}`` of all live instances together
    live_hit_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    #: ``(region, instance_id, hit ratio)`` of at most ``max_instance_series`` live
    #: instances, those farthest from their region's live hit ratio first
    instance_series: tuple[tuple[str, str, float], ...] = ()
    #: instances whose heartbeat is at most ``instance_timeout`` old
    active_count: int = 0
    #: ``{instance_id: last heartbeat}`` of registered instances whose heartbeat expired
    #: (not yet removed by cleanup)
    missing_heartbeats: dict[str, float] = dataclasses.field(default_factory=dict)
    server_time: float = 0.0
    redis_up: bool = False
    redis_error: str | None = None
    aggregation_latency: float = 0.0
    redis_memory_bytes: int = 0
    #: why ``redis_memory_bytes`` could not be read (an optional reading: ``INFO``)
    redis_memory_error: str | None = None
    #: why expired instances could not leave the live gauges (tried again next read)
    reap_error: str | None = None
    last_successful_aggregation: float | None = None
    data_errors: tuple[str, ...] = ()
    #: ``{region: (losses, server time of the first, of the last)}``: times Redis was
    #: found to have lost part of the region's totals that no live instance could rebuild
    #: (see docs/write-protocol.md, "What Redis can lose")
    data_losses: dict[str, tuple[int, float, float]] = dataclasses.field(default_factory=dict)
    #: ``{region: losses an operator acknowledged}`` (``cleanup --acknowledge-losses``)
    losses_acknowledged: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``{region: losses}`` of every region, monotonic while this reader runs (0 before the
    #: first; a rebuilt hash's losses add up): ``conduit_cache_data_losses_total``
    losses_published: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``{error kind: count}``: failed flushes of every instance, carried through Redis by
    #: its next successful write
    instance_flush_errors: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def missing_instances(self) -> tuple[str, ...]:
        """Registered instances whose heartbeat expired, sorted."""
        return tuple(sorted(self.missing_heartbeats))

    def missing_for(self, instance_id: str, instance_timeout: float) -> float:
        """Seconds an instance has been missing (since its heartbeat expired)."""
        beat = self.missing_heartbeats[instance_id]
        return max(0.0, self.server_time - beat - instance_timeout)


class Aggregator:
    """Reads the cluster view from Redis.

    The cluster totals are a few reads whatever the cluster size; a burst of readers within
    ``aggregation_cache_ttl`` shares one read, and a reader that arrives while another
    reads gets the last view at once instead of waiting. The per-instance pass (drift,
    per-instance hit ratios) reads one counts hash per region (every live instance's hits
    and misses): with ``background=True`` it runs in a thread every
    ``aggregation_interval`` so that no reader waits for it; otherwise it runs with each
    refresh of the totals. Full per-instance statistics are read on demand by
    :meth:`per_instance`.
    """

    def __init__(
        self, store: Store | Shards, settings: AggregationSettings, *, background: bool = False
    ) -> None:
        self.store = store
        self.settings = settings
        self.background = background
        self.errors_total = 0
        self.aggregations = 0
        self._busy = threading.Lock()
        self._view: ClusterView | None = None
        self._read_at = -float("inf")
        self._generation = 0  # invalidate() counts; a view is read under one generation
        self._read_generation = 0
        self._instance_ratios: dict[str, dict[str, float]] = {}
        self._instance_series: tuple[tuple[str, str, float], ...] = ()
        self._drift: dict[str, float] = {}
        #: ``{region: {instance_id: hits << 64 | misses}}`` at the start of each drift window
        self._counts: dict[str, dict[str, int]] = {}
        self._instance_errors: dict[str, tuple[str, ...]] = {}
        self._reported: dict[str, frozenset[str]] = {}  # the malformed entries of each read
        #: the counters stay monotonic across a Redis data loss, the same on every reader
        #: (each keyspace's part of them, by its key prefix: :mod:`.shards`)
        self.continuity: dict[str, Continuity] = {}
        self.loss_count: dict[str, LossCount] = {}
        self._errors = RateLimitedLog(log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_cluster(self, reap: bool = False) -> dict[Store, ClusterData]:
        """Each keyspace's cluster data (one store's: one), by keyspace (the parts as they
        were when the read began: :meth:`.shards.Shards.discover` may change them)."""
        timeout = self.settings.instance_timeout
        return {part: part.read_cluster(timeout, reap=reap) for part in self.store.parts}

    def view(self, max_age: float | None = None) -> ClusterView:
        """The cached view, read again when older than ``max_age`` seconds (default
        ``aggregation_cache_ttl``). While another reader reads, the last view is returned
        at once, unless :meth:`invalidate` was called since that read began."""
        view = self._view
        if view is not None and self._fresh(max_age):
            return view
        invalidated = self._read_generation != self._generation
        if not self._busy.acquire(blocking=view is None or invalidated):
            assert view is not None
            return view  # another reader is refreshing: do not queue behind it
        try:
            if self._view is None or not self._fresh(max_age):
                generation = self._generation
                self._view = self._refresh()
                self._read_at = time.monotonic()
                self._read_generation = generation
            return self._view
        finally:
            self._busy.release()

    def _fresh(self, max_age: float | None) -> bool:
        if not self.settings.enable_aggregation_cache or self._read_generation != self._generation:
            return False
        ttl = self.settings.aggregation_cache_ttl if max_age is None else max_age
        return time.monotonic() - self._read_at < ttl

    def invalidate(self) -> None:
        """Make the next :meth:`view` read Redis again: it reflects every write Redis
        acknowledged before this call (it waits for a read already under way, which may
        have begun before them)."""
        self._generation += 1

    def start(self) -> None:
        """Run the per-instance pass in a background thread every ``aggregation_interval``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._instance_loop, daemon=True, name="conduit-instance-aggregation"
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the background pass."""
        self._stop.set()

    def _instance_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with quietly():  # beside the thread answering scrapes
                    self.refresh_instances()
            except Exception as exc:
                self._errors.error("conduit-otel-cache: per-instance aggregation failed: %s", exc)
            self._stop.wait(self.settings.aggregation_interval)

    def _refresh(self) -> ClusterView:
        start = time.perf_counter()
        self.aggregations += 1
        previous = self._view or ClusterView()
        try:
            # without the background pass, the pass's check of the heartbeats comes first,
            # so that the count of live instances this read returns leaves out strays
            strays = None if self.background else self._strays()
            layouts = self.store.discover()  # the keyspaces in use (Redis Cluster)
            self._count(":layouts", layouts)  # ":layouts" is no region's name
            self._instance_errors[":layouts"] = tuple(layouts)
            data = self._read_cluster(reap=True)
            memory, memory_error = self._memory()
            if strays is not None:
                self.refresh_instances(data, strays)
        except Exception as exc:
            error = explain(exc)
            self._errors.error(
                "conduit-otel-cache: aggregation from %s failed: %s",
                self.settings.safe_redis_url,
                error,
            )
            return dataclasses.replace(previous, redis_up=False, redis_error=error)
        return dataclasses.replace(
            self._build(data, memory, start), redis_memory_error=memory_error
        )

    def _memory(self) -> tuple[int, str | None]:
        """Redis memory, an optional reading: a refusal (an ACL without ``+info``) drops it
        alone, with the command to allow."""
        try:
            return self.store.used_memory(), None
        except redis.ResponseError as exc:  # NoPermissionError is one
            return 0, explain(exc)

    def _strays(self) -> list[str]:
        return self.store.remove_strays(self.settings.instance_timeout)

    def refresh_instances(
        self, data: dict[Store, ClusterData] | None = None, strays: list[str] | None = None
    ) -> None:
        """Read every live instance's hit ratio per region (the per-instance series) now,
        and check every heartbeat (malformed members are removed and reported here;
        ``strays``: already checked, these were removed)."""
        errors: list[str] = self._strays() if strays is None else list(strays)
        live = _live_ratios((data or self._read_cluster()).values())
        rates = self._windowed_drift(sorted(live), errors)
        # the farthest first, from a generator: a row not kept is freed at once (100,000 rows
        # kept to the end of the pass cost a full collection of the garbage collector)
        rows = heapq.nlargest(
            self.settings.max_instance_series,
            (
                (abs(rate - live.get(region, rate)), region, instance_id, rate)
                for region, by_instance in rates.items()
                for instance_id, rate in by_instance.items()
            ),
        )
        # selected here, in the per-instance pass, so that a scrape never walks every instance
        self._instance_series = tuple((region, i, rate) for _, region, i, rate in rows)
        self._instance_ratios = rates
        errors += self.store.heartbeats().errors
        self._count("", errors)
        self._instance_errors[""] = tuple(errors)  # "" is no region name: the pass's own

    def _windowed_drift(self, regions: list[str], errors: list[str]) -> dict[str, dict[str, float]]:
        """Read every live instance's hits and misses in ``regions`` and set the drift of
        each region, in percentage points, over the window since the previous pass: the
        largest distance between a live instance's hit ratio over its hits and misses since
        then and the ratio of all of them together, among instances with at least
        ``DRIFT_MIN_WINDOW_REQUESTS`` in the window (all of an instance's counts the first
        time it is seen, or when they went down: a new incarnation). A region with two live
        instances or more but fewer than two with enough requests keeps its drift, and its
        window grows on. Returns ``{region: {instance_id: lifetime hit ratio}}``."""
        now: dict[str, dict[str, int]] = {}  # hits << 64 | misses: small, 100,000 of them
        rates: dict[str, dict[str, float]] = {}
        drift: dict[str, float] = {}
        read, bad = self.store.read_request_counts(regions)  # valid instance ids only
        errors += bad
        for region, by_instance in read.items():
            rates[region] = ratios = {}
            now[region] = counts = {}
            before = self._counts.get(region, {})
            window: list[tuple[int, int]] = []
            for instance_id, value in by_instance.items():
                try:
                    hit_count, _, miss_count = value.partition(" ")
                    hits, misses = int(hit_count), int(miss_count)
                    if not (0 <= hits < 2**63 and 0 <= misses < 2**63):
                        raise ValueError("count out of range")
                except ValueError as exc:
                    key = self.store.home(instance_id).keys.counts(region)
                    errors.append(f"{key} (instance {instance_id[:40]!r}): {exc}")
                    continue
                if hits + misses == 0:
                    continue
                ratios[instance_id] = hits / (hits + misses)
                counts[instance_id] = hits << 64 | misses
                last = before.get(instance_id)
                if last is not None and last >> 64 <= hits and last & _LOW <= misses:
                    hits, misses = hits - (last >> 64), misses - (last & _LOW)
                if hits + misses >= DRIFT_MIN_WINDOW_REQUESTS:
                    window.append((hits, misses))
            if len(ratios) < 2:  # one live instance (or none) has no drift
                drift[region] = 0.0
                continue
            if len(window) < 2:  # too little traffic since the last window: keep it open
                if region in self._drift:
                    drift[region] = self._drift[region]
                now[region] = {i: before.get(i, c) for i, c in counts.items()}
                continue
            hits = sum(h for h, _ in window)
            requests = sum(h + m for h, m in window)
            drift[region] = 100 * _farthest([h / (h + m) for h, m in window], hits / requests)
        self._counts = now
        self._drift = drift
        return rates

    def instances(self, beats: Heartbeats | None = None) -> tuple[list[str], list[str]]:
        """Names of the live and of the missing instances, read now (lists every one)."""
        beats = beats or self.store.heartbeats()
        cutoff = beats.server_time - self.settings.instance_timeout
        live = sorted(i for i, beat in beats.beats.items() if beat >= cutoff)
        return live, sorted(i for i, beat in beats.beats.items() if beat < cutoff)

    def per_instance(self, region: str, beats: Heartbeats | None = None) -> dict[str, Statistics]:
        """``{instance_id: statistics}`` of ``region`` for every registered instance,
        read now (one pipelined read per instance; ``beats`` saves reading the heartbeats
        again); malformed entries are skipped."""
        beats = beats or self.store.heartbeats()
        active = set(self.instances(beats)[0])
        result: dict[str, Statistics] = {}
        errors: list[str] = []
        raw = self.store.read_instances(sorted(beats.beats), [region])
        for (instance_id, _), entry in raw.items():
            key = self.store.home(instance_id).keys.stats(instance_id, region)
            if isinstance(entry, Exception):
                errors.append(f"{key}: {entry}")
                continue
            if not entry:
                continue
            try:
                result[instance_id] = Statistics.from_fields(
                    entry,
                    self.settings.response_time_buckets,
                    instance_count=1,
                    last_updated=_timestamp(entry.get("last_updated")),
                    live=instance_id in active and entry.get("live") == "1",
                )
            except ValueError as exc:
                errors.append(f"{key}: {exc}")
        self._count(region, errors)
        self._instance_errors[region] = tuple(errors)  # reported until a clean read
        return result

    def _count(self, source: str, errors: list[str]) -> None:
        """Count the malformed entries ``source`` (a kind of read) found that its previous
        read did not: an entry that stays malformed is counted once, not at every read."""
        before = self._reported.get(source, frozenset())
        new = [error for error in errors if error not in before]
        self._reported[source] = frozenset(errors)
        self.errors_total += len(new)
        for error in new[:1]:
            self._errors.error("conduit-otel-cache: skipped malformed data: %s", error)

    def _share(
        self, part: Store, region: str, expected: str, record: dict[str, str]
    ) -> dict[str, str]:
        """Share what a data loss took from a region's totals (in the shard ``part``) with
        the other readers (continuity.py); a failed write keeps it in this reader, to be
        written next read."""
        try:
            return part.share_continuity(region, expected, record)
        except redis.RedisError as exc:
            self._errors.error(
                "conduit-otel-cache: could not share the counters carried over a data "
                "loss of region %s: %s",
                region,
                explain(exc),
            )
            return record

    def _build(self, reads: dict[Store, ClusterData], memory: int, start: float) -> ClusterView:
        """The view of each shard's data (one store's: one), each shard's counters kept
        monotonic on their own, added up."""
        data = list(reads.values())
        errors = [e for part in data for e in part.errors]
        regions: dict[str, Statistics] = {}
        losses: dict[str, tuple[int, float, float]] = {}
        acknowledged: dict[str, int] = {}
        published: dict[str, int] = {}
        drops = sum(c.losses for c in self.continuity.values())
        for part, read in reads.items():
            continuity, loss_count = self._continuity(part)
            parsed = self._parse(part, read, errors, losses, acknowledged)
            kept = continuity.apply(parsed, read.aggregates, read.continuity)
            for region, stats in kept.items():
                regions[region] = regions[region].merge(stats) if region in regions else stats
            for region, n in loss_count.apply(kept, read.aggregates).items():
                published[region] = published.get(region, 0) + n
        self._count("cluster", errors)
        if sum(c.losses for c in self.continuity.values()) > drops:
            self._errors.error(
                "conduit-otel-cache: Redis lost cluster counts (an empty restart or "
                "a failover): the published counters continue from where they "
                "were while the live instances write theirs again"
            )
        missing = {i: beat for read in data for i, beat in read.missing.items()}
        flush_errors: dict[str, int] = {}
        for read in data:
            for kind, n in read.flush_errors.items():
                flush_errors[kind] = flush_errors.get(kind, 0) + n
        return ClusterView(
            regions=regions,
            drift={region: self._drift[region] for region in regions if region in self._drift},
            instance_hit_ratios=self._instance_ratios,
            live_hit_ratios={r: v for r, v in _live_ratios(data).items() if r in regions},
            instance_series=self._instance_series,
            active_count=sum(read.active for read in data),
            missing_heartbeats=missing,
            server_time=max(read.server_time for read in data),
            redis_up=True,
            aggregation_latency=time.perf_counter() - start,
            redis_memory_bytes=memory,
            reap_error=next((r.reap_error for r in data if r.reap_error), None),
            last_successful_aggregation=time.time(),
            data_errors=(*errors, *(e for es in list(self._instance_errors.values()) for e in es)),
            data_losses=losses,
            losses_acknowledged=acknowledged,
            losses_published={region: published.get(region, 0) for region in regions},
            instance_flush_errors=flush_errors,
        )

    def _continuity(self, part: Store) -> tuple[Continuity, LossCount]:
        """What keeps one keyspace's counters monotonic, made at its first read."""
        name = part.keys.prefix
        if name not in self.continuity:
            share = functools.partial(self._share, part)
            self.continuity[name] = Continuity(self.settings.response_time_buckets, share=share)
            self.loss_count[name] = LossCount()
        return self.continuity[name], self.loss_count[name]

    def _parse(
        self,
        part: Store,
        read: ClusterData,
        errors: list[str],
        losses: dict[str, tuple[int, float, float]],
        acknowledged: dict[str, int],
    ) -> dict[str, Statistics]:
        """The statistics of one shard's aggregated hashes; their losses are added to
        ``losses`` and ``acknowledged``, malformed ones to ``errors``."""
        bounds = self.settings.response_time_buckets
        regions: dict[str, Statistics] = {}
        for region, fields in read.aggregates.items():
            if "lost_count" in fields:
                try:
                    at = float(fields.get("lost_at", 0))
                    since = float(fields.get("lost_since", at))
                    n = int(fields["lost_count"])
                    acknowledged[region] = acknowledged.get(region, 0) + int(
                        fields.get("lost_acknowledged", 0)
                    )
                except ValueError:
                    errors.append(f"aggregate of region {region!r}: bad lost_count or lost_at")
                else:
                    before = losses.get(region, (0, since, at))
                    losses[region] = (before[0] + n, min(before[1], since), max(before[2], at))
            try:
                regions[region] = Statistics.from_fields(
                    fields,
                    bounds,
                    instance_count=max(0, int(fields.get("instance_count", "0"))),
                    last_updated=_timestamp(fields.get("last_aggregated")),
                )
            except ValueError as exc:
                errors.append(f"{part.keys.aggregate(region)}: {exc}")
        return regions


def _farthest(rates: Collection[float], live: float | None) -> float:
    """The largest distance of ``rates`` from ``live`` (0 without a live ratio)."""
    if live is None:
        return 0.0
    return max(max(rates) - live, live - min(rates))


def _live_ratios(data: Iterable[ClusterData]) -> dict[str, float]:
    """The hit ratio of each region's live instances together, from the live sums that
    every flush and departure keep (of every shard); 0 when malformed (reported by
    Statistics)."""
    live: dict[str, tuple[int, int]] = {}
    for read in data:
        for region, fields in read.aggregates.items():
            try:
                hits = max(0, int(fields.get("live_hit_count", "0")))
                misses = max(0, int(fields.get("live_miss_count", "0")))
            except ValueError:
                hits = misses = 0
            before = live.get(region, (0, 0))
            live[region] = (before[0] + hits, before[1] + misses)
    return {
        r: hits / (hits + misses) if hits + misses else 0.0 for r, (hits, misses) in live.items()
    }


def _timestamp(value: str | None) -> float | None:
    """A stored Unix time, or None; raises ``ValueError`` when it is not a finite number."""
    if not value:
        return None
    t = float(value)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"bad timestamp {value!r}")
    return t

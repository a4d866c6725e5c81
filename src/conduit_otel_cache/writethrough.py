"""The write-through: an OpenTelemetry ``MetricExporter`` that turns one collection of the
``conduit.cache.*`` instruments into one Redis write.

The write protocol (what Redis applies is in ``lua/region.lua``):

- values are cumulative per incarnation (see :mod:`.identity`), so a write repeated or
  arriving late adds nothing, and a failed write loses nothing: the next one carries it;
- a write sends only the regions, and within them the fields, that changed since the
  last write Redis acknowledged, each naming the write it continues from; every
  ``CHECK_EVERY``-th write also asks Redis to confirm it still holds every other region
  up to its last acknowledged write. A region Redis no longer holds (an empty restart, an
  evicted key, a failover that lost writes) is resent whole at once, so lost data is
  rebuilt within that many flushes; TTLs are renewed every quarter of the shortest TTL;
- the write-through's own collections report only what changed since the last one
  (``instruments.observe``); the exporter keeps every region's latest values, whichever
  collection carried them (of two collections racing to it, the older one's values are
  kept only where the newer one had none), and each write starts from all of them, so no
  write goes back to older values;
- the first write of an incarnation checks that no other live process writes as its
  instance id; if one does, this process moves to another id (:meth:`Identity.move_aside`)
  and carries on from what it had written, so totals stay exact.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import redis
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.metrics.view import Aggregation

from .background import let_others_run
from .config import WriteThroughSettings
from .identity import Identity
from .instruments import (
    COUNTER_INSTRUMENTS,
    RESPONSE_TIME_INSTRUMENT,
    SCOPE,
    SIZE_INSTRUMENT,
    Observed,
)
from .model import ResponseTimes
from .protocol import Entry, FlushResult, Writer
from .ratelimit import RateLimitedLog
from .shards import Shards, open_store
from .spool import Spool
from .store import Store, explain

log = logging.getLogger(__name__)

_FIELDS = {name: attr for name, _, _, attr in COUNTER_INSTRUMENTS} | {SIZE_INSTRUMENT: "size_bytes"}
#: every this many writes, Redis confirms it holds every unchanged region
CHECK_EVERY = 10
#: a point this much older than one merged already is a clock step, not a race
_CLOCK_STEP_NS = 1_000_000_000

Fields = dict[str, dict[str, str]]


def points_to_fields(
    metrics_data: MetricsData, latest: Fields, at: dict[tuple[str, str], int]
) -> None:
    """Merge the ``conduit.cache.*`` points into ``latest`` (``{region: {hash field:
    cumulative value}}``), each unless ``at`` (``{(region, metric name): collection time
    in ns}``) holds a newer one of its region and metric (a collection that raced a newer
    one to the exporter); a region's dict is replaced, not changed, so that entries of an
    earlier write keep theirs."""
    merged: set[str] = set()
    for resource_metrics in metrics_data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SCOPE:
                continue
            for metric in scope_metrics.metrics:
                let_others_run()
                histogram = metric.name == RESPONSE_TIME_INSTRUMENT
                field = _FIELDS.get(metric.name)
                if not histogram and field is None:
                    continue
                for point in metric.data.data_points:
                    region = point.attributes.get("region") if point.attributes else None
                    if not region:
                        continue
                    region, when = str(region), point.time_unix_nano
                    before = at.get((region, metric.name), 0)
                    if when < before and before - when < _CLOCK_STEP_NS:
                        continue  # a newer collection's point was merged already
                    at[(region, metric.name)] = when
                    if region not in merged:
                        merged.add(region)
                        latest[region] = dict(latest.get(region) or {"size_bytes": "0"})
                    fields = latest[region]
                    if field is not None and isinstance(point, NumberDataPoint):
                        fields[field] = str(int(point.value))
                    elif histogram and isinstance(point, HistogramDataPoint):
                        fields.update(
                            _histogram_fields(
                                tuple(point.explicit_bounds), tuple(point.bucket_counts), point.sum
                            )
                        )


@functools.lru_cache(maxsize=4096)
def _histogram_fields(
    bounds: tuple[float, ...], counts: tuple[int, ...], total: float
) -> Mapping[str, str]:
    """A histogram point's hash fields: unchanged points (most regions of most flushes)
    are encoded once."""
    return MappingProxyType(ResponseTimes(bounds, counts, total).to_fields())


class RedisMetricExporter(MetricExporter):
    """Writes this instance's cumulative cache statistics through to Redis.

    Each ``export`` is one round trip; failures are counted and logged at a bounded rate,
    never raised into the application. ``samples`` drains the raw response times recorded
    since the last call.
    """

    def __init__(
        self,
        settings: WriteThroughSettings,
        store: Store | Shards | None = None,
        *,
        identity: Identity | None = None,
        samples: Callable[[], dict[str, list[float]]] | None = None,
        preferred_aggregation: dict[type, Aggregation] | None = None,
    ) -> None:
        super().__init__(
            preferred_temporality={cls: AggregationTemporality.CUMULATIVE for cls in _all_kinds()},
            preferred_aggregation=preferred_aggregation,
        )
        self.settings = settings
        self.store = store if store is not None else open_store(settings.connection)
        self.identity = identity if identity is not None else Identity(settings.instance_id)
        self.samples = samples
        self.exports = 0  # calls of export(): the SDK makes none when it collected nothing
        self.flush_count = 0
        self.flush_errors = 0
        self.last_error: str | None = None
        self.error_kinds: dict[str, int] = {}  # failed flushes by kind, carried to Redis
        self._last_kind = ""
        self.last_success: float | None = None
        self.last_ok = False
        self._errors = RateLimitedLog(log)
        #: this incarnation's spool (:mod:`.spool`), told its identity and acknowledgement
        self.spool: Spool | None = None
        self._recovering = False  # writing for a dead incarnation: never move aside
        #: what the write-through's own collections observed last (instruments.observe):
        #: they report only what changed since, this exporter keeps the rest
        self.observed: Observed = {}
        self._reset()

    def _reset(self) -> None:
        """State of one incarnation (also in a forked child, whose locks may be held)."""
        self._lock = threading.Lock()
        self._closed = False
        self._acked: Fields = {}  # what Redis holds of this incarnation, per region
        self._acked_seq: dict[str, int] = {}  # per region: its last acknowledged write
        self._epoch: dict[str, str] = {}  # per region: the epoch of the totals holding it
        # per region: its values in the latest write whose reply was lost (Redis may hold
        # them), until a write of the region is acknowledged
        self._unsure: Fields = {}
        self._unsure_epoch: dict[str, str] = {}  # '*': such a write was full
        self._unsure_seq: dict[str, int] = {}  # the number of that write
        self._unsure_by: dict[str, tuple[str, str]] = {}  # its instance id and token
        self._sending: Mapping[str, Entry] = {}  # the entries of the write in flight
        self._seq = 0  # the number of the last write sent (every attempt has its own)
        self._refreshed = -math.inf  # time.monotonic() of the last TTL refresh
        self._writes = 0
        self._confirmed = False  # Redis knows this incarnation as the id's writer
        self._pending: dict[str, deque[float]] = {}
        self._latest: Fields = {}  # per region: its latest values, of whichever collection
        self._latest_at: dict[tuple[str, str], int] = {}  # their collections' times (ns)
        self.observed.clear()  # a new incarnation's collections report every region anew

    @property
    def write_lock(self) -> threading.Lock:
        """Held by each write (``export``, the final write); taken across a fork."""
        return self._lock

    def after_fork(self, settings: WriteThroughSettings) -> None:
        """In a forked child: a new incarnation with nothing written."""
        self.settings = settings
        self.flush_count = self.flush_errors = 0
        self.error_kinds, self._last_kind = {}, ""
        self.last_ok, self.last_error, self.last_success = False, None, None
        self._reset()

    @property
    def token(self) -> str:
        """The incarnation token written with every flush."""
        return self.identity.token

    def _writer(self) -> Writer:
        s = self.settings
        return Writer(
            self.identity.instance_id,
            self.identity.token,
            self.identity.owner,
            s.statistics_ttl,
            s.instance_timeout,
            s.max_response_time_samples,
            s.response_time_sample_ttl,
            ",".join(f"{k}={n}" for k, n in self.error_kinds.items()),
            self._last_kind,
        )

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Write the collected points to Redis (one script call)."""
        self.exports += 1
        let_others_run(0)  # the SDK's collection is over: the application's turn
        with self._lock:
            if self._closed:
                return MetricExportResult.FAILURE
            # every region's latest values, whether this collection carried them or (the
            # write-through's own provider reports only what changed) an earlier one
            points_to_fields(metrics_data, self._latest, self._latest_at)
            fields = self._latest
            if not fields and not self._confirmed:
                self.last_ok = True  # nothing recorded yet: no write (and no lock held on I/O
                return MetricExportResult.SUCCESS  # in a pre-fork master while it forks)
            try:
                self._write(fields)
            except Exception as exc:
                self._reply_lost(exc)
                self.flush_errors += 1
                self._count_kind(exc)
                self.last_ok = False
                self.last_error = explain(exc)
                self._errors.error(
                    "conduit-otel-cache: flush of instance %s to %s failed: %s",
                    self.identity.instance_id,
                    self.settings.connection.safe_redis_url,
                    self.last_error,
                )
                return MetricExportResult.FAILURE
            self.flush_count += 1
            self.last_ok = True
            return MetricExportResult.SUCCESS

    def _write(self, fields: Fields) -> None:
        """One write: changed regions (all whole for a new incarnation; checks of the
        others every ``CHECK_EVERY``-th time or when TTLs are due), then the regions Redis
        asked for whole; moves aside once from a live duplicate id."""
        self._take_samples(fields)
        full = not self._confirmed
        now = time.monotonic()
        refresh = full or now - self._refreshed >= self._refresh_every()
        check = refresh or self._writes % CHECK_EVERY == 0
        entries = self._entries(fields, full, check)
        result = self._send(entries, refresh, check)
        if result.status == "duplicate":
            if self._confirmed and self.store.topology.regions_apart:  # ran beside the beat
                applied = {r: e for r, e in entries.items() if r not in result.need_full}
                self._ack(applied, self._seq, result.epochs)
            self._move_aside()
            entries = self._entries(fields, True, True)
            result = self._send(entries, True)
        if result.status == "duplicate":
            raise RuntimeError(
                f"instance id {self.identity.instance_id!r} is written by another live process"
            )
        lost = result.status == "unregistered" and self._confirmed and bool(fields)
        if (result.rebuild or lost) and not full:  # reaped, or Redis lost it: all whole
            # (departed: its live gauges left the totals with the stats hashes Redis held)
            again = {
                r: self._whole(r, v, self._samples_of(r), live=False) for r, v in fields.items()
            }
            refresh = True
            result = self._send(again, refresh)
            entries = again
        elif result.need_full:
            # live all along: a stats hash that is gone left its live gauges in the totals
            again = {
                r: self._whole(r, fields[r], entries[r].samples, live=True)
                for r in result.need_full
            }
            sent, first = self._seq, result
            retry = self._send(again, False)
            if retry.need_full:
                raise RuntimeError(f"Redis refused full entries for {sorted(retry.need_full)}")
            self._ack({r: e for r, e in entries.items() if r not in again}, sent, first.epochs)
            entries, result = again, dataclasses.replace(retry, stale=first.stale)
        if result.status == "ok":
            if not self._confirmed and self.spool is not None:
                self.spool.set_identity(self.spool_identity(confirmed=True))
            self._confirmed = True
            if result.stale:
                self.store.leave_stale(
                    self._writer(),
                    [r for r in result.stale if r not in fields],
                    live=result.stale_live,
                )
        self._ack(entries, self._seq, result.epochs)
        if refresh:
            self._refreshed = now
        self._writes += 1
        self.last_success = result.server_time

    def _reply_lost(self, exc: Exception) -> None:
        """The write in flight failed: unless it never left (no connection), Redis may
        have applied it. Its values are remembered, so that a stats hash lost before the
        next acknowledged write of the region is never continued from less than Redis may
        hold (and a full entry's epoch is then unknown: ``*``)."""
        sending, self._sending = self._sending, {}
        seq = self._seq
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and (
            "connecting to" in str(exc)
        ):
            return
        for region, entry in sending.items():
            if entry.full or entry.fields:  # not a check
                before = self._unsure.get(region, self._acked.get(region, {}))
                self._unsure[region] = {**before, **entry.fields}
                self._unsure_seq[region] = seq
                self._unsure_by[region] = (self.identity.instance_id, self.identity.token)
                if entry.full:
                    self._unsure_epoch[region] = "*"

    def _ack(self, entries: Mapping[str, Entry], seq: int, epochs: Mapping[str, str]) -> None:
        """Redis applied ``entries`` with write number ``seq``, the full ones to the totals
        of ``epochs``."""
        for region, entry in entries.items():
            if entry.full or entry.fields or entry.samples:  # not a check
                self._acked.setdefault(region, {}).update(entry.fields)
                self._acked_seq[region] = seq
                self._unsure.pop(region, None)
                self._unsure_epoch.pop(region, None)
                self._unsure_seq.pop(region, None)
                self._unsure_by.pop(region, None)
            if entry.full and region in epochs:
                self._epoch[region] = epochs[region]
            if entry.samples:
                self._pending.pop(region, None)

    def _send(
        self, entries: Mapping[str, Entry], refresh: bool, checks: bool = False
    ) -> FlushResult:
        if refresh or not self._confirmed:  # at the first write and every TTL renewal
            self.store.record_layout()
        self._seq += 1
        self._sending = entries
        let_others_run(0)  # the entries are encoded: the application's turn
        result = self.store.flush(
            self._writer(),
            entries,
            refresh=refresh,
            seq=self._seq,
            beat_first=not self._confirmed,
            known=self._confirmed,
            checks=checks,
        )
        self._sending = {}
        return result

    def _whole(
        self, region: str, values: Mapping[str, str], samples: Sequence[float], *, live: bool
    ) -> Entry:
        """A full entry of ``region``; with what Redis acknowledged of it and in which totals
        (``live``: its live gauges are in them), so that Redis adds only what is new when
        the region's stats hash is gone but the totals still hold it. After a write of the
        region whose reply was lost, also that write: its number (``unsure``), writer
        (``uid``, ``utoken``), values (``u:<field>``) and totals (``uepoch``, ``*`` when
        unknown); Redis continues from it
        when the totals' record of their writes says it was applied, and when that record
        is lost too, counts it as applied and reports a loss (never adds it twice)."""
        acked, epoch = self._acked.get(region), self._epoch.get(region, "")
        base: dict[str, str] = dict(acked) if acked is not None and epoch else {}
        if base and region in self._acked_seq:  # the write that acknowledged it: the
            base["aseq"] = str(self._acked_seq[region])  # totals' record tells if they hold it
        unsure = self._unsure.get(region)
        if unsure is not None:
            base |= {f"u:{name}": value for name, value in unsure.items()}
            base["unsure"] = str(self._unsure_seq[region])
            base["uid"], base["utoken"] = self._unsure_by[region]  # (before moving aside)
            base["uepoch"] = self._unsure_epoch.get(region) or epoch or "*"
        if not base:
            return Entry(values, True, samples)
        if live:
            base["live"] = "1"
        return Entry(values, True, samples, epoch=epoch if acked is not None else "", base=base)

    def _refresh_every(self) -> float:
        """Seconds between TTL renewals: a quarter of the shortest TTL."""
        s = self.settings
        return min(s.statistics_ttl, s.response_time_sample_ttl) / 4

    def _samples_of(self, region: str) -> tuple[float, ...]:
        return tuple(self._pending.get(region, ()))

    def _entries(self, fields: Fields, full: bool, check: bool) -> dict[str, Entry]:
        """What to send: every region whole (``full``), else the changed fields of the
        changed regions, with the raw samples recorded since the last write, and (``check``)
        a check of every other region."""
        entries = {}
        for region, values in fields.items():
            let_others_run()
            pending = self._samples_of(region)
            acked = self._acked.get(region)
            if full or acked is None:  # a new region (or a new id after moving aside): whole
                entries[region] = self._whole(region, values, pending, live=False)
                continue
            changed = {f: v for f, v in values.items() if acked.get(f) != v}
            if changed or pending or check:
                entries[region] = Entry(changed, False, pending, self._acked_seq[region])
        return entries

    def _take_samples(self, fields: Fields) -> None:
        """Raw response times since the last successful write (at most the cap per region)."""
        if self.samples is None:
            return
        limit = self.settings.max_response_time_samples
        for region, new in self.samples().items():
            self._pending.setdefault(region, deque(maxlen=limit)).extend(new)

    def _move_aside(self) -> None:
        """Another incarnation writes as this id (another live process, or one that took
        the id over while this one was cut off): continue under another id. Its first
        write carries, per region, what Redis acknowledged under the old id and in which
        totals, so that only what is new is added (or all of it, when those totals were
        lost since); the old id's live gauges left when the other incarnation took over."""
        old = self.identity.instance_id
        if self._recovering:
            raise RuntimeError(f"instance id {old!r} is written by another incarnation")
        self._acked_seq = {}
        new = self.identity.move_aside(displaced=self._confirmed, home=self.store.of)
        self._confirmed = False
        if self.spool is not None:
            self.spool.set_identity(self.spool_identity(confirmed=False))
        log.warning(
            "conduit-otel-cache: another process writes as instance %r; this process "
            "(pid %d) continues as %r. Give each process its own instance_id, or leave it to "
            "the default (<HOSTNAME>-<pid>)",
            old,
            self.identity.pid,
            new,
        )

    def spool_identity(self, *, confirmed: bool) -> dict[str, Any]:
        """What a spool holds of this incarnation (``confirmed``: Redis acknowledged it)."""
        i = self.identity
        bounds = list(self.settings.response_time_buckets)
        return {
            "instance_id": i.instance_id,
            "token": i.token,
            "owner": i.owner,
            "confirmed": confirmed,
            "bounds": bounds,
        }

    def recover(self, fields: Fields) -> None:
        """Write a dead incarnation's final cumulative values under its own identity (this
        exporter's), then deregister it; a repeat adds nothing. Raises on failure; never
        moves aside (the values belong to that id and token)."""
        with self._lock:
            self._recovering = True
            self._write(fields)
            if self._confirmed:
                self.store.depart(self.identity.instance_id, remove=True, regions=list(self._acked))

    def _count_kind(self, exc: Exception) -> None:
        kind = re.sub(r"\W", "", type(exc).__name__)[:40] or "Error"
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self._last_kind = kind

    def heartbeat(self) -> bool:
        """Beat the heartbeat without a flush (``heartbeat_interval``); True on success.
        A failure is counted with the flush errors and logged at a bounded rate."""
        with self._lock:
            if self._closed:
                return False
            try:
                self.store.heartbeat(self._writer())
            except Exception as exc:
                self.flush_errors += 1
                self._errors.error(
                    "conduit-otel-cache: heartbeat of instance %s to %s failed: %s",
                    self.identity.instance_id,
                    self.settings.connection.safe_redis_url,
                    explain(exc),
                )
                return False
            return True

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Exports are synchronous; nothing is buffered."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Deregister: take this instance's gauges out and remove its keys (counters stay)."""
        self.close(depart=True)

    def close(self, *, depart: bool) -> None:
        """Stop writing; with ``depart``, deregister as :meth:`shutdown` does."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if depart and self._confirmed:
                    self.store.depart(
                        self.identity.instance_id, remove=True, regions=list(self._acked)
                    )
            except Exception as exc:
                log.warning(
                    "conduit-otel-cache: could not deregister %s: %s; it expires after %gs",
                    self.identity.instance_id,
                    type(exc).__name__,
                    self.settings.instance_timeout,
                )
            finally:
                self.store.close()


def _all_kinds() -> list[type]:
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )

    return [
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    ]

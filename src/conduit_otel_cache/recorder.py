"""The hot path: ``record_*`` into tallies, exact under threads, no I/O.

A hit or a miss is one ``deque.append`` (atomic) to its region's queue, shared by every
thread: with cold caches, as in a service, each object the hot path touches costs a cache
miss, and shared queues are few and stay warm. Whoever finds :data:`FOLD_AT` waiting puts
them in the region's tally (counts, histogram, raw samples) at once, if it gets the lock
without waiting; a reader takes the rest under that lock. So no event is counted twice or
lost, and the hot path never waits.

Writes and evictions, and every event with a spool (:mod:`.spool`, whose file must hold
each event at once), go to per-thread tallies instead: each thread owns one tally per
region and is the only writer of it, and readers sum every tally. A finished thread's
tallies are handed to the next thread that counts in their region, so their number is
bounded by the live threads. A tally is a list, or with a spool a record of floats in a
file that outlives the process.
"""

from __future__ import annotations

import logging
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from contextlib import suppress
from functools import reduce
from itertools import repeat
from operator import add
from typing import Any, Protocol

from .config import valid_name
from .lifecycle import write_path
from .model import ResponseTimes, Statistics
from .spool import Spool

log = logging.getLogger(__name__)

INVALID_REGION = "_invalid"
OVERFLOW_REGION = "_overflow"

HIT, MISS, SET, EVICT, RT_SUM, BUCKET0 = range(6)


class RecordTimed(Protocol):
    """``record_hit`` and ``record_miss``."""

    def __call__(self, region: str | None, response_time: float | None = None) -> None: ...


#: Response times above this many seconds (or not finite, or negative) are rejected, so a
#: region's sum of response times stays finite.
MAX_RESPONSE_TIME = 1e6
#: Sizes above this are rejected (a Redis integer is 64-bit).
MAX_SIZE_BYTES = 2**62
#: response times a thread keeps pending before it puts them in its tally's histogram
FOLD_AT = 256


def _take(pending: deque[float]) -> list[float]:
    """The values in ``pending`` now. The owner thread and a reader may both take: each
    ``popleft`` is atomic, so each value is taken once, by one of them."""
    taken: list[float] = []
    with suppress(IndexError):  # the other taker was quicker: list.extend keeps what it took
        taken.extend(map(deque.popleft, repeat(pending, len(pending))))  # (in C)
    return taken


def _keep(samples: deque[float] | array[float], times: Any, most: int) -> None:
    """Add ``times`` to a tally's raw samples, keeping about the last ``most``: a thread's
    own tally keeps them in a bounded ``deque``; a region's shared tally, touched only under
    the lock, keeps their values in an ``array`` (no float object stays alive for each: the
    objects the queues held are freed at once, and the heap the application allocates from
    stays compact), cut back to the last ``most`` when it holds twice as many."""
    samples.extend(times)
    if type(samples) is array and len(samples) >= 2 * most:
        del samples[:-most]


def _queued(recorder: Recorder, queues: dict[str, deque[Any]], kind: int, event: str) -> Any:
    """``record_hit`` or ``record_miss`` of ``recorder``: an append to the region's queue in
    ``queues`` (of ``kind``), shared by every thread; each its own function over its own
    dict (with cold caches, as in a service, every further object touched costs more than
    the work). An event without a response time waits as None."""

    def record(region: str | None, response_time: float | None = None) -> None:
        try:
            pending = queues[region]  # type: ignore[index]
        except Exception:
            pending = recorder._queue(region, kind)
        pending.append(response_time)
        if len(pending) >= FOLD_AT:
            recorder._fold_queue(pending)

    return _named(record, event)


def _spooled(kind: int, event: str) -> Any:
    """``record_hit`` or ``record_miss`` with a spool: into the thread's tally of the region,
    whose record in the spool counts it at once (a tally the spool could not hold keeps
    the response time waiting, its last item, until :meth:`Recorder._fold`)."""

    def record(self: Recorder, region: str | None, response_time: float | None = None) -> None:
        try:
            slot = self._tls.slots[region]
        except Exception:
            slot = self._slot(region)
        slot[kind] += 1
        if response_time is not None:
            if type(slot) is list:
                pending = slot[-1]
                pending.append(response_time)
                if len(pending) >= FOLD_AT:
                    self._fold(slot)
            else:
                self._time(slot, response_time)

    return _named(record, event)


def _named(record: Any, event: str) -> Any:
    record.__name__ = f"record_{event}"
    record.__qualname__ = f"Recorder.record_{event}"
    record.__doc__ = f"Count a cache {event} in ``region``, with its response time (seconds)."
    return record


class Recorder:
    """Local cache statistics per region; the hot path of the application.

    ``region=None`` counts under ``default_region``.
    """

    def __init__(
        self,
        buckets: tuple[float, ...],
        max_regions: int = 100,
        default_region: str = "default",
        max_samples: int = 0,
        spool: Spool | None = None,
    ) -> None:
        self.spool = spool
        self._default_region = default_region
        self._max_samples = max_samples  # raw response times kept per region (0: none)
        self._bounds = tuple(buckets)
        self._width = BUCKET0 + len(self._bounds) + 1
        self._max_regions = max_regions
        self._regions: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._warned: set[str] = set()
        # per region, the queues of hits and misses that every thread appends to (cleared,
        # never replaced: ``record_hit`` and ``record_miss`` hold them)
        self._hits: dict[str, deque[Any]] = {}
        self._misses: dict[str, deque[Any]] = {}
        self._queued_hit = _queued(self, self._hits, HIT, "hit")
        self._queued_miss = _queued(self, self._misses, MISS, "miss")
        self.reset(spool)

    @property
    def width(self) -> int:
        """Numbers per tally."""
        return self._width

    def reset(self, spool: Spool | None = None) -> None:
        """Forget every tally (sizes and admitted regions stay), counting on in ``spool``
        from now: a forked child's start. Only the forking thread survives a fork, and it
        may have held the lock."""
        self.spool = spool
        self._lock = threading.Lock()
        self._hits.clear()
        self._misses.clear()
        self._queues: dict[int, tuple[deque[Any], list[Any], int]] = {}  # id: queue, tally, kind
        # a reference taken before a reset (a fork) still counts, in the queues
        self.record_hit = self._queued_hit if spool is None else self._spooled_hit
        self.record_miss = self._queued_miss if spool is None else self._spooled_miss
        self._tls = threading.local()
        self._threads: list[tuple[threading.Thread, dict[str, Any]]] = []
        self._prune_at = 64  # hand on finished threads' tallies when this many registered
        self._tallies: list[tuple[str, Any]] = []  # every tally: (region, tally)
        self._free: dict[str, list[Any]] = {}  # tallies of finished threads, per region
        self._samples: dict[int, deque[float]] = {}  # id(record) -> its raw samples (spool)
        #: per region: the tally of its queues, and of what a reader took from threads' tallies
        self._folded: dict[str, Any] = {}
        #: Events folded into ``_invalid`` / ``_overflow``, and rejected values.
        self.invalid_events = 0
        self.overflow_events = 0
        self.rejected_values = 0

    # -- the hot path -------------------------------------------------------------------

    record_hit: RecordTimed
    record_miss: RecordTimed
    _spooled_hit = _spooled(HIT, "hit")
    _spooled_miss = _spooled(MISS, "miss")

    def record_set(self, region: str | None) -> None:
        """Count a cache write in ``region``."""
        try:
            slot = self._tls.slots[region]
        except Exception:
            slot = self._slot(region)
        slot[SET] += 1

    def record_eviction(self, region: str | None) -> None:
        """Count an eviction (or expiry) in ``region``."""
        try:
            slot = self._tls.slots[region]
        except Exception:
            slot = self._slot(region)
        slot[EVICT] += 1

    def set_size_bytes(self, region: str | None, size_bytes: int) -> None:
        """Set the current size in bytes of ``region`` (a gauge: the last value wins)."""
        if region is None:
            region = self._default_region
        name = region if type(region) is str and region in self._regions else self._admit(region)
        if type(size_bytes) is int and 0 <= size_bytes <= MAX_SIZE_BYTES:
            self._sizes[name] = size_bytes
        else:
            self._reject("size_bytes", size_bytes)

    def _fold(self, slot: list[Any]) -> None:
        """The owner thread: its pending response times into its tally."""
        self._time_all(slot, _take(slot[-1]))

    @write_path
    def _fold_queue(self, pending: deque[Any]) -> None:
        """A thread found :data:`FOLD_AT` waiting in a queue: into its tally, unless another
        thread or a reader holds the lock (then the next event tries again)."""
        if self._lock.acquire(blocking=False):
            try:
                queued = self._queues.get(id(pending))
                if queued is not None and queued[0] is pending:
                    self._drain(*queued)
            finally:
                self._lock.release()

    def _drain(self, pending: deque[Any], slot: list[Any], kind: int) -> None:
        """What waits in a queue, into its tally (under the lock)."""
        taken = _take(pending)
        slot[kind] += len(taken)
        self._time_all(slot, taken)

    def _time_all(self, slot: list[Any], times: list[Any]) -> None:
        """:meth:`_time` of each of ``times`` (None: none) in a list tally, as one batch: the
        sum added in order, the buckets counted and the raw samples appended in C loops."""
        if not times:
            return
        try:
            ordered = sorted(times)
            total = reduce(add, times, slot[RT_SUM])
            valid = total == total and ordered[0] >= 0.0 and ordered[-1] <= MAX_RESPONSE_TIME
            values = array("d", times) if self._max_samples else times  # raises if not numbers
        except Exception:  # None, another type, a Decimal NaN, a comparison that raises
            valid = False
        if not valid:  # NaN (then the total is NaN), out of range, None: one by one
            for seconds in times:
                if seconds is not None:
                    self._time(slot, seconds)
            return
        slot[RT_SUM] = total
        # bucket i holds bounds[i-1] < t <= bounds[i]: in sorted order, the values up to
        # each bound, from the lowest until none is left (a third of the cost of bisecting
        # each value)
        below, bucket = 0, BUCKET0
        for bound in self._bounds:
            if below == len(ordered):
                break
            upto = bisect_right(ordered, bound, below)
            slot[bucket] += upto - below
            below, bucket = upto, bucket + 1
        else:
            slot[bucket] += len(ordered) - below
        if self._max_samples:
            _keep(slot[-2], values, self._max_samples)

    def _time(self, slot: Any, seconds: float) -> None:
        try:
            if 0.0 <= seconds <= MAX_RESPONSE_TIME:  # False for NaN
                total, value = slot[RT_SUM] + seconds, float(seconds)  # each may raise
                slot[RT_SUM] = total
                slot[BUCKET0 + bisect_left(self._bounds, seconds)] += 1
                if self._max_samples:
                    samples = slot[-2] if type(slot) is list else self._samples[id(slot)]
                    _keep(samples, (value,), self._max_samples)
                return
        except Exception:  # bad data is rejected, never raised into the application
            pass
        self._reject("response_time", seconds)

    # -- slow paths: first event of a thread or region, bad input -----------------------

    @write_path
    def _slot(self, region: Any) -> Any:
        if region is None:  # no region given: the default region
            region = self._default_region
        try:
            slots = self._tls.slots
        except AttributeError:
            slots = self._tls.slots = {}
            with self._lock:
                self._threads.append((threading.current_thread(), slots))
                if len(self._threads) >= self._prune_at:  # bounded by the live threads
                    self._hand_on_finished()
                    self._prune_at = max(64, 2 * len(self._threads))
        name = self._admit(region)
        # Keys are canonical names only, so bad or folded names cannot grow the dict;
        # an admitted region's name is its key, which makes its next lookup fast.
        slot: Any = slots.get(name)
        if slot is None:
            with self._lock:
                free = self._free.get(name)
                slot = slots[name] = free.pop() if free else self._new_tally(name)
        return slot

    @write_path
    def _queue(self, region: Any, kind: int) -> deque[Any]:
        """The queue of ``kind`` of ``region`` (created with its tally on first use)."""
        if region is None:  # no region given: the default region
            region = self._default_region
        name = self._admit(region)  # a canonical name: bad or folded ones cannot grow the dicts
        with self._lock:
            if name not in self._hits:
                slot = self._shared_tally(name)
                for queues, of in ((self._hits, HIT), (self._misses, MISS)):
                    pending = queues[name] = deque()
                    self._queues[id(pending)] = (pending, slot, of)
            return (self._hits if kind == HIT else self._misses)[name]

    def _shared_tally(self, name: str) -> list[Any]:
        """The region's tally of its queues and of what readers take (under the lock)."""
        slot = self._folded.get(name)
        if slot is None:
            slot = self._folded[name] = self._new_tally(name, own=False)
        return slot  # type: ignore[no-any-return]

    def _new_tally(self, name: str, own: bool = True) -> Any:
        """A zeroed tally (under the lock): a spool record, else (when the spool cannot
        grow, or for a reader's tally: ``own=False``) a list of the numbers, then the last
        raw response times, then the response times waiting to be folded in."""
        slot: Any = None
        if self.spool is not None and own:
            try:
                slot = self.spool.record(name)
                if self._max_samples:
                    self._samples[id(slot)] = deque(maxlen=self._max_samples)
            except (OSError, ValueError) as exc:
                self._warn_once(
                    "spool",
                    "cannot grow the spool (%s: %s); later tallies are not spooled",
                    type(exc).__name__,
                    exc,
                )
                self.spool = None
        if slot is None:
            slot = [0] * self._width
            slot[RT_SUM] = 0.0
            if self._max_samples:  # (a shared tally is touched only under the lock: _keep)
                slot.append(deque(maxlen=self._max_samples) if own else array("d"))
            slot.append(deque())  # response times not yet in the tally (_fold)
        self._tallies.append((name, slot))
        return slot

    @write_path
    def _admit(self, region: Any) -> str:
        with self._lock:
            if not valid_name(region) or region in (INVALID_REGION, OVERFLOW_REGION):
                self.invalid_events += 1
                self._warn_once(
                    "invalid",
                    "invalid cache region name %.60r counted under %s",
                    region,
                    INVALID_REGION,
                )
                return INVALID_REGION
            if region in self._regions:
                return str(region)
            if len(self._regions) >= self._max_regions:
                self.overflow_events += 1
                self._warn_once(
                    "overflow",
                    "more than max_regions=%d regions; %r and later ones counted under %s",
                    self._max_regions,
                    region,
                    OVERFLOW_REGION,
                )
                return OVERFLOW_REGION
            self._regions.add(region)
            return str(region)

    def _reject(self, what: str, value: object) -> None:
        self.rejected_values += 1
        self._warn_once(what, "ignored invalid %s value %.60r", what, value)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- readers ------------------------------------------------------------------------

    @write_path
    def snapshot(self) -> dict[str, Statistics]:
        """Current cumulative statistics of every region seen so far."""
        width = self._width
        totals: dict[str, list[Any]] = {}
        with self._lock:
            self._hand_on_finished()
            self._take_pending()
            for name, slot in self._tallies:
                acc = totals.get(name)
                if acc is None:
                    totals[name] = list(slot[:width])
                else:
                    for i in range(width):
                        acc[i] += slot[i]
            sizes = dict(self._sizes)
        bounds = self._bounds
        zeros = [0] * width
        result: dict[str, Statistics] = {}
        for region in totals.keys() | sizes.keys():
            t = [int(n) for n in totals.get(region, zeros)]  # a spool counts in floats
            result[region] = Statistics(
                hit_count=t[HIT],
                miss_count=t[MISS],
                set_count=t[SET],
                eviction_count=t[EVICT],
                size_bytes=sizes.get(region, 0),
                response_times=ResponseTimes(
                    bounds, tuple(t[BUCKET0:]), totals[region][RT_SUM] if region in totals else 0.0
                ),
                instance_count=1,
            )
        return result

    def _take_pending(self) -> None:
        """What waits in the queues, and the response times the threads have not put in
        their tallies yet, into their region's shared tally (under the lock)."""
        for pending, slot, kind in list(self._queues.values()):
            if pending:
                self._drain(pending, slot, kind)
        for name, slot in list(self._tallies):
            if type(slot) is list and slot[-1]:
                taken = _take(slot[-1])
                if taken:
                    self._time_all(self._shared_tally(name), taken)

    def _hand_on_finished(self) -> None:
        """Hand the tallies of finished threads on to the threads that count next in their
        regions (under the lock)."""
        live = []
        for thread, slots in self._threads:
            if _alive(thread):
                live.append((thread, slots))
            else:
                for name, slot in slots.items():
                    self._free.setdefault(name, []).append(slot)
        self._threads = live

    @write_path
    def drain_samples(self) -> dict[str, list[float]]:
        """Take the raw response times recorded since the last drain (at most
        ``max_samples`` per region, the latest)."""
        if not self._max_samples:
            return {}
        drained: dict[str, deque[float]] = {}
        sources: list[tuple[str, Any]] = []
        with self._lock:
            self._take_pending()
            for name, slot in self._tallies:
                samples = slot[-2] if type(slot) is list else self._samples[id(slot)]
                if type(samples) is array:  # a reader's tally: under the lock
                    sources.append((name, samples.tolist()))
                    del samples[:]
                else:
                    sources.append((name, samples))
        for name, samples in sources:
            if not samples:
                continue
            out = drained.get(name)
            if out is None:
                out = drained[name] = deque(maxlen=self._max_samples)
            # a thread's own tally: its thread may append meanwhile
            out.extend(samples if type(samples) is list else _take(samples))
        return {name: list(d) for name, d in drained.items() if d}


class NullRecorder:
    """The recorder of a disabled handle (``enabled=False``): records nothing, holds
    nothing."""

    invalid_events = overflow_events = rejected_values = width = 0

    def record_hit(self, region: str | None, response_time: float | None = None) -> None:
        """Nothing."""

    def record_miss(self, region: str | None, response_time: float | None = None) -> None:
        """Nothing."""

    def record_set(self, region: str | None) -> None:
        """Nothing."""

    def record_eviction(self, region: str | None) -> None:
        """Nothing."""

    def set_size_bytes(self, region: str | None, size_bytes: int) -> None:
        """Nothing."""

    def snapshot(self) -> dict[str, Statistics]:
        """Always empty."""
        return {}

    def drain_samples(self) -> dict[str, list[float]]:
        """Always empty."""
        return {}

    def reset(self, spool: object = None) -> None:
        """Nothing to reset."""


def _alive(thread: threading.Thread) -> bool:
    """``thread.is_alive()``; False for a finished dummy thread (a gevent greenlet's), whose
    ``is_alive()`` raises on Python 3.13.0 ("thread is not alive") instead."""
    try:
        return thread.is_alive()
    except RuntimeError:
        return False

"""The hot path: exact under threads, bad input folded and never raised."""

from __future__ import annotations

import bisect
import logging
import random
import threading
from collections import deque
from decimal import Decimal
from itertools import repeat
from typing import Any

import pytest

from conduit_otel_cache.config import DEFAULT_BUCKETS
from conduit_otel_cache.recorder import FOLD_AT, INVALID_REGION, OVERFLOW_REGION, Recorder, _take


def test_eight_threads_lose_no_increment() -> None:
    rec = Recorder(DEFAULT_BUCKETS)
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(100_000):
            rec.record_hit("ProviderResponses")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.snapshot()["ProviderResponses"].hit_count == 800_000


def test_snapshot_while_threads_record_is_monotonic_and_exact_at_end() -> None:
    rec = Recorder(DEFAULT_BUCKETS)
    done = threading.Event()

    def work() -> None:
        for i in range(50_000):
            rec.record_miss("r", 0.001 * (i % 7))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        seen.append(rec.snapshot().get("r"))
    for t in threads:
        t.join()
    done.set()
    counts = [s.miss_count for s in seen if s is not None]
    assert counts == sorted(counts)
    # each snapshot holds every event with its response time: none counted before it is timed
    assert all(s.response_times.count == s.miss_count for s in seen if s is not None)
    final = rec.snapshot()["r"]
    assert final.miss_count == 200_000
    assert final.response_times.count == 200_000  # finished threads' tallies were folded


def test_two_takers_of_waiting_response_times_take_each_once() -> None:
    """The owner thread and a reader both take waiting response times (``_take``); when the
    other was quicker, what one took before finding the deque empty is kept (list.extend
    keeps the items it took before an error, which ``_take`` relies on)."""
    partial: list[int] = []
    with pytest.raises(IndexError):
        partial.extend(map(deque.popleft, repeat(deque([1, 2, 3]), 5)))
    assert partial == [1, 2, 3]
    pending: deque[float] = deque()
    taken: list[list[float]] = [[], []]
    done = threading.Event()

    def take(into: list[float]) -> None:
        while not done.is_set() or pending:
            into.extend(_take(pending))

    takers = [threading.Thread(target=take, args=(into,)) for into in taken]
    for t in takers:
        t.start()
    for i in range(200_000):
        pending.append(float(i))
    done.set()
    for t in takers:
        t.join()
    assert sorted(taken[0] + taken[1]) == [float(i) for i in range(200_000)]


def test_response_times_wait_at_most_fold_at_in_the_thread_and_every_reader_sees_them() -> None:
    """The hot path only appends a response time to its region's queue; whoever finds
    FOLD_AT waiting puts them in the histogram (so they never pile up), and a snapshot or a
    drain takes those still waiting (so neither misses one)."""
    rec = Recorder((0.001, 0.01), max_samples=5)
    for n in range(1, 2 * FOLD_AT + 6):
        rec.record_hit("r", 0.002)
        assert len(rec._hits["r"]) == n % FOLD_AT  # what still waits: at most FOLD_AT - 1
    rec.record_miss("r", float("nan"))
    s = rec.snapshot()["r"]
    assert (s.hit_count, s.miss_count) == (2 * FOLD_AT + 5, 1)
    assert s.response_times.counts == (0, 2 * FOLD_AT + 5, 0)  # the 5 waiting ones too
    assert s.response_times.sum == pytest.approx(0.002 * (2 * FOLD_AT + 5))
    assert rec.rejected_values == 1  # the NaN, once it was taken
    rec.record_hit("r", 0.0005)
    assert rec.drain_samples() == {"r": [0.002] * 4 + [0.0005]}  # the last 5, waiting one too
    assert rec.snapshot()["r"].response_times.counts == (1, 2 * FOLD_AT + 5, 0)


class Unorderable:
    """A response time whose comparisons raise."""

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("no order")

    __gt__ = __le__ = __ge__ = __lt__


@pytest.mark.parametrize("seed", range(5))
def test_folded_response_times_equal_one_by_one_with_bad_ones_among_them(seed: int) -> None:
    """Response times folded in batches (by the thread every FOLD_AT, by a reader the rest),
    valid and bad mixed, give what counting them one at a time gives: each valid one in its
    bucket, in the sum and in the raw samples; each bad one rejected."""
    rng = random.Random(seed)
    bad = [-1.0, float("nan"), float("inf"), 2e6, "slow", Decimal("0.5"), Decimal("NaN"), object(),
           Unorderable()]  # fmt: skip
    bounds = (0.001, 0.01, 0.1, 1.0)
    edges = [0.0, *bounds, 1e6]  # a value equal to a bound is in that bound's bucket
    times: list[Any] = [
        rng.choice(bad)
        if rng.random() < 0.02
        else rng.choice([rng.random() / 10, rng.random() / 1000, 3, rng.choice(edges)])
        for _ in range(2 * FOLD_AT + rng.randrange(FOLD_AT))
    ]
    rec = Recorder(bounds, max_samples=3 * FOLD_AT)  # every one kept
    for t in times:
        rec.record_hit("r", t)
    valid = [t for t in times if type(t) in (float, int) and 0.0 <= t <= 1e6]
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for t in valid:
        counts[bisect.bisect_left(bounds, t)] += 1
        total += t
    s = rec.snapshot()["r"]
    assert s.hit_count == len(times)
    assert s.response_times.counts == tuple(counts)
    # the thread's tally and the reader's are summed apart: the last bits may differ
    assert s.response_times.sum == pytest.approx(total, rel=1e-12)
    assert rec.rejected_values == len(times) - len(valid)
    assert rec.drain_samples() == {"r": valid}


def test_counts_and_histogram() -> None:
    rec = Recorder((0.001, 0.01))
    rec.record_hit("a", 0.0005)
    rec.record_hit("a", 0.001)  # upper bound is inclusive, like Prometheus' le
    rec.record_miss("a", 0.5)
    rec.record_set("a")
    rec.record_eviction("a")
    rec.set_size_bytes("a", 1024)
    s = rec.snapshot()["a"]
    assert (s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.size_bytes) == (
        2, 1, 1, 1, 1024)  # fmt: skip
    assert s.response_times.counts == (2, 0, 1)
    assert s.response_times.sum == pytest.approx(0.5015)
    assert s.hit_ratio == pytest.approx(2 / 3)


def test_zero_traffic_hit_ratio_is_zero() -> None:
    rec = Recorder(DEFAULT_BUCKETS)
    rec.set_size_bytes("idle", 10)
    s = rec.snapshot()["idle"]
    assert s.hit_ratio == 0.0 and s.average_response_time == 0.0


@pytest.mark.parametrize("bad", ["a:b", "{x}", "with space", "line\nbreak", "", "x" * 10_000,
                                 42, ("t",), ["unhashable"]])  # fmt: skip
def test_invalid_region_is_counted_under_invalid_with_one_warning(
    bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(DEFAULT_BUCKETS)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            rec.record_hit(bad)  # type: ignore[arg-type]
            rec.set_size_bytes(bad, 5)  # type: ignore[arg-type]
    snap = rec.snapshot()
    assert snap[INVALID_REGION].hit_count == 3
    assert snap[INVALID_REGION].size_bytes == 5
    assert set(snap) == {INVALID_REGION}
    assert len([r for r in caplog.records if "invalid cache region" in r.message]) == 1


def test_regions_past_the_cap_fold_into_overflow() -> None:
    rec = Recorder(DEFAULT_BUCKETS, max_regions=3)
    for i in range(10):
        rec.record_hit(f"r{i}")
    snap = rec.snapshot()
    assert set(snap) == {"r0", "r1", "r2", OVERFLOW_REGION}
    assert snap[OVERFLOW_REGION].hit_count == 7
    assert rec.overflow_events == 7


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "slow", object()])
def test_bad_response_time_is_ignored_but_event_counted(bad: object) -> None:
    rec = Recorder(DEFAULT_BUCKETS)
    rec.record_hit("a", bad)  # type: ignore[arg-type]
    rec.set_size_bytes("a", -5)
    s = rec.snapshot()["a"]
    assert s.hit_count == 1
    assert s.response_times.count == 0 and s.response_times.sum == 0.0
    assert s.size_bytes == 0
    assert rec.rejected_values == 2


def test_none_region_counts_under_default_region() -> None:
    rec = Recorder(DEFAULT_BUCKETS, default_region="ProviderResponses")
    rec.record_hit(None)
    rec.record_miss(None, 0.002)
    rec.record_hit("ProviderResponses")
    rec.set_size_bytes(None, 7)
    s = rec.snapshot()
    assert set(s) == {"ProviderResponses"}
    assert (s["ProviderResponses"].hit_count, s["ProviderResponses"].miss_count) == (2, 1)
    assert s["ProviderResponses"].size_bytes == 7

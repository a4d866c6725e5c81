"""Failures stay contained: missing ACL permissions, a hung Redis at exit, many short
threads, extreme values on the hot path."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit_otel_cache import CacheStatistics, setup
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.recorder import MAX_RESPONSE_TIME, Recorder

from ..conftest import MakeStats

PASSWORD = "s3cret-acl"
BASE_ACL = ["~conduit:*", "+@read", "+@write", "+@scripting", "+ping", "+info", "+time"]


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    server = RedisServer(
        None,
        "--user", "default", "on", "nopass", "~*", "&*", "+@all",
        "--user", "noinfo", "on", f">{PASSWORD}", *BASE_ACL, "-info",
        "--user", "notime", "on", f">{PASSWORD}", *BASE_ACL, "-time",
        "--user", "noscripting", "on", f">{PASSWORD}", *BASE_ACL, "-@scripting",
    )  # fmt: skip
    with server:
        yield server


def test_a_missing_optional_permission_drops_that_reading_only(acl_redis: RedisServer) -> None:
    url = f"redis://noinfo:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    stats = setup(redis_url=url, instance_id="a", set_global=False, flush_interval=None,
                  aggregation_cache_ttl=0)  # fmt: skip
    try:
        for _ in range(10):
            stats.record_hit("R")
        assert stats.flush()
        assert stats.cluster_statistics("R").hit_count == 10
        health = stats.health()
        assert health.status.label == "Degraded", health.reasons
        assert any("+info" in reason for reason in health.reasons)
        assert PASSWORD not in str(health.report_json())
    finally:
        stats.shutdown()


@pytest.mark.parametrize(("user", "allow"), [("notime", "+time"), ("noscripting", "+evalsha")])
def test_a_missing_required_permission_is_named(
    acl_redis: RedisServer, user: str, allow: str
) -> None:
    url = f"redis://{user}:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    stats = setup(redis_url=url, instance_id="a", set_global=False, flush_interval=None,
                  aggregation_cache_ttl=0)  # fmt: skip
    try:
        stats.record_hit("R")
        assert not stats.flush()
        assert stats.exporter is not None and f"allow {allow}" in (stats.exporter.last_error or "")
        health = stats.health()
        assert health.status.label == "Unhealthy"
        assert any(f"allow {allow}" in reason for reason in health.reasons), health.reasons
    finally:
        stats.shutdown()


def slow_collection(stats: CacheStatistics, seconds: float) -> threading.Event:
    """An application's callback on the handle's provider that takes ``seconds`` while the
    returned event is set (longer than the collection's timeout: 2 x ``socket_timeout``)."""
    slow = threading.Event()

    def observe(options: object) -> list[object]:
        if slow.is_set():
            time.sleep(seconds)  # the fault: an application's callback slower than the timeout
        return []

    meter = stats.meter_provider.get_meter("app")
    meter.create_observable_gauge("app.slow", [observe])
    meter.create_observable_gauge("app.next", [lambda options: []])  # the SDK checks here
    return slow


def test_a_collection_that_times_out_at_shutdown_still_deregisters(
    make_stats: MakeStats, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    stats = make_stats("slow-callback", socket_timeout=0.1)  # collections time out at 0.2 s
    slow = slow_collection(stats, 0.3)
    stats.record_hit("R")
    assert stats.flush()
    assert r.zscore("conduit:cache:instances", "slow-callback") is not None
    slow.set()
    with caplog.at_level(logging.WARNING, logger="conduit_otel_cache"):
        stats.shutdown()
    # was: the shutdown thread died with MetricsTimeoutError, and the instance stayed live
    assert r.zscore("conduit:cache:instances", "slow-callback") is None
    assert "final collection of instance slow-callback failed" in caplog.text
    assert stats.cluster_statistics("R").hit_count == 1


def test_main_thread_flushes_whose_collection_times_out_fail_and_log_at_a_bounded_rate(
    make_stats: MakeStats, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's collection raises in the worker of a main-thread flush: each flush returns
    False, and the failure is logged once, not with every flush."""
    stats = make_stats("slow-main", socket_timeout=0.5)
    slow_collection(stats, 1.2).set()
    stats.record_hit("R")
    with caplog.at_level(logging.ERROR, logger="conduit_otel_cache"):
        assert stats.flush() is False
        assert stats.flush() is False
    assert caplog.text.count("a flush of instance slow-main failed (MetricsTimeoutError") == 1


@pytest.mark.xfail(
    strict=True,
    reason="known over-count: the OTel SDK adds an observable counter's measurement that a "
    "timed-out collection took but did not collect to the next one (1 hit published as 3)",
)
def test_a_collection_that_timed_out_over_counts_nothing(make_stats: MakeStats) -> None:
    stats = make_stats("slow-exact", socket_timeout=0.5)
    slow = slow_collection(stats, 1.2)
    slow.set()
    stats.record_hit("R")
    assert stats.flush() is False
    assert stats.flush() is False
    slow.clear()
    assert stats.flush() and stats.cluster_statistics("R").hit_count == 1


EXIT_SCRIPT = """
import sys, time
from conduit_otel_cache import CacheStatistics, setup
stats = setup(redis_url=sys.argv[1], instance_id="leaving", flush_interval=None,
              shutdown_timeout=float(sys.argv[2]), socket_timeout=float(sys.argv[3]))
stats.record_hit("R")
print("recorded", flush=True)
sys.stdin.readline()
print(time.monotonic(), flush=True)
"""


@pytest.mark.usefixtures("private_redis")  # its CLIENT PAUSE outlives the test
def test_exit_with_a_hung_redis_takes_one_shutdown_timeout(redis_url: str, r: redis.Redis) -> None:
    """Or one ``socket_timeout`` where the interpreter starts no thread in ``atexit``
    handlers (Python 3.12.0, 3.12.1): the final flush then runs on the exiting thread."""
    budget, socket_timeout = 1.5, 3.0
    threads_at_exit = not (3, 12, 0) <= sys.version_info[:3] < (3, 12, 2)
    proc = subprocess.Popen(
        [sys.executable, "-c", EXIT_SCRIPT, redis_url, str(budget), str(socket_timeout)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "recorded"
        r.execute_command("CLIENT", "PAUSE", "6000", "ALL")  # longer than the budget
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        leaving = float(proc.stdout.readline())  # interpreter exit (atexit) starts here
        proc.wait(timeout=30)
        elapsed = time.monotonic() - leaving
    finally:
        proc.kill()  # the pause ends by itself (UNPAUSE would wait behind it)
    # was 15.3 s with the defaults (final flush, the SDK's own final collection, deregister);
    # one budget and the interpreter's teardown, never two budgets (2.50 s seen under load 9)
    assert elapsed < (2 * budget if threads_at_exit else socket_timeout + budget), elapsed
    assert threads_at_exit or elapsed > socket_timeout, elapsed  # one write, then gave up


def test_per_thread_bookkeeping_is_bounded_by_live_threads() -> None:
    recorder = Recorder((0.01, 0.1), max_samples=0)

    def one_hit() -> None:
        recorder.record_hit("R", 0.001)

    tracemalloc.start()
    try:
        for _ in range(500):  # warm up: every structure at its working size
            t = threading.Thread(target=one_hit)
            t.start()
            t.join()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50_000):  # a thread per request, nothing reads or flushes
            t = threading.Thread(target=one_hit)
            t.start()
            t.join()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(recorder._threads) < 200  # was 50 000 entries (128.7 MB) until a read
    assert grown < 2_000_000, grown
    assert recorder.snapshot()["R"].hit_count == 50_500


def test_concurrent_flushes_many_threads(make_stats: MakeStats) -> None:
    """32 threads flushing at once: every event counted once."""
    stats = make_stats("api-1", enable_batching=False)
    barrier = threading.Barrier(32)

    def work() -> None:
        barrier.wait()
        for _ in range(20):
            stats.record_hit("R", 0.001)
            stats.flush()

    threads = [threading.Thread(target=work) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.flush()
    assert stats.cluster_statistics("R").hit_count == 640
    assert stats.cluster_statistics("R").response_times.count == 640


values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=1, max_size=20))
def test_the_hot_path_never_raises_and_sums_stay_finite(events: list) -> None:
    recorder = Recorder((0.01, 1.0), max_samples=10)
    for response_time, size in events:
        recorder.record_hit("R", response_time)
        recorder.record_miss("R", response_time)
        recorder.set_size_bytes("R", size)
    stats = recorder.snapshot()["R"]
    assert stats.hit_count == stats.miss_count == len(events)
    assert math.isfinite(stats.response_times.sum)
    assert 0 <= stats.response_times.sum <= 2 * len(events) * MAX_RESPONSE_TIME
    assert 0 <= stats.size_bytes < 2**63


def test_extreme_values_never_poison_a_region(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    stats.record_hit("M", 1e308)  # rejected (above MAX_RESPONSE_TIME), counted as a hit
    stats.record_hit("M", 1e308)
    stats.record_hit("N", 10**400)
    stats.set_size_bytes("M", 10**400)
    assert stats.flush()
    assert stats.cluster_statistics("M").hit_count == 2
    assert stats.cluster_statistics("N").hit_count == 1
    assert stats.rejected_values == 4
    assert math.isfinite(stats.cluster_statistics("M").response_times.sum)

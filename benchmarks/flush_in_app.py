"""The flush inside the application: the CPU one flush takes in the application process, and
how long an application thread waits for the interpreter lock meanwhile, beside the floor
of the design: the OpenTelemetry SDK collecting the same instruments into an
``InMemoryMetricReader``.

``python -m benchmarks.flush_in_app [--quick]``

The probe is a thread that sleeps 1 ms in a loop: how much later than 1 ms it wakes is how
long it waited (for the interpreter lock, or a core). Beside the flush it runs with
pure-Python work of the flush's length in a thread. Redis runs on a core of its own.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conduit_otel_cache import setup
from conduit_otel_cache.background import quietly
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.instruments import SCOPE, register_cache_instruments

from .common import Target, arguments, judged, show

#: the target: a flush costs at most this times the SDK's own collection
CPU_RATIO = 1.5
#: and the probe's p99.9 wait grows by at most this
PROBE_BUDGET_S = 0.001


def _cpu_per_call(*steps: Callable[[], object], calls: int) -> list[float]:
    """Median CPU seconds of each of ``steps``, called in turn ``calls`` times in a thread
    of its own (not the main thread, as the flush runs in the application: the reader's
    thread). Taken in turn, a slower or busier spell of the machine falls on all of them
    alike, and their ratio stays."""
    times: list[list[float]] = [[] for _ in steps]

    def loop() -> None:
        for _ in range(calls):
            for step, spent in zip(steps, times):
                start = time.thread_time()
                step()
                spent.append(time.thread_time() - start)

    worker = threading.Thread(target=loop)
    worker.start()
    worker.join()
    return [statistics.median(spent) for spent in times]


class Probe:
    """A thread that sleeps 1 ms in a loop and keeps how late it woke."""

    def __init__(self) -> None:
        self.lateness: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            time.sleep(0.001)
            self.lateness.append(time.perf_counter() - start - 0.001)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def p999(self) -> float:
        ordered = sorted(self.lateness)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.999))]


def _split(stats: Any, flush: Callable[[], object], calls: int) -> tuple[float, float, float]:
    """Median CPU seconds of a flush's three parts: the SDK's collection, our encoding (the
    export less its Redis call) and the Redis call (client side, one round trip)."""
    exporter, parts = stats.exporter, {"export": [], "redis": []}

    def timed(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                parts[name].append(time.thread_time() - start)

        return run

    exporter.export = timed("export", exporter.export)
    exporter.store.flush = timed("redis", exporter.store.flush)
    (total,) = _cpu_per_call(flush, calls=calls)
    export, redis_call = (statistics.median(parts[n]) for n in ("export", "redis"))
    return total - export, export - redis_call, redis_call


def _busy_like(seconds: float) -> Callable[[], None]:
    """Pure-Python work of ``seconds`` in a thread, run as the flush runs (quietly): what
    any work of the flush's length inside the application costs the probe."""

    def work() -> None:
        with quietly():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

    return lambda: threading.Thread(target=work).start()


@contextmanager
def _apart(redis: RedisServer) -> Iterator[None]:
    """Redis on one core, this thread and the threads it starts (the application's: the
    flushes, the probe) on another, as in production Redis runs elsewhere and as the
    end-to-end run pins the service and wrk: else the probe also waits behind Redis
    running the write on the application's core."""
    pinnable = hasattr(os, "sched_setaffinity") and redis.process is not None
    if not pinnable or len(os.sched_getaffinity(0)) < 2:
        yield
        return
    assert redis.process is not None
    before = os.sched_getaffinity(0)
    app, server = sorted(before)[:2]
    os.sched_setaffinity(redis.process.pid, {server})
    os.sched_setaffinity(0, {app})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _probe(seconds: float, work: Callable[[], object] | None, every: float) -> Probe:
    with Probe() as probe:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if work is not None:
                work()
            time.sleep(every)
    return probe


def run(quick: bool = False) -> list[Target]:
    calls, probe_s = (20, 2.0) if quick else (200, 10.0)
    rows, ratios = [], []
    with RedisServer() as server, _apart(server):
        for regions in (10, 100):
            for changed in sorted({10, regions}):
                stats = setup(
                    redis_url=server.url, instance_id=f"app-{regions}-{changed}",
                    set_global=False, flush_interval=None, max_regions=regions,
                )  # fmt: skip
                names = [f"r{i}" for i in range(regions)]
                for name in names:
                    stats.record_hit(name, 0.001)
                stats.flush()  # every region whole once; then only the changed ones

                def flush(stats=stats, names=names, changed=changed) -> None:
                    for name in names[:changed]:
                        stats.record_hit(name, 0.001)
                        stats.record_miss(name, 0.002)
                    stats.flush()

                reader = InMemoryMetricReader()
                provider = MeterProvider(metric_readers=[reader])
                register_cache_instruments(provider.get_meter(SCOPE), stats.recorder.snapshot)
                ours, floor = _cpu_per_call(flush, reader.get_metrics_data, calls=calls)
                if (regions, changed) == (100, 10):
                    split = _split(stats, flush, calls)
                flush_s = ours  # the last: 100 regions, all changed, as the probe's flushes
                provider.shutdown()
                stats.shutdown()
                ratios.append(ours / floor)
                rows.append([f"{regions} regions, {changed} changed", f"{ours * 1e6:,.0f}",
                             f"{floor * 1e6:,.0f}", f"{ours / floor:.2f}x"])  # fmt: skip
        show("Flush inside the application: CPU us per flush (median, the flushing thread)",
             ["case", "conduit flush", "SDK collection alone", "ratio"], rows)  # fmt: skip
        show("Where a flush's CPU goes (100 regions, 10 changed): us, median",
             ["the SDK's collection", "our encoding", "the Redis call (client side)"],
             [[f"{part * 1e6:,.0f}" for part in split]])  # fmt: skip
        # the probe: without the library, then with a flush of 100 regions every 100 ms, and
        # pure-Python work as long as that flush, run the same way
        quiet = _probe(probe_s, None, 0.1)
        stats = setup(redis_url=server.url, instance_id="app-probe", set_global=False,
                      flush_interval=None, max_regions=100)  # fmt: skip
        names = [f"r{i}" for i in range(100)]

        def busy() -> None:
            for name in names:
                stats.record_hit(name, 0.001)
            threading.Thread(target=stats.flush).start()  # as the reader's thread does

        loud = _probe(probe_s, busy, 0.1)
        stats.shutdown()
        like = _probe(probe_s, _busy_like(flush_s), 0.1)
    show("Probe thread (sleeps 1 ms in a loop): how late it woke, ms",
         ["case", "p50", "p99.9", "max"],
         [[name, f"{statistics.median(p.lateness) * 1000:.3f}", f"{p.p999() * 1000:.3f}",
           f"{max(p.lateness) * 1000:.3f}"]
          for name, p in (("no library", quiet), ("100-region flush every 100 ms", loud),
                          (f"pure-Python work of {flush_s * 1000:.1f} ms every 100 ms", like))],
    )  # fmt: skip
    grew = loud.p999() - quiet.p999()
    return judged(
        "Flush-in-application targets",
        [Target(f"CPU per flush at most {CPU_RATIO}x the SDK's collection",
                max(ratios) <= CPU_RATIO, ", ".join(f"{r:.2f}x" for r in ratios)),
         Target("probe p99.9 wait grows by at most 1 ms with flushes running",
                grew <= PROBE_BUDGET_S, f"{grew * 1000:+.3f} ms")],
        quick,
    )  # fmt: skip


if __name__ == "__main__":
    run(quick=arguments(__doc__ or "").quick)

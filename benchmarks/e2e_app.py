"""The service of ``benchmarks.end_to_end``: a WSGI app whose every request looks a key up in
an in-process cache of one of 100 regions (Zipf-like), counts a hit or a miss (a miss
stores the value) with its response time. ``E2E_VARIANT`` says how it is instrumented:
``none``, ``deps`` (none, but the library's dependencies imported: redis-py and the OTel
SDK), ``bare`` (those imports and the least any recording does), ``conduit`` (defaults),
``conduit-1s`` (``flush_interval`` 1 s), ``prom-mp`` (prometheus_client multiprocess mode)
or ``otel`` (the OTel SDK with a ``PrometheusMetricReader`` in each process)."""

from __future__ import annotations

import os
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any

REGIONS = [f"region-{i}" for i in range(100)]
WEIGHTS = [1 / (i + 1) for i in range(100)]  # Zipf-like: region i with weight 1/(i+1)
KEYS = 1000
VARIANT = os.environ.get("E2E_VARIANT", "none")

Record = Callable[[str, bool, float], None]


def _recorder() -> Record:
    if VARIANT.startswith("conduit"):
        from conduit_otel_cache import setup

        options: dict[str, Any] = {"flush_interval": 1.0} if VARIANT == "conduit-1s" else {}
        stats = setup(redis_url=os.environ["E2E_REDIS_URL"], **options)

        def conduit(region: str, hit: bool, seconds: float) -> None:
            if hit:
                stats.record_hit(region, seconds)
            else:
                stats.record_miss(region, seconds)

        return conduit
    if VARIANT == "prom-mp":
        from prometheus_client import Counter, Histogram

        hits = Counter("cache_hits", "hits", ["region"])
        misses = Counter("cache_misses", "misses", ["region"])
        times = Histogram("cache_response_time_seconds", "response time", ["region"])

        def prom(region: str, hit: bool, seconds: float) -> None:
            (hits if hit else misses).labels(region).inc()
            times.labels(region).observe(seconds)

        return prom
    if VARIANT == "otel":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider

        meter = MeterProvider(metric_readers=[PrometheusMetricReader()]).get_meter("e2e")
        hit_counter = meter.create_counter("cache.hits")
        miss_counter = meter.create_counter("cache.misses")
        histogram = meter.create_histogram("cache.response_time", unit="s")

        def otel(region: str, hit: bool, seconds: float) -> None:
            attributes = {"region": region}
            (hit_counter if hit else miss_counter).add(1, attributes)
            histogram.record(seconds, attributes)

        return otel
    if VARIANT in ("deps", "bare"):  # what importing them costs a process, whatever uses them
        import opentelemetry.sdk.metrics  # noqa: F401
        import redis  # noqa: F401
    if VARIANT == "bare":
        return _bare()
    return lambda region, hit, seconds: None


def _bare() -> Record:
    """The least any recording of these events does, exact under threads or not: a count per
    region and outcome in a dict, and the response time in the region's array (emptied when
    it fills, as a flush would take it)."""
    hits: dict[str, int] = dict.fromkeys(REGIONS, 0)
    misses: dict[str, int] = dict.fromkeys(REGIONS, 0)
    times = {region: array("d") for region in REGIONS}

    def bare(region: str, hit: bool, seconds: float) -> None:
        counts = hits if hit else misses
        counts[region] += 1
        kept = times[region]
        kept.append(seconds)
        if len(kept) >= 4096:
            del kept[:]

    return bare


record = _recorder()
caches: dict[str, dict[int, bytes]] = {region: {} for region in REGIONS}
_choose = random.Random(os.getpid()).choices


def _threads() -> bytes:
    """``pid``, then ``name cpu_seconds`` of every thread of this worker (``/proc``): where
    the worker's CPU went, the library's own threads apart from the request threads. A task
    that is no Python thread of ``threading`` (the main thread of a forked worker, whose
    ``native_id`` is still its parent's) is ``main``."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    lines = [str(os.getpid())]
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stat:
                on_cpu_ns = int(stat.read().split()[0])  # time on a CPU, in ns
        except OSError:
            continue
        lines.append(f"{names.get(int(task), 'main')} {on_cpu_ns / 1e9}")
    return "\n".join(lines).encode()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/-/threads":
        body = _threads()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    start = time.perf_counter()
    region = _choose(REGIONS, WEIGHTS)[0]
    key = _choose(range(KEYS))[0]
    cache = caches[region]
    value = cache.get(key)
    hit = value is not None
    if not hit:  # a bounded cache: about 80 % of lookups hit once it is warm
        if len(cache) >= KEYS * 4 // 5:
            cache.popitem()
        value = cache[key] = b"x" * 64
    record(region, hit, time.perf_counter() - start)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "64")])
    return [value]  # type: ignore[list-item]

"""What the application pays, end to end: the same WSGI service under gunicorn (2 ``gthread``
workers of 4 threads, pinned to one core), loaded by ``wrk`` (pinned to the other core), in
five variants.

- *One after another*, rounds interleaved, with no instrumentation once more in each round
  (A/A): requests per second and latency percentiles. Here two runs of the same service
  differ by up to 20 %, as much as what is measured.
- *Side by side*: each variant and the uninstrumented service at once on the same core, a
  ``wrk`` each; what the machine does meanwhile weighs on both alike. The ratio of their CPU
  per request (whose inverse is the throughput of a saturated core) judges the throughput
  target, the difference of their p99 latencies the p99 target. Each is the median of the
  windows, judged with its 95 % interval: met when all of it is within the target, missed
  when all of it is beyond, else not settled (run one after another, conduit's overhead
  moved by ±0.5 % and its p99 by ±0.6 ms between runs; side by side a window's p99
  difference moves by ±2 ms). The uninstrumented service beside itself is the A/A. Here
  each service has one
  ``gthread`` worker of 4 threads: with two, how ``wrk``'s 8 connections split between the
  workers (anew at each start of ``wrk``) moved a measurement's CPU per request by more than
  the library costs. A pair of services is measured in several windows, and the median of
  every window is the figure. Two pairs of the same services differ by more than two windows
  of one pair (the processes' memory, where the kernel puts them; with 32 windows of 2 pairs
  the interval of conduit's cost was ±0.2 % where runs differed by half a point): the pairs
  the targets judge (the A/A and conduit's defaults) are measured in :data:`JUDGED_PAIRS`
  pairs of services, and judged from the median of the pairs' medians with its interval
  over the pairs.

Side by side there are two floors as well, what any library that writes with redis-py and
records with the OTel SDK costs at the least: the uninstrumented service with the two
imported (``deps``), and with them imported and each event recorded the cheapest way there
is, a count in a dict and the response time in an array (``bare``).

The workers report their threads' CPU (``/-/threads``): the CPU per request served, and what
the library's own threads (the flush, the heartbeat) take.

``python -m benchmarks.end_to_end [--quick]``

The service (``benchmarks/e2e_app.py``) does one in-process cache lookup per request in one
of 100 regions (Zipf-like) and records a hit or a miss with its response time.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from conduit_otel_cache.embedded import RedisServer, free_port

from .common import Target, arguments, judged, show

HERE = Path(__file__).resolve().parent
VARIANTS = ["none", "conduit", "conduit-1s", "prom-mp", "otel", "none-again"]
#: each beside the uninstrumented service at the same moment ("none": A/A)
PAIRED = ["none", "deps", "bare", "conduit", "conduit-1s", "prom-mp", "otel"]
LABELS = {
    "none": "no instrumentation",
    "none-again": "no instrumentation, again (A/A)",
    "deps": "no instrumentation, redis-py and the OTel SDK imported",
    "bare": "redis-py and the OTel SDK imported, a count in a dict, the time in an array",
    "conduit": "conduit, defaults",
    "conduit-1s": "conduit, flush_interval 1 s",
    "prom-mp": "prometheus_client multiprocess",
    "otel": "OTel SDK + PrometheusMetricReader",
}
#: the pairs the targets judge: the A/A and conduit's defaults
JUDGED = ("none", "conduit")
#: the pairs of services each of them is measured in (the others: 2)
JUDGED_PAIRS = 8
#: prints the percentiles wrk does not print by default
WRK_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format("E2E %d %f %d %d %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""


def _pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() else []


@contextlib.contextmanager
def _service(variant: str, redis_url: str, tmp: Path, workers: int = 2) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "E2E_VARIANT": variant, "E2E_REDIS_URL": redis_url,
           "PYTHONPATH": str(HERE.parent)}  # fmt: skip
    env = {k: v for k, v in env.items() if not k.startswith("CONDUIT_CACHE_STATS_")}
    if variant == "prom-mp":
        directory = tmp / "prom"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    argv = [*_pinned(0), sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", str(workers),
            "--threads", "4", "-b", f"127.0.0.1:{port}",
            "benchmarks.e2e_app:application"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{variant}: gunicorn did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _wrk_start(url: str, seconds: int, script: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_pinned(1), "wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(script), url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wrk_result(proc: subprocess.Popen[str]) -> tuple[float, float, float, float, int]:
    """req/s, p50, p99, p99.9 (ms), requests."""
    out = proc.communicate()[0]
    match = re.search(r"^E2E (\d+) ([\d.]+) (\d+) (\d+) (\d+)$", out, re.M)
    if proc.returncode or match is None:
        raise RuntimeError(f"no summary from wrk:\n{out}")
    requests, duration, p50, p99, p999 = match.groups()
    return (int(requests) / float(duration), int(p50) / 1000, int(p99) / 1000,
            int(p999) / 1000, int(requests))  # fmt: skip


def _wrk(url: str, seconds: int, script: Path) -> tuple[float, float, float, float, int]:
    return _wrk_result(_wrk_start(url, seconds, script))


def _side_by_side(variant: str, redis_url: str, tmp: Path, script: Path, seconds: int,
                  windows: int, none_first: bool) -> list[tuple[float, float]]:  # fmt: skip
    """The CPU per request of ``variant`` over that of the uninstrumented service, and its p99
    latency less theirs (ms), in each of ``windows`` measurements: both on one core (one
    worker each) and loaded at the same moment (by two ``wrk`` on the other core), so that
    what the machine does meanwhile weighs on both alike."""
    order = ["none", variant] if none_first else [variant, "none"]
    ratios = []
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(_service(v, redis_url, tmp, workers=1)) for v in order]
        for url in urls:
            _wrk(url, 1, script)  # warm-up
        for _ in range(windows):
            before = [_threads(url, 1) for url in urls]
            loads = [_wrk_start(url, seconds, script) for url in urls]
            done = [_wrk_result(load) for load in loads][:: 1 if none_first else -1]
            cpu = [_library_share(b, _threads(url, 1))[1] for b, url in zip(before, urls)]
            none, other = [c / d[4] for c, d in zip(cpu[:: 1 if none_first else -1], done)]
            ratios.append((other / none, done[1][2] - done[0][2]))
    return ratios


#: the library's own threads in a worker (by name): the SDK's periodic reader, which
#: flushes, and conduit's heartbeat (and any other ``conduit-*``)
LIBRARY_THREADS = ("OtelPeriodicExportingMetricReader", "conduit-")

Threads = dict[str, dict[str, float]]


def _threads(url: str, workers: int = 2) -> Threads:
    """``{worker pid: {thread name: CPU seconds}}`` of every worker (asked until each
    answered: each request goes to whichever worker accepts it)."""
    seen: Threads = {}
    for _ in range(200):
        with urllib.request.urlopen(url + "-/threads", timeout=5) as reply:
            pid, *lines = reply.read().decode().splitlines()
        cpu: dict[str, float] = {}
        for line in lines:
            name, _, seconds = line.rpartition(" ")
            cpu[name] = cpu.get(name, 0.0) + float(seconds)
        seen[pid] = cpu
        if len(seen) == workers:
            break
    return seen


def _library_share(before: Threads, after: Threads) -> tuple[float, float]:
    """CPU seconds of the library's threads and of every thread, between two readings."""
    library = total = 0.0
    for pid, cpu in after.items():
        for name, seconds in cpu.items():
            spent = seconds - before.get(pid, {}).get(name, 0.0)
            total += spent
            if name.startswith(LIBRARY_THREADS):
                library += spent
    return library, total


def run(quick: bool = False) -> list[Target]:
    if not shutil.which("wrk"):
        show("End to end: gunicorn gthread 2x4 under wrk", ["variant"], [["wrk not installed"]])
        return [Target("end-to-end overhead", None, "wrk not installed (apt-get install wrk)")]
    seconds, rounds = (3, 1) if quick else (12, 3)
    # side by side: pairs of services, each measured in windows
    pair_seconds, pairs, windows = (2, 1, 2) if quick else (3, 2, 8)
    judged_pairs = pairs if quick else JUDGED_PAIRS
    paired = ["none", "bare", "conduit"] if quick else PAIRED
    results: dict[str, list[tuple[float, float, float, float, int]]] = {v: [] for v in VARIANTS}
    spent: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    # per variant, per pair of services: each window's (CPU ratio, p99 ms beyond)
    by_pair: dict[str, list[list[tuple[float, float]]]] = {v: [] for v in paired}
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        script = tmp / "summary.lua"
        script.write_text(WRK_SCRIPT)
        for _ in range(rounds):
            for variant in VARIANTS:
                with _service(variant, server.url, tmp) as url:
                    _wrk(url, 1, script)  # warm-up: caches filled, every region seen
                    before = _threads(url)
                    results[variant].append(_wrk(url, seconds, script))
                    library, total = _library_share(before, _threads(url))
                    spent[variant].append((library, total, seconds))
        # side by side: each variant beside the uninstrumented service (which goes first in
        # every other round)
        for n in range(judged_pairs):
            for variant in paired:
                if n < pairs or variant in JUDGED:
                    by_pair[variant].append(_side_by_side(
                        variant, server.url, tmp, script, pair_seconds, windows, n % 2 == 0
                    ))  # fmt: skip
    ratios = {v: [w for pair in ps for w in pair] for v, ps in by_pair.items()}
    median = {v: tuple(statistics.median(r[i] for r in rs) for i in range(4))
              for v, rs in results.items()}  # fmt: skip
    # the workers' CPU (every thread, /proc schedstat) per request served: on a saturated
    # core, throughput is its inverse
    per_request = {v: statistics.median(s[1] / r[4] * 1e6 for s, r in zip(spent[v], results[v]))
                   for v in VARIANTS}  # fmt: skip
    busy = {v: sum(s[1] for s in spent[v]) / sum(s[2] for s in spent[v]) for v in VARIANTS}
    base_rps, _, base_p99, _ = median["none"]
    rows = []
    for variant in VARIANTS:
        rps, p50, p99, p999 = median[variant]
        low, high = min(r[0] for r in results[variant]), max(r[0] for r in results[variant])
        rows.append([LABELS[variant], f"{rps:,.0f} ({low:,.0f}-{high:,.0f})",
                     f"{(rps / base_rps - 1) * 100:+.1f} %", f"{per_request[variant]:.1f}",
                     f"{(per_request[variant] / per_request['none'] - 1) * 100:+.1f} %",
                     f"{busy[variant]:.2f}", f"{p50:.2f}", f"{p99:.2f}",
                     f"{p99 - base_p99:+.2f}", f"{p999:.2f}"])  # fmt: skip
    show(f"End to end: gunicorn gthread 2x4 on one core, wrk -t1 -c8 on the other "
         f"({rounds} rounds of {seconds} s, median)",
         ["variant", "req/s", "throughput", "workers' CPU µs per request", "vs none",
          "workers' CPU s per s", "p50 ms", "p99 ms", "p99 vs none", "p99.9 ms"],
         rows)  # fmt: skip
    shares, where = {}, []
    for variant in ("conduit", "conduit-1s"):
        library, total, wall = (sum(r[i] for r in spent[variant]) for i in range(3))
        shares[variant] = library / total if total else 0.0
        where.append([LABELS[variant], f"{library / wall * 1000:.2f}", f"{total / wall:.2f}",
                      f"{shares[variant] * 100:.2f} %"])  # fmt: skip
    show("End to end: the library's own threads (the flush, the heartbeat) in the workers",
         ["variant", "their CPU ms per s", "the workers' CPU s per s", "share"], where)  # fmt: skip
    ratio = {v: statistics.median(r for r, _ in rs) for v, rs in ratios.items()}
    later = {v: [d for _, d in rs] for v, rs in ratios.items()}  # p99 ms beyond the other's
    show(f"End to end, side by side: each variant and the uninstrumented service (one gthread "
         f"worker of 4 threads each) on one core at once, a wrk -t1 -c8 each on the other "
         f"({pairs} pairs of services x {windows} windows of {pair_seconds} s; the A/A and "
         f"conduit, defaults, which the targets judge: {judged_pairs} pairs)",
         ["variant", "workers' CPU per request ÷ uninstrumented, median (range)",
          "throughput of a saturated core", "p99 ms beyond the uninstrumented, median (range)"],
         [[LABELS[v] + (" (A/A)" if v == "none" else ""),
           f"{ratio[v]:.3f} ({min(r for r, _ in ratios[v]):.3f}-"
           f"{max(r for r, _ in ratios[v]):.3f})",
           f"{(1 / ratio[v] - 1) * 100:+.1f} %",
           f"{statistics.median(later[v]):+.2f} ({min(later[v]):+.2f} to {max(later[v]):+.2f})"]
          for v in paired])  # fmt: skip
    # the throughput a saturated core loses to the extra CPU per request
    cost = {v: 1 - 1 / ratio[v] for v in paired}
    noise = abs(cost.pop("none"))
    # the floors of any library that writes with redis-py and records with the OTel SDK: a
    # process that imports them and does nothing else with them, and one that also records
    # each event the cheapest way there is
    beyond = "".join(
        f"; {what} {cost.pop(v) * 100:.1f} %, conduit beyond that "
        f"{(1 - ratio[v] / ratio['conduit']) * 100:.1f} %"
        for v, what in (("deps", "importing redis-py and the OTel SDK alone"),
                        ("bare", "those imports and the cheapest recording of each event"))
        if v in cost)  # fmt: skip
    overhead = {v: 1 - median[v][0] / base_rps for v in VARIANTS if v != "none"}
    seq_noise = abs(overhead.pop("none-again"))
    lightest = all(cost["conduit"] <= o for v, o in cost.items() if v in ("prom-mp", "otel"))
    # the p99 side by side: each pair's median of its windows' differences; the median of
    # the pairs judged with its 95 % interval (a window's p99 moves by ±2 ms, and pairs of
    # the same services differ: the A/A's median alone is no noise figure)
    p99_cost, p99_half = _pairs_interval(by_pair["conduit"], lambda _, d: d)
    p99_aa, p99_aa_half = _pairs_interval(by_pair["none"], lambda _, d: d)
    p99_alone = median["conduit"][2] - base_p99
    # the throughput likewise: the pairs' median costs, their median judged with its interval
    tp_cost, tp_half = _pairs_interval(by_pair["conduit"], lambda r, _: 1 - 1 / r)
    tp_aa, tp_aa_half = _pairs_interval(by_pair["none"], lambda r, _: 1 - 1 / r)
    return judged(
        "End-to-end targets",
        [Target("conduit: the lowest overhead of the instrumented peers", lightest,
                "side by side: " + ", ".join(f"{LABELS[v]} {o * 100:.1f} %"
                                             for v, o in cost.items())),
         Target("conduit (defaults): at most 2 % of throughput",
                _within(tp_cost, tp_half, 0.02),
                f"{tp_cost * 100:.1f} ± {tp_half * 100:.1f} % side by side (median of "
                f"{len(by_pair['conduit'])} pairs' medians, 95 % interval; A/A "
                f"{tp_aa * 100:+.1f} ± {tp_aa_half * 100:.1f} %, median of its windows "
                f"{noise * 100:.1f} %); alone "
                f"{overhead['conduit'] * 100:.1f} % (A/A {seq_noise * 100:.1f} %); the "
                f"library's threads {shares['conduit'] * 100:.2f} % of the workers' CPU"
                f"{beyond}"),
         Target("conduit (defaults): at most +0.2 ms at p99",
                _within(p99_cost, p99_half, 0.2),
                f"{p99_cost:+.2f} ± {p99_half:.2f} ms side by side (median of "
                f"{len(by_pair['conduit'])} pairs' medians, 95 % interval; A/A "
                f"{p99_aa:+.2f} ± {p99_aa_half:.2f} ms); alone "
                f"{p99_alone:+.2f} ms (A/A {abs(median['none-again'][2] - base_p99):.2f} ms)")],
        quick,
    )  # fmt: skip


def _median_interval(values: list[float]) -> tuple[float, float]:
    """The median and the half-width of its 95 % interval (a notched box plot's notch:
    1.58 x the interquartile range / sqrt(n))."""
    if len(values) < 2:
        return statistics.median(values), math.inf
    low, _, high = statistics.quantiles(values, n=4)
    return statistics.median(values), 1.58 * (high - low) / math.sqrt(len(values))


def _pairs_interval(
    pairs: list[list[tuple[float, float]]], of: Callable[[float, float], float]
) -> tuple[float, float]:
    """:func:`_median_interval` of the pairs' medians of ``of(ratio, p99 difference)`` over
    their windows."""
    return _median_interval([statistics.median(of(*w) for w in pair) for pair in pairs])


def _within(cost: float, half: float, limit: float) -> bool | None:
    """Met when the whole interval ``cost ± half`` is within ``limit``, missed when it is all
    beyond, else not settled (None): a median alone is one draw of the noise."""
    return True if cost + half <= limit else (False if cost - half > limit else None)


if __name__ == "__main__":
    run(quick=arguments(__doc__ or "").quick)

"""What the application pays, end to end: the same WSGI service under gunicorn (2 ``gthread``
workers of 4 threads, pinned to one core), loaded by ``wrk`` (pinned to the other core), in
five variants measured in the same run, rounds interleaved, and no instrumentation once more
in each round (A/A: how far two runs of the same service differ here, the noise a verdict
must clear). In the conduit variants the workers report their threads' CPU
(``/-/threads``): what the library's own threads (the flush, the heartbeat) take.

``python -m benchmarks.end_to_end [--quick]``

The service (``benchmarks/e2e_app.py``) does one in-process cache lookup per request in one
of 100 regions (Zipf-like) and records a hit or a miss with its response time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conduit_otel_cache.embedded import RedisServer, free_port

from .common import Target, arguments, judged, show

HERE = Path(__file__).resolve().parent
VARIANTS = ["none", "conduit", "conduit-1s", "prom-mp", "otel", "none-again"]
LABELS = {
    "none": "no instrumentation",
    "none-again": "no instrumentation, again (A/A)",
    "conduit": "conduit, defaults",
    "conduit-1s": "conduit, flush_interval 1 s",
    "prom-mp": "prometheus_client multiprocess",
    "otel": "OTel SDK + PrometheusMetricReader",
}
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
def _service(variant: str, redis_url: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "E2E_VARIANT": variant, "E2E_REDIS_URL": redis_url,
           "PYTHONPATH": str(HERE.parent)}  # fmt: skip
    env = {k: v for k, v in env.items() if not k.startswith("CONDUIT_CACHE_STATS_")}
    if variant == "prom-mp":
        directory = tmp / "prom"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    argv = [*_pinned(0), sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "2",
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


def _wrk(url: str, seconds: int, script: Path) -> tuple[float, float, float, float]:
    """req/s, p50, p99, p99.9 (ms)."""
    out = subprocess.run(
        [*_pinned(1), "wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"^E2E (\d+) ([\d.]+) (\d+) (\d+) (\d+)$", out, re.M)
    if match is None:
        raise RuntimeError(f"no summary from wrk:\n{out}")
    requests, duration, p50, p99, p999 = match.groups()
    return (int(requests) / float(duration), int(p50) / 1000, int(p99) / 1000,
            int(p999) / 1000)  # fmt: skip


#: the library's own threads in a worker (by name): the SDK's periodic reader, which
#: flushes, and conduit's heartbeat (and any other ``conduit-*``)
LIBRARY_THREADS = ("OtelPeriodicExportingMetricReader", "conduit-")

Threads = dict[str, dict[str, float]]


def _threads(url: str) -> Threads:
    """``{worker pid: {thread name: CPU seconds}}`` of both workers (asked until both
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
        if len(seen) == 2:
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
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in VARIANTS}
    spent: dict[str, list[tuple[float, float, float]]] = {"conduit": [], "conduit-1s": []}
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        script = tmp / "summary.lua"
        script.write_text(WRK_SCRIPT)
        for _ in range(rounds):
            for variant in VARIANTS:
                with _service(variant, server.url, tmp) as url:
                    _wrk(url, 1, script)  # warm-up: caches filled, every region seen
                    before = _threads(url) if variant in spent else {}
                    results[variant].append(_wrk(url, seconds, script))
                    if variant in spent:
                        library, total = _library_share(before, _threads(url))
                        spent[variant].append((library, total, seconds))
    median = {v: tuple(statistics.median(r[i] for r in rs) for i in range(4))
              for v, rs in results.items()}  # fmt: skip
    base_rps, _, base_p99, _ = median["none"]
    rows = []
    for variant in VARIANTS:
        rps, p50, p99, p999 = median[variant]
        low, high = min(r[0] for r in results[variant]), max(r[0] for r in results[variant])
        rows.append([LABELS[variant], f"{rps:,.0f} ({low:,.0f}-{high:,.0f})",
                     f"{(rps / base_rps - 1) * 100:+.1f} %", f"{p50:.2f}", f"{p99:.2f}",
                     f"{p99 - base_p99:+.2f}", f"{p999:.2f}"])  # fmt: skip
    show(f"End to end: gunicorn gthread 2x4 on one core, wrk -t1 -c8 on the other "
         f"({rounds} rounds of {seconds} s, median)",
         ["variant", "req/s", "throughput", "p50 ms", "p99 ms", "p99 vs none", "p99.9 ms"],
         rows)  # fmt: skip
    shares, where = {}, []
    for variant, runs in spent.items():
        library, total, wall = (sum(r[i] for r in runs) for i in range(3))
        shares[variant] = library / total if total else 0.0
        where.append([LABELS[variant], f"{library / wall * 1000:.2f}", f"{total / wall:.2f}",
                      f"{shares[variant] * 100:.2f} %"])  # fmt: skip
    show("End to end: the library's own threads (the flush, the heartbeat) in the workers",
         ["variant", "their CPU ms per s", "the workers' CPU s per s", "share"], where)  # fmt: skip
    overhead = {v: 1 - median[v][0] / base_rps for v in VARIANTS if v != "none"}
    noise = abs(overhead.pop("none-again"))
    ours = overhead["conduit"]
    lightest = ours <= min(overhead[v] for v in ("prom-mp", "otel"))
    p99_cost = median["conduit"][2] - base_p99
    p99_noise = abs(median["none-again"][2] - base_p99)
    return judged(
        "End-to-end targets",
        [Target("conduit: the lowest overhead of the instrumented peers", lightest,
                ", ".join(f"{LABELS[v]} {o * 100:.1f} %" for v, o in overhead.items())),
         Target("conduit (defaults): at most 2 % of throughput", _beyond_noise(ours, 0.02, noise),
                f"{ours * 100:.1f} %; A/A noise {noise * 100:.1f} %; the library's threads "
                f"{shares['conduit'] * 100:.2f} % of the workers' CPU"),
         Target("conduit (defaults): at most +0.2 ms at p99",
                _beyond_noise(p99_cost, 0.2, p99_noise),
                f"{p99_cost:+.2f} ms; A/A noise {p99_noise:.2f} ms")],
        quick,
    )  # fmt: skip


if __name__ == "__main__":
    run(quick=arguments(__doc__ or "").quick)


def _beyond_noise(cost: float, limit: float, noise: float) -> bool | None:
    """A cost smaller than the A/A difference is not a measurement: met within ``limit``,
    missed beyond ``limit`` and the noise, else not judged (None)."""
    return True if cost <= limit else (None if cost <= limit + noise else False)

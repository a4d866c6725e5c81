"""``GET /metrics`` of ``serve`` at cluster scale over real HTTP, the new way (finished bytes,
rendered in the background once per ``aggregation_cache_ttl``) beside the old way
(collected and rendered on demand, for every scrape) in the same run; and the peer,
prometheus_client's multiprocess mode, at the same sizes.

``python -m benchmarks.scrape [--quick]``

Each ``serve`` runs in its own process (``ExporterService`` with its render process, as
``serve`` runs; default ``aggregation_cache_ttl`` 5 s; the old way sets
``renderings.prerender = False``) against one redis-server holding the cluster (written as in
``benchmarks.scale``). Figures: p50 / p99 of ``GET /metrics`` with 4 clients scraping
together every 0.1 s (text, OpenMetrics, gzip, and the headers Prometheus sends); the data
age each answer reports (``X-Conduit-Data-Age``); CPU seconds per minute and RSS of the
``serve`` process and its render process while two scrapers each scrape every 15 s as
Prometheus replicas do (a shortened run, scaled to a minute); and ``MultiProcessCollector``
(100 and 1000 process files, each holding the series of one instance) beside our scrape.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conduit_otel_cache.config import DEFAULT_BUCKETS, Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.store import Store

from .common import Target, fmt_ms, judged, ratio, settings, show
from .scale import populate, region_name

ROOT = Path(__file__).resolve().parent.parent
DATA_AGE_HEADER = "X-Conduit-Data-Age"
TTL = Settings().aggregation_cache_ttl
CLIENTS = 4
PACE = 0.1  # seconds between the scrapes of one client; the clients scrape at the same instants
TARGET_S = 0.010
#: seconds between per-instance passes (drift, per-instance ratios) in the runs that judge
#: the targets (none during them), and in the run that measures scrapes beside the pass
#: (12 times as often as the default aggregation_interval, 60 s)
QUIET = 3600.0
PASS_EVERY = 5.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
#: what Prometheus 2.x sends when it scrapes
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
VARIANTS: dict[str, dict[str, str]] = {
    "text": {},
    "OpenMetrics": {"Accept": OPENMETRICS},
    "text, gzip": {"Accept-Encoding": "gzip"},
    "as Prometheus asks (OpenMetrics, gzip)": PROMETHEUS_HEADERS,
}
PROMETHEUS = "as Prometheus asks (OpenMetrics, gzip)"
MODES = {"new": "new: finished bytes", "old": "old: rendered on demand"}
#: the new way without refreshes during the run (TTL 1 h): the HTTP floor of this machine now
FLOOR = "floor: same bytes, no refresh"


# -- the serve process ------------------------------------------------------------------


def serve_child(url: str, mode: str, ttl: float, every: float = QUIET) -> None:
    """Run in a subprocess: ``serve`` for ``url`` with the per-instance pass ``every``
    seconds; prints its port once the pass ran, serves until stdin closes, then prints its
    refresh figures."""
    from conduit_otel_cache.serve.service import ExporterService

    s = settings(
        redis_url=url,
        aggregation_cache_ttl=ttl,
        aggregation_interval=every,
        cleanup_interval=3600,
        instance_timeout=3600,
        retention_period=7200,
    )
    svc = ExporterService(s, port=0, render_process=True)  # as serve runs
    if mode == "old":
        svc.exposition.renderings.prerender = False
    svc.start(freeze=True)  # as serve does
    deadline = time.monotonic() + 300
    while not svc.aggregator.view().instance_series and time.monotonic() < deadline:
        time.sleep(0.05)
        svc.aggregator.invalidate()
    if svc.render_process is not None:  # measured once started: before, it renders here
        svc.render_process.wait_ready(60)
    print(json.dumps({"port": svc.port}), flush=True)
    sys.stdin.read()
    exporter = svc.exposition.renderings
    child = svc.render_process
    print(
        json.dumps(
            {
                "refresh_max": exporter.refresh_seconds_max,
                "refreshes": exporter.refreshes,
                "child_renderings": child.renderings if child else 0,
                "child_failures": child.failures if child else 0,
            }
        ),
        flush=True,
    )
    svc.stop()


class Serve:
    """A ``serve`` subprocess (see :func:`serve_child`)."""

    def __init__(self, url: str, mode: str, ttl: float = TTL, every: float = QUIET) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scrape", "--serve", url, "--mode", mode,
             "--ttl", str(ttl), "--every", str(every)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"serve child failed ({self.proc.returncode})")
        self.port: int = json.loads(line)["port"]
        self.final: dict[str, Any] = {}

    def pids(self) -> list[int]:
        """The process and its children (the render process)."""
        found = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far of the process and its children."""
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM in kB, of the process and its children together."""
        out = {"VmRSS": 0, "VmHWM": 0}
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] += int(line.split()[1])
        return out

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.final = json.loads(line) if line.strip() else {}
        self.proc.wait(timeout=60)


@contextmanager
def serving(url: str, mode: str, ttl: float = TTL, every: float = QUIET) -> Iterator[Serve]:
    serve = Serve(url, mode, ttl, every)
    try:
        yield serve
    finally:
        serve.stop()


# -- clients ------------------------------------------------------------------------------


def get(port: int, headers: dict[str, str]) -> tuple[float, float | None, int]:
    """One ``GET /metrics`` on a new connection: seconds, reported data age, body bytes."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        age = resp.getheader(DATA_AGE_HEADER)
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET /metrics: {resp.status}")
    return time.perf_counter() - start, float(age) if age else None, len(body)


def hammer(port: int, headers: dict[str, str], seconds: float) -> dict[str, Any]:
    """``CLIENTS`` client processes scraping together every ``PACE`` seconds for ``seconds``
    (processes, so that the clients do not share one interpreter lock)."""
    start_at = time.time() + 1.0  # every client has started by then
    command = [sys.executable, "-m", "benchmarks.scrape", "--client", str(port),
               "--start-at", str(start_at), "--seconds", str(seconds),
               "--headers", json.dumps(headers)]  # fmt: skip
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(CLIENTS)
    ]
    times: list[float] = []
    ages: list[float] = []
    sizes: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"scrape client failed ({proc.returncode})")
        got = json.loads(out.strip().splitlines()[-1])
        times += got["times"]
        ages += got["ages"]
        sizes += got["sizes"]
    return {"p50": pct(times, 0.5), "p99": pct(times, 0.99), "n": len(times),
            "ages": ages, "bytes": max(sizes)}  # fmt: skip


def client_child(port: int, start_at: float, seconds: float, headers: dict[str, str]) -> None:
    """Run in a subprocess: scrape every ``PACE`` seconds (at once when late) from
    ``start_at`` for ``seconds``."""
    times: list[float] = []
    ages: list[float] = []
    sizes: list[int] = []
    k = 0
    while (due := start_at + k * PACE) < start_at + seconds:
        time.sleep(max(0.0, due - time.time()))
        k += 1
        t, age, size = get(port, headers)
        times.append(t)
        sizes.append(size)
        if age is not None:
            ages.append(age)
    print(json.dumps({"times": times, "ages": ages, "sizes": sizes}))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(
    url: str,
    mode: str,
    seconds: float,
    variants: list[str],
    ttl: float = TTL,
    every: float = QUIET,
) -> dict[str, Any]:
    """First scrape, then :func:`hammer` per variant, on one ``serve`` of ``mode``."""
    with serving(url, mode, ttl, every) as serve:
        first, _, _ = get(serve.port, PROMETHEUS_HEADERS)
        result: dict[str, Any] = {"first": first}
        for name in variants:
            get(serve.port, VARIANTS[name])  # the first of a format renders it on demand
            result[name] = hammer(serve.port, VARIANTS[name], seconds)
    result["refresh_max"] = serve.final.get("refresh_max", 0.0)
    result["refreshes"] = serve.final.get("refreshes", 0)
    result["child_renderings"] = serve.final.get("child_renderings", 0)
    return result


def cost(url: str, mode: str, window: float, interval: float) -> dict[str, Any]:
    """CPU seconds and RSS of ``serve`` while two scrapers (Prometheus replicas, offset by
    0.45 ``interval``, out of step with the refreshes) each scrape every ``interval`` for
    ``window`` seconds."""
    with serving(url, mode) as serve:
        ages: list[float] = []
        cpu0 = serve.cpu_seconds()
        start = time.monotonic()

        def scraper(offset: float) -> None:
            k = 0
            while (due := start + offset + k * interval) < start + window:
                time.sleep(max(0.0, due - time.monotonic()))
                _, age, _ = get(serve.port, PROMETHEUS_HEADERS)
                if age is not None:
                    ages.append(age)
                k += 1

        threads = [threading.Thread(target=scraper, args=(o,)) for o in (0.0, 0.45 * interval)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(max(0.0, start + window - time.monotonic()))
        cpu = serve.cpu_seconds() - cpu0
        mem = serve.memory_kb()
    return {"cpu_per_min": cpu * 60.0 / window, "rss_kb": mem["VmRSS"],
            "hwm_kb": mem["VmHWM"], "ages": ages}  # fmt: skip


# -- the peer: prometheus_client's multiprocess mode -------------------------------------


def peer_child(directory: str, files: int, regions: int, reps: int) -> None:
    """Run in a subprocess with ``PROMETHEUS_MULTIPROC_DIR=directory``: write one process's
    series (the counters, size gauge and response-time histogram of ``regions`` regions),
    copy its files for ``files`` processes in all, and time ``MultiProcessCollector``."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    label = ["region"]
    counters = [Counter(f"conduit_cache_{n}", n, label, registry=None)
                for n in ("hits", "misses", "sets", "evictions")]  # fmt: skip
    size = Gauge("conduit_cache_size_bytes", "size", label, registry=None,
                 multiprocess_mode="livesum")  # fmt: skip
    rt = Histogram("conduit_cache_response_time_seconds", "rt", label, registry=None,
                   buckets=DEFAULT_BUCKETS)  # fmt: skip
    for j in range(regions):
        region = region_name(j)
        for c in counters:
            c.labels(region).inc(100 + j)
        size.labels(region).set(1_048_576)
        rt.labels(region).observe(0.002)
    pid = os.getpid()
    for kind in ("counter", "gauge_livesum", "histogram"):
        path = Path(directory, f"{kind}_{pid}.db")
        data = path.read_bytes()
        used = struct.unpack_from("i", data, 0)[0]
        for k in range(1, files):  # the same series in every process file
            Path(directory, f"{kind}_{pid + k}.db").write_bytes(data[:used])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    times = []
    body = b""
    for _ in range(reps):
        start = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - start)
    series = sum(1 for x in body.splitlines() if x and not x.startswith(b"#"))
    print(json.dumps({"median": statistics.median(times), "reps": reps, "series": series}))


def peer(files: int, regions: int, reps: int) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="conduit-multiproc-")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.scrape", "--peer-child", directory,
             "--files", str(files), "--regions", str(regions), "--reps", str(reps)],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory},
        )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-500:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- the run ------------------------------------------------------------------------------


@contextmanager
def populated_cluster(n: int, r: int) -> Iterator[str]:
    """A redis-server holding ``n`` instances x ``r`` regions; yields its URL."""
    with RedisServer() as server:
        store = Store.from_settings(
            settings(redis_url=server.url, instance_timeout=3600, retention_period=7200).connection
        )
        populate(store, n, r)
        store.close()
        yield server.url


def _ms(x: dict[str, Any]) -> str:
    return f"{fmt_ms(x['p50'])} / {fmt_ms(x['p99'])}"


def run(quick: bool = False) -> list[Target]:
    big = (100, 10) if quick else (1000, 100)
    small = (10, 10) if quick else (100, 100)
    seconds, old_seconds = (1.0, 0.5) if quick else (20.0, 3.0)
    window, interval = (3.0, 1.5) if quick else (30.0, 15.0)
    peer_files, peer_regions = ((10, 100), 10) if quick else ((100, 1000), 100)
    variants = ["text", PROMETHEUS] if quick else list(VARIANTS)
    label = f"{big[0]} x {big[1]}"
    print(f"\n## 4. GET /metrics of serve over HTTP at {label}, new way beside old", flush=True)
    started = time.perf_counter()
    res: dict[str, Any] = {}
    with populated_cluster(*big) as url:
        for mode in MODES:
            res[mode] = latency(url, mode, seconds if mode == "new" else old_seconds, variants)
        res["floor"] = latency(url, "new", seconds, variants, ttl=3600.0)
        res["pass"] = latency(url, "new", seconds, [PROMETHEUS], every=PASS_EVERY)
        for mode in MODES:
            res[f"cost_{mode}"] = cost(url, mode, window, interval)
    print(f"  {label}: measured in {time.perf_counter() - started:.0f} s", flush=True)
    with populated_cluster(*small) as url:
        for mode in MODES:
            res[f"small_{mode}"] = latency(url, mode, old_seconds, [PROMETHEUS])
    peers = {f: peer(f, peer_regions, 1 if f >= 1000 else 3) for f in peer_files}
    print(f"  all measured in {time.perf_counter() - started:.0f} s", flush=True)

    new, old, floor = res["new"], res["old"], res["floor"]
    show(
        f"GET /metrics at {label}: ms p50 / p99, {CLIENTS} clients scraping together every "
        f"{PACE:g} s (aggregation_cache_ttl {TTL:g} s)",
        ["format", MODES["new"], "scrapes", MODES["old"], "scrapes", "old / new (p50)", FLOOR,
         "bytes"],
        [
            [name, _ms(new[name]), new[name]["n"], _ms(old[name]), old[name]["n"],
             ratio(old[name]["p50"], new[name]["p50"]), _ms(floor[name]),
             f"{new[name]['bytes']:,}"]
            for name in variants
        ] + [["first scrape after start", fmt_ms(new["first"]), 1, fmt_ms(old["first"]), 1,
              ratio(old["first"], new["first"]), "", ""],
             [f"{PROMETHEUS}, per-instance pass every {PASS_EVERY:g} s",
              _ms(res["pass"][PROMETHEUS]), res["pass"][PROMETHEUS]["n"], "", "", "", "",
              ""]],
    )  # fmt: skip
    print(f"  new way: {new['refreshes']} background refreshes, {new['child_renderings']} of them "
          "rendered by the render process (serve's child)", flush=True)  # fmt: skip
    ages = [a for name in variants for a in new[name]["ages"]]
    bound = TTL + new["refresh_max"]
    cost_ages = res["cost_new"]["ages"]
    show(
        "Data age a scrape sees (X-Conduit-Data-Age: seconds since the Redis read it reflects)",
        ["run", "p50 s", "max s", "bound: ttl + longest refresh s", "longest refresh s"],
        [
            [f"{CLIENTS} clients (all formats)", f"{pct(ages, 0.5):.2f}", f"{max(ages):.2f}",
             f"{bound:.2f}", f"{new['refresh_max']:.3f}"],
            ["2 scrapers", f"{pct(cost_ages, 0.5):.2f}", f"{max(cost_ages):.2f}", "", ""],
        ],
    )  # fmt: skip
    cn, co = res["cost_new"], res["cost_old"]
    show(
        f"serve's cost at {label}: 2 scrapers every {interval:g} s (measured over {window:g} s, "
        "scaled to a minute)",
        ["way", "CPU s / min", "RSS MB", "peak RSS MB"],
        [[MODES[m], f"{c['cpu_per_min']:.2f}", f"{c['rss_kb'] / 1024:,.0f}",
          f"{c['hwm_kb'] / 1024:,.0f}"] for m, c in (("new", cn), ("old", co))],
    )  # fmt: skip
    sizes = dict(zip(peer_files, (small, big)))
    ours = {small: (res["small_new"], res["small_old"]), big: (new, old)}
    show(
        f"Peer: prometheus_client multiprocess mode ({peer_regions} regions per process file; "
        "MultiProcessCollector + generate_latest in-process, median ms) beside our GET /metrics "
        f"({PROMETHEUS}, {CLIENTS} clients, p50 ms)",
        ["processes / instances", "multiprocess scrape ms", "series", "ours new", "ours old",
         "multiprocess / ours new"],
        [
            [f"{f} x {sizes[f][1]}", fmt_ms(peers[f]["median"]), f"{peers[f]['series']:,}",
             fmt_ms(ours[sizes[f]][0][PROMETHEUS]["p50"]),
             fmt_ms(ours[sizes[f]][1][PROMETHEUS]["p50"]),
             ratio(peers[f]["median"], ours[sizes[f]][0][PROMETHEUS]["p50"])]
            for f in peer_files
        ],
    )  # fmt: skip
    targets = [
        Target(
            f"GET /metrics p50 and p99 < 10 ms at {label}, {CLIENTS} clients, {name}",
            new[name]["p50"] < TARGET_S and new[name]["p99"] < TARGET_S,
            f"{_ms(new[name])} ms (old way {_ms(old[name])} ms, "
            f"p99 {ratio(old[name]['p99'], new[name]['p99'])} faster; floor {_ms(floor[name])})",
        )
        for name in variants
    ]
    targets.append(
        Target(
            f"GET /metrics p50 / p99 with the per-instance pass every {PASS_EVERY:g} s "
            "(default 60 s)",
            None,
            f"{_ms(res['pass'][PROMETHEUS])} ms, {PROMETHEUS}",
        )
    )
    targets.append(
        Target(
            "data age within aggregation_cache_ttl + one refresh",
            max(ages + cost_ages) <= bound,
            f"max {max(ages + cost_ages):.2f} s <= {TTL:g} s + {new['refresh_max']:.3f} s",
        )
    )
    targets.append(
        Target(
            f"serve CPU and RSS at {label}, 2 scrapers every 15 s, beside the old way",
            None,
            f"{cn['cpu_per_min']:.2f} vs {co['cpu_per_min']:.2f} CPU s / min, "
            f"{cn['rss_kb'] / 1024:,.0f} vs {co['rss_kb'] / 1024:,.0f} MB RSS",
        )
    )
    targets.append(
        Target(
            "our scrape faster than multiprocess mode at the same sizes",
            all(peers[f]["median"] > ours[sizes[f]][0][PROMETHEUS]["p50"] for f in peer_files),
            ", ".join(
                f"{f} files: {ratio(peers[f]['median'], ours[sizes[f]][0][PROMETHEUS]['p50'])}"
                for f in peer_files
            ),
        )
    )
    return judged("Scrape targets", targets, quick)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small N, short runs")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--ttl", type=float, default=TTL, help=argparse.SUPPRESS)
    parser.add_argument("--every", type=float, default=QUIET, help=argparse.SUPPRESS)
    parser.add_argument("--peer-child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--regions", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--headers", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.mode, args.ttl, args.every)
    elif args.client:
        client_child(args.client, args.start_at, args.seconds, json.loads(args.headers))
    elif args.peer_child:
        peer_child(args.peer_child, args.files, args.regions, args.reps)
    else:
        run(quick=args.quick)


if __name__ == "__main__":
    main()

"""Hot path: ns per ``record_*`` against prometheus_client, the OTel SDK and a Redis peer.

``python -m benchmarks.hot_path [--quick] [--no-peer]``
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Counter, Histogram

from conduit_otel_cache import setup
from conduit_otel_cache.embedded import RedisServer

from .common import Target, Timing, arguments, per_call_auto, ratio, show, show_targets

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".peer-venv"
PEER_SCRIPT = HERE / "peer_distributed.py"
PEER_PACKAGES = ["prometheus-distributed-client", "redis"]
REGION = "ProviderResponses"
RT = 0.0012


def peer_python() -> tuple[Path | None, str]:
    """The peer venv's python, created and installed on first use; (None, why) if not."""
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".installed"
    if marker.exists() and python.exists():
        return python, "cached"
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(PEER_VENV)],
                check=True,
                capture_output=True,
                timeout=120,
            )
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *PEER_PACKAGES,
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        return None, f"could not build {PEER_VENV.name}: {type(exc).__name__} {' '.join(tail)}"
    marker.touch()
    return python, "installed"


def run_peer(python: Path, url: str, mode: str, quick: bool) -> dict[str, Any]:
    number, repeat = (300, 3) if quick else (2000, 5)
    proc = subprocess.run(
        [
            str(python),
            str(PEER_SCRIPT),
            "--redis-url",
            url,
            "--mode",
            mode,
            "--number",
            str(number),
            "--repeat",
            str(repeat),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peer script failed: {proc.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _timing(d: dict[str, float]) -> Timing:
    return Timing(d["min"], d["median"], int(d["reps"]))


#: bytes copied before each call of the cold table, more than this machine's caches hold
EVICT = 8 << 20
#: 100 regions, the hot path's own one of them (max_regions is 100)
COLD_REGIONS = [REGION, *(f"region-{i}" for i in range(1, 100))]


def _cold(stats: Any, meter: Any, quick: bool) -> Target:
    """ns per call with cold caches, as in a service, where each request runs far more code
    and data than the caches hold: every call comes right after a copy of ``EVICT`` bytes,
    in one of 100 regions. Printed beside the same calls of the peers and a bare dict
    increment (the floor of counting in Python); the target: ``record_hit(region, rt)``
    costs at most prometheus_client's ``observe()``, beyond an empty call."""
    registry = CollectorRegistry()
    counter = Counter("cold_hits", "hits", ["region"], registry=registry)
    histogram = Histogram("cold_rt_seconds", "rt", ["region"], registry=registry)
    inc = [counter.labels(region=r) for r in COLD_REGIONS]
    observe = [histogram.labels(region=r) for r in COLD_REGIONS]
    add = meter.create_counter("cold.hits")
    record = meter.create_histogram("cold.rt", unit="s")
    labels = [{"region": r} for r in COLD_REGIONS]
    floor = dict.fromkeys(COLD_REGIONS, 0)

    def bare(r: str) -> None:
        floor[r] += 1

    calls: dict[str, Any] = {
        "baseline: empty Python call f(region)": lambda i: None,
        "floor: a dict increment d[region] += 1": lambda i: bare(COLD_REGIONS[i]),
        "ours: stats.record_hit(region)": lambda i: stats.record_hit(COLD_REGIONS[i]),
        "ours: stats.record_hit(region, rt)": lambda i: stats.record_hit(COLD_REGIONS[i], RT),
        "prometheus_client: pre-bound Counter inc()": lambda i: inc[i].inc(),
        "prometheus_client: pre-bound Histogram observe(rt)": lambda i: observe[i].observe(RT),
        "OTel SDK: counter.add(1, attrs)": lambda i: add.add(1, labels[i]),
        "OTel SDK: histogram.record(rt, attrs)": lambda i: record.record(RT, labels[i]),
    }
    n, rounds = (50, 1) if quick else (400, 5)
    big = bytearray(EVICT)
    order = [int(len(COLD_REGIONS) * (k * 0.618034 % 1) ** 2) for k in range(n)]  # Zipf-like
    for call in calls.values():  # each region seen once: its first call is not timed
        for i in range(len(COLD_REGIONS)):
            call(i)
    spent: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            total = 0
            for i in order:
                bytes(big)  # evict
                start = time.perf_counter_ns()
                call(i)
                total += time.perf_counter_ns() - start
            spent[name].append(total / n)
    base = statistics.median(spent["baseline: empty Python call f(region)"])
    prom = statistics.median(spent["prometheus_client: pre-bound Counter inc()"]) - base
    rows, beyond = [], {}
    for name, ns in spent.items():
        beyond[name] = statistics.median(ns) - base
        rows.append([name, f"{statistics.median(ns):,.0f}", f"{beyond[name]:,.0f}",
                     ratio(beyond[name], prom)])  # fmt: skip
    show(
        f"Hot path with cold caches: ns per call right after a {EVICT >> 20} MB copy "
        f"({rounds} x {n} calls in 100 regions, median)",
        ["operation", "ns", "ns beyond the empty call", "x prom inc()"],
        rows,
    )
    ours = beyond["ours: stats.record_hit(region, rt)"]
    theirs = beyond["prometheus_client: pre-bound Histogram observe(rt)"]
    floor = beyond["floor: a dict increment d[region] += 1"]
    return Target(
        "record_hit(region, rt) with cold caches <= 1.0x Histogram.observe()",
        ours <= theirs,
        f"{ratio(ours, theirs)}: {ours:,.0f} against {theirs:,.0f} ns beyond an empty call "
        f"(median; the floor, a dict increment: {floor:,.0f} ns)",
    )


def run(quick: bool = False, peer: bool = True) -> list[Target]:
    seconds, repeat = (0.01, 3) if quick else (0.1, 7)
    print(
        f"\n## 1. Hot path (ns per call; timeit.repeat: {repeat} runs of ~{seconds} s each)",
        flush=True,
    )
    targets: list[Target] = []
    with RedisServer() as server:
        stats = setup(
            redis_url=server.url,
            instance_id="bench-hot",
            set_global=False,
            flush_interval=None,
            aggregation_cache_ttl=0,
        )
        stats.record_hit(REGION, RT)
        stats.record_miss(REGION, RT)
        spool_dir = tempfile.TemporaryDirectory()
        spooled = setup(
            redis_url=server.url,
            instance_id="bench-hot-spool",
            set_global=False,
            flush_interval=None,
            spool_dir=spool_dir.name,
        )
        spooled.record_hit(REGION, RT)

        registry = CollectorRegistry()
        prom_inc = Counter("bench_hits", "hits", ["region"], registry=registry).labels(
            region=REGION
        )
        prom_obs = Histogram("bench_rt_seconds", "rt", ["region"], registry=registry).labels(
            region=REGION
        )
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
        meter = provider.get_meter("bench")
        otel_counter = meter.create_counter("bench.hits")
        otel_hist = meter.create_histogram("bench.rt", unit="s")
        attrs = {"region": REGION}
        otel_counter.add(1, attrs)
        otel_hist.record(RT, attrs)

        def nothing(*args: object) -> None:
            return None

        env: dict[str, Any] = {
            "hit": stats.record_hit,
            "shit": spooled.record_hit,
            "miss": stats.record_miss,
            "r": REGION,
            "rt": RT,
            "inc": prom_inc.inc,
            "observe": prom_obs.observe,
            "add": otel_counter.add,
            "record": otel_hist.record,
            "attrs": attrs,
            "nothing": nothing,
        }
        cases = [
            ("ours: stats.record_hit(region)", "hit(r)"),
            ("ours: stats.record_hit(region, rt)", "hit(r, rt)"),
            ("ours with spool_dir: stats.record_hit(region)", "shit(r)"),
            ("ours with spool_dir: stats.record_hit(region, rt)", "shit(r, rt)"),
            ("ours: stats.record_miss(region)", "miss(r)"),
            ("ours: stats.record_miss(region, rt)", "miss(r, rt)"),
            ("prometheus_client: pre-bound Counter inc()", "inc()"),
            ("prometheus_client: pre-bound Histogram observe(rt)", "observe(rt)"),
            ("OTel SDK: counter.add(1, attrs)", "add(1, attrs)"),
            ("OTel SDK: histogram.record(rt, attrs)", "record(rt, attrs)"),
            ("baseline: empty Python call f(region)", "nothing(r)"),
        ]
        results: dict[str, Timing] = {}
        for _, stmt in cases:
            results[stmt] = per_call_auto(stmt, env, repeat, seconds)
        cold = _cold(stats, meter, quick)

        peer_up: dict[str, Any] | None = None
        peer_down: dict[str, Any] | None = None
        peer_note = "skipped (--no-peer)"
        python: Path | None = None
        if peer:
            python, peer_note = peer_python()
            if python is not None:
                try:
                    peer_up = run_peer(python, server.url, "up", quick)
                except Exception as exc:
                    peer_note = f"failed: {exc}"

        # -- Redis stopped ----------------------------------------------------------------
        server.stop()
        logging.getLogger("conduit_otel_cache").setLevel(logging.CRITICAL)
        down_hit = per_call_auto("hit(r)", env, repeat, seconds)
        raised = 0
        flush_ok = []
        start = time.perf_counter()
        for _ in range(3):
            try:
                flush_ok.append(stats.flush())
            except Exception:
                raised += 1
        flush_down = (time.perf_counter() - start) / 3
        ours_raised = 0
        try:
            for _ in range(1000):
                stats.record_hit(REGION, RT)
                stats.record_miss(REGION)
        except Exception:
            ours_raised += 1
        if python is not None and peer_up is not None:
            try:
                peer_down = run_peer(python, server.url, "down", quick)
            except Exception as exc:
                peer_note = f"down run failed: {exc}"
        stats.shutdown()
        spooled.shutdown()
        spool_dir.cleanup()
        provider.shutdown()
        logging.getLogger("conduit_otel_cache").setLevel(logging.NOTSET)

    prom = results["inc()"].median
    rows = []
    for name, stmt in cases:
        t = results[stmt]
        rows.append([name, *t.ns(), ratio(t.median, prom)])
    if peer_up is not None:
        for key, name in (
            ("inc", "prometheus-distributed-client: pre-bound Counter inc() (Redis)"),
            ("observe", "prometheus-distributed-client: pre-bound Histogram observe() (Redis)"),
            ("local_inc", f"prometheus_client {peer_up['prometheus_client']} inc() (peer venv)"),
        ):
            t = _timing(peer_up[key])
            rows.append([name, *t.ns(), ratio(t.median, prom)])
    show(
        "Hot path: ns per call (lower is better)",
        ["operation", "min ns", "median ns", "x prom inc() (median)"],
        rows,
    )

    hit, hit_rt = results["hit(r)"], results["hit(r, rt)"]
    spool_hit, spool_rt = results["shit(r)"], results["shit(r, rt)"]
    add, obs = results["add(1, attrs)"], results["observe(rt)"]
    ratio_rows = [
        [
            "record_hit / prometheus pre-bound inc()",
            ratio(hit.min, results["inc()"].min),
            ratio(hit.median, prom),
            "<= 1.0x",
        ],
        [
            "record_hit with spool_dir / prometheus pre-bound inc()",
            ratio(spool_hit.min, results["inc()"].min),
            ratio(spool_hit.median, prom),
            "<= 0.5x",
        ],
        [
            "record_hit(region, rt) with spool_dir / Histogram.observe()",
            ratio(spool_rt.min, obs.min),
            ratio(spool_rt.median, obs.median),
            "<= 1.0x",
        ],
        [
            "OTel counter.add / record_hit (speed-up)",
            ratio(add.min, hit.min),
            ratio(add.median, hit.median),
            ">= 5x",
        ],
        [
            "record_hit(region, rt) / Histogram.observe()",
            ratio(hit_rt.min, obs.min),
            ratio(hit_rt.median, obs.median),
            "<= 1.0x",
        ],
    ]
    if peer_up is not None:
        p = _timing(peer_up["inc"])
        ratio_rows.append(
            [
                "distributed peer inc() / record_hit (speed-up)",
                ratio(p.min, hit.min),
                ratio(p.median, hit.median),
                "-",
            ]
        )
    show("Hot path ratios", ["ratio", "min", "median", "target"], ratio_rows)

    down_rows = [
        [
            "ours: record_hit(region), Redis stopped",
            f"{down_hit.median * 1e9:,.0f} ns",
            f"{ours_raised} of 2,000 calls",
            "no I/O on the hot path",
        ],
        [
            "ours: stats.flush(), Redis stopped",
            f"{flush_down * 1e3:,.2f} ms",
            f"{raised} of 3 calls",
            f"returned {flush_ok}; counted, retried at next flush",
        ],
    ]
    if peer_down is not None:
        d = peer_down["down"]
        down_rows.append(
            [
                "distributed peer: inc(), Redis stopped",
                f"{d['seconds_per_event'] * 1e6:,.0f} us",
                f"{d['raised']} of {d['events']} calls",
                ", ".join(d["errors"]) or "-",
            ]
        )
    else:
        down_rows.append(["distributed peer: inc(), Redis stopped", "-", "-", peer_note])
    show(
        "Redis stopped: time per event and errors raised into the caller",
        ["operation", "time per event", "raised into caller", "note"],
        down_rows,
    )
    if peer_up is not None:
        print(
            f"\npeer: prometheus-distributed-client {peer_up['peer']}, prometheus-client "
            f"{peer_up['prometheus_client']}, redis-py {peer_up['redis_py']} in "
            f"{os.path.relpath(PEER_VENV)} ({peer_note}); Redis hash total after the run: "
            f"{peer_up['stored_total']:,.0f}"
        )
    else:
        print(f"\npeer: {peer_note}")

    targets.append(
        Target(
            "record_hit <= 1.0x prometheus pre-bound inc()",
            hit.median <= prom,
            f"{hit.median / prom:.2f}x (median)",
        )
    )
    targets.append(
        Target(
            "record_hit with spool_dir <= 0.5x prometheus pre-bound inc()",
            spool_hit.median <= 0.5 * prom,
            f"{spool_hit.median / prom:.2f}x (median)",
        )
    )
    targets.append(
        Target(
            "record_hit >= 5x faster than OTel counter.add",
            add.median >= 5 * hit.median,
            f"{add.median / hit.median:.1f}x faster (median)",
        )
    )
    targets.append(
        Target(
            "record_hit(region, rt) <= 1.0x Histogram.observe()",
            hit_rt.median <= obs.median,
            f"{hit_rt.median / obs.median:.2f}x (median)",
        )
    )
    targets.append(cold)
    targets.append(
        Target(
            "record_* never raises with Redis stopped",
            ours_raised == 0 and raised == 0,
            f"ours raised {ours_raised + raised}x"
            + (
                f"; peer raised {peer_down['down']['raised']} of {peer_down['down']['events']}"
                if peer_down
                else ""
            ),
        )
    )
    show_targets("Hot path targets", targets)
    return targets


def main() -> None:
    args = arguments(__doc__ or "", peer=True)
    run(quick=args.quick, peer=not args.no_peer)


if __name__ == "__main__":
    main()

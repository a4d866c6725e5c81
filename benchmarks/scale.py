"""Aggregation and scrape at cluster scale, against a real redis-server, and how they grow.

``python -m benchmarks.scale [--quick]``

For each N instances x R regions the cluster is written with ``Store.flush()`` (one call per
instance, synthetic cumulative fields), then: one ``/metrics`` scrape through the public
``ExporterService`` registry, cold (``aggregation_cache_ttl=0``) and warm (second scrape
within the TTL), and over HTTP; the cluster totals alone (``store.read_cluster()``); the
full per-instance pass (``Aggregator(...).view()`` with TTL 0, which reads every instance);
Redis memory per instance per region; Redis round trips per scrape; and the seed's way to
get totals, summing at read time over a pipelined HGETALL of every instance x region.
The largest size runs once more on a Redis Cluster of three primaries (no replicas).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from redis.cluster import RedisCluster
from tests.servers import RedisClusterServers

from conduit_otel_cache.aggregate import Aggregator
from conduit_otel_cache.config import DEFAULT_BUCKETS, Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.keys import KeySchema
from conduit_otel_cache.model import ResponseTimes
from conduit_otel_cache.serve.service import ExporterService
from conduit_otel_cache.store import Entry, Store, Writer

from .common import (
    ServerCommands,
    Target,
    Timing,
    fmt_ms,
    judged,
    measure,
    measure_trips,
    plain_client,
    settings,
    show,
)

FULL_SCALES = [(100, 10), (1000, 10), (100, 100), (1000, 100)]
QUICK_SCALES = [(10, 5), (100, 5), (10, 50), (100, 50)]
# the largest size again, on a Redis Cluster of this many primaries
REDIS_CLUSTER_MASTERS = 3
FULL_REDIS_CLUSTER_SCALE = (1000, 100)
QUICK_REDIS_CLUSTER_SCALE = (100, 10)
SEED_BYTES_PER_INSTANCE_REGION = 100 * 1024  # the seed: "~100KB per instance per region"
NUMERIC = ("hit_count", "miss_count", "set_count", "eviction_count", "size_bytes", "rt_sum")
ROOT = Path(__file__).resolve().parent.parent


MAX_INSTANCE_SERIES = Settings().max_instance_series
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def region_name(j: int) -> str:
    return f"region{j:03d}"


def instance_fields(i: int, j: int) -> dict[str, str]:
    """Cumulative fields of instance ``i`` in region ``j``; hit ratios differ (drift)."""
    hits = 800 + (i * 37 + j * 11) % 400
    counts = [0] * (len(DEFAULT_BUCKETS) + 1)
    counts[1], counts[3], counts[5], counts[8] = hits // 2, hits // 3, 150, 25
    fields = {
        "hit_count": str(hits),
        "miss_count": "200",
        "set_count": "180",
        "eviction_count": str(j % 5),
        "size_bytes": str(1_048_576 + i),
    }
    fields.update(ResponseTimes(DEFAULT_BUCKETS, tuple(counts), 0.0021 * hits).to_fields())
    return fields


def populate(store: Store, n: int, r: int) -> float:
    """Write the cluster: one ``Store.flush`` per instance with all its regions."""
    start = time.perf_counter()
    for i in range(n):
        regions = {region_name(j): Entry(instance_fields(i, j)) for j in range(r)}
        store.flush(Writer(f"inst-{i:04d}", f"token-{i}", f"bench:{i}", 86400, 3600), regions)
    return time.perf_counter() - start


def seed_totals(client: Any, keys: KeySchema, regions: list[str]) -> dict[str, dict[str, float]]:
    """The seed's read path: sum every instance's hash at read time (pipelined HGETALL;
    ``keys`` names the keys, standalone or Redis Cluster)."""
    ids = client.zrange(keys.instances, 0, -1)
    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        for region in regions:
            pipe.hgetall(keys.stats(instance_id, region))
    replies = pipe.execute()
    totals: dict[str, dict[str, float]] = {region: {} for region in regions}
    k = 0
    for _ in ids:
        for region in regions:
            acc = totals[region]
            for name, value in replies[k].items():
                if name in NUMERIC or name.startswith("le:"):
                    acc[name] = acc.get(name, 0.0) + float(value)
            k += 1
    return totals


def drift_from_fields(client: Any, keys: KeySchema, regions: list[str]) -> dict[str, float]:
    """What drift needs and no more: pipelined HMGET of hit_count, miss_count and live of
    every instance x region, then the largest distance from the live cluster's hit ratio."""
    ids = client.zrange(keys.instances, 0, -1)
    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        for region in regions:
            pipe.hmget(keys.stats(instance_id, region), "hit_count", "miss_count", "live")
    replies = iter(pipe.execute())
    rates: dict[str, list[tuple[int, int]]] = {region: [] for region in regions}
    for _ in ids:
        for region in regions:
            hits, misses, live = next(replies)
            if live == "1" and hits is not None:
                h, m = int(hits), int(misses or 0)
                if h + m:
                    rates[region].append((h, h + m))
    drift: dict[str, float] = {}
    for region, pairs in rates.items():
        total = sum(t for _, t in pairs)
        cluster = 100.0 * sum(h for h, _ in pairs) / total if total else 0.0
        drift[region] = max((abs(100.0 * h / t - cluster) for h, t in pairs), default=0.0)
    return drift


def service(url: str, ttl: float) -> ExporterService:
    """A started exporter service on a free port; the per-instance pass (if it runs in the
    background in this version) runs once at start, then not again during the run."""
    s = settings(
        redis_url=url,
        aggregation_cache_ttl=ttl,
        aggregation_interval=3600,
        cleanup_interval=3600,
        instance_timeout=3600,
        retention_period=7200,
    )
    return ExporterService(s, port=0).start()


def wait_ready(svc: ExporterService, expected: int, timeout: float = 300.0) -> float:
    """Wait until the view holds every instance x region (the per-instance pass ran)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        svc.aggregator.invalidate()
        view = svc.aggregator.view()
        if sum(len(v) for v in view.instance_hit_ratios.values()) >= expected:
            break
        time.sleep(0.1)
    return time.perf_counter() - start


def vm_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in kB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def rss_child(url: str, expected: int) -> None:
    """Run in a subprocess: an exporter service scraping the cluster; prints RSS as JSON."""
    before = vm_status()
    svc = service(url, ttl=0)
    wait_ready(svc, expected)
    ready = vm_status()
    size = 0
    for _ in range(3):
        size = len(generate_latest(svc.exposition.registry))
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/metrics", timeout=300) as resp:
        resp.read()
    after = vm_status()
    svc.stop()
    print(
        json.dumps(
            {
                "before_kb": before["VmRSS"],
                "ready_kb": ready["VmRSS"],
                "after_kb": after["VmRSS"],
                "peak_kb": after["VmHWM"],
                "bytes": size,
            }
        )
    )


def measure_rss(url: str, expected: int) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--rss-child", url, "--expected", str(expected)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-500:])
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@contextmanager
def redis_for(redis_cluster: bool) -> Iterator[tuple[str, Any]]:
    """A fresh redis-server (or Redis Cluster of ``REDIS_CLUSTER_MASTERS`` primaries): its URL and
    a plain client of it (``decode_responses``)."""
    client: Any
    if redis_cluster:
        with RedisClusterServers(masters=REDIS_CLUSTER_MASTERS, replicas=0) as nodes:
            port = nodes.servers[0].port
            client = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
            try:
                yield f"redis+cluster://127.0.0.1:{port}", client
            finally:
                client.close()
    else:
        with RedisServer() as server:
            client = plain_client(server.url)
            try:
                yield server.url, client
            finally:
                client.close()


def one_scale(
    n: int, r: int, quick: bool, rss: bool, redis_cluster: bool = False
) -> dict[str, Any]:
    reps, slow_reps, budget = (3, 2, 5.0) if quick else (7, 3, 8.0)
    res: dict[str, Any] = {"n": n, "r": r, "redis_cluster": redis_cluster}
    with redis_for(redis_cluster) as (redis_url, client):
        s0 = settings(
            redis_url=redis_url,
            aggregation_cache_ttl=0,
            instance_timeout=3600,
            retention_period=7200,
        )
        store = Store.from_settings(s0.connection)
        mem0 = store.used_memory()
        res["populate_s"] = populate(store, n, r)
        mem1 = store.used_memory()
        res["mem_per_pair"] = (mem1 - mem0) / (n * r)
        res["used_memory"] = mem1
        regions = [region_name(j) for j in range(r)]

        res["read_cluster"], res["read_cluster_trips"] = measure_trips(
            lambda: store.read_cluster(3600), max(reps, 20), budget
        )

        # the per-instance pass with drift: a synchronous aggregator with TTL 0 reads the
        # totals, drift and every live instance's hit ratio
        sync = Aggregator(store, s0.aggregation)
        res["view_sync"], res["view_sync_trips"] = measure_trips(sync.view, slow_reps, budget)

        # connect first (to every node): the handshake is not a round trip of the read
        client.ping(**({"target_nodes": RedisCluster.ALL_NODES} if redis_cluster else {}))
        # on the Redis Cluster these take seconds at full size: one repetition there (keeps
        # `make bench` short), more when they are fast
        seed_budget = 1.0 if redis_cluster else budget
        res["seed_totals"], res["seed_trips"] = measure_trips(
            lambda: seed_totals(client, store.keys, regions), slow_reps, seed_budget
        )
        res["drift_fields"], res["drift_trips"] = measure_trips(
            lambda: drift_from_fields(client, store.keys, regions), slow_reps, seed_budget
        )
        if not redis_cluster:  # Redis CPU of one read of the cluster view, each design
            cmds = ServerCommands(client)
            for name, read in (
                ("totals", lambda: store.read_cluster(3600)),
                ("pass", sync.view),
                ("seed", lambda: seed_totals(client, store.keys, regions)),
            ):
                with cmds.counting() as used:
                    for _ in range(3):
                        read()
                res[f"cpu_read_{name}"] = used["cpu_us"] / 3  # fmt: skip

        # scrapes through the public exporter service
        cold = service(redis_url, ttl=0)
        res["ready_s"] = wait_ready(cold, n * r)
        registry = cold.exposition.registry
        body = generate_latest(registry)
        res["bytes"] = len(body)
        res["series"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        lines = body.splitlines()
        res["ratio_series"] = sum(
            1 for x in lines if x.startswith(b"conduit_cache_instance_hit_ratio{")
        )
        res["overflow"] = sum(1 for x in lines if b'otel_metric_overflow="true"' in x)
        res["cold"], res["cold_trips"] = measure_trips(
            lambda: generate_latest(registry), reps, budget
        )
        # where a cold scrape's time goes: the aggregation (Redis read and parse of the
        # totals), then prometheus_client's text writer over the very families the scrape
        # produced (the floor of any exporter built on it); the rest is the OTel SDK
        res["cold_view"] = measure(cold.aggregator.view, reps, budget)
        families = list(registry.collect())
        required = [f for f in families if f.name != "conduit_cache_instance_hit_ratio"]
        res["text"] = measure(lambda: generate_latest(_Static(families)), reps, budget)
        res["text_required"] = measure(lambda: generate_latest(_Static(required)), reps, budget)
        url = f"http://127.0.0.1:{cold.port}/metrics"

        def http_get(accept: str = "") -> None:
            request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
            with urllib.request.urlopen(request, timeout=300) as resp:
                resp.read()

        res["http_cold"] = measure(http_get, slow_reps, budget)
        # what Prometheus asks for first (after protobuf, which prometheus_client lacks)
        res["http_cold_om"] = measure(lambda: http_get(OPENMETRICS), slow_reps, budget)
        cold.stop()

        warm = service(redis_url, ttl=3600)
        wait_ready(warm, n * r)
        wreg = warm.exposition.registry
        generate_latest(wreg)
        res["warm"], res["warm_trips"] = measure_trips(lambda: generate_latest(wreg), reps, budget)
        warm.stop()
        if rss:
            res["rss"] = measure_rss(redis_url, n * r)
        store.close()
    return res


class _Static:
    """A collector that returns families collected before (for the text writer alone)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _ms(t: Timing) -> str:
    return f"{fmt_ms(t.min)} / {fmt_ms(t.median)}"


def _label(x: dict[str, Any]) -> str:
    topology = f" ({REDIS_CLUSTER_MASTERS}-master Redis Cluster)" if x["redis_cluster"] else ""
    return f"{x['n']} x {x['r']}{topology}"


def run(quick: bool = False) -> list[Target]:
    scales = QUICK_SCALES if quick else FULL_SCALES
    print("\n## 3. Aggregation and scrape at cluster scale (ms: min / median)", flush=True)
    results: list[dict[str, Any]] = []
    for n, r in scales:
        started = time.perf_counter()
        res = one_scale(n, r, quick, rss=(n, r) == scales[-1])
        results.append(res)
        print(
            f"  {n} x {r}: populated in {res['populate_s']:.1f} s, "
            f"measured in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    # the same on a Redis Cluster: a row of the tables below, not part of growth or targets
    n, r = QUICK_REDIS_CLUSTER_SCALE if quick else FULL_REDIS_CLUSTER_SCALE
    started = time.perf_counter()
    on_redis_cluster = one_scale(n, r, quick, rss=False, redis_cluster=True)
    print(
        f"  {_label(on_redis_cluster)}: populated in {on_redis_cluster['populate_s']:.1f} s, "
        f"measured in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    rows = [*results, on_redis_cluster]

    show(
        "Scrape (/metrics via ExporterService registry) and cluster totals",
        [
            "N x R",
            "cold scrape ms",
            "round trips",
            "warm scrape ms",
            "round trips",
            "HTTP GET cold ms",
            "HTTP GET cold, OpenMetrics ms",
            "read_cluster() ms",
            "round trips",
            "series",
            "bytes",
        ],
        [
            [
                _label(x),
                _ms(x["cold"]),
                f"{x['cold_trips']:g}",
                _ms(x["warm"]),
                f"{x['warm_trips']:g}",
                _ms(x["http_cold"]),
                _ms(x["http_cold_om"]),
                _ms(x["read_cluster"]),
                f"{x['read_cluster_trips']:g}",
                f"{x['series']:,}",
                f"{x['bytes']:,}",
            ]
            for x in rows
        ],
    )
    show(
        "Where a cold scrape's time goes (median ms)",
        [
            "N x R",
            "cold scrape",
            "aggregation (Redis read + parse)",
            "OTel SDK collection + translation",
            "text (prometheus_client)",
            "text of the required series alone",
            "series",
        ],
        [
            [
                _label(x),
                fmt_ms(x["cold"].median),
                fmt_ms(x["cold_view"].median),
                fmt_ms(max(0.0, x["cold"].median - x["cold_view"].median - x["text"].median)),
                fmt_ms(x["text"].median),
                fmt_ms(x["text_required"].median),
                f"{x['series']:,}",
            ]
            for x in rows
        ],
    )
    show(
        "Per-instance pass, seed read-time sum, Redis memory",
        [
            "N x R",
            "per-instance pass ms (view, TTL 0)",
            "round trips",
            "drift fields only (HMGET 3 fields) ms",
            "seed: HGETALL every instance x region ms",
            "round trips",
            "seed / read_cluster (median)",
            "Redis B / instance / region",
            "seed's 100 KB / ours",
        ],
        [
            [
                _label(x),
                _ms(x["view_sync"]),
                f"{x['view_sync_trips']:g}",
                _ms(x["drift_fields"]),
                _ms(x["seed_totals"]),
                f"{x['seed_trips']:g}",
                f"{x['seed_totals'].median / x['read_cluster'].median:,.0f}x",
                f"{x['mem_per_pair']:,.0f}",
                f"{SEED_BYTES_PER_INSTANCE_REGION / x['mem_per_pair']:,.0f}x under",
            ]
            for x in rows
        ],
    )

    show(
        "Per-instance series on /metrics (conduit_cache_instance_hit_ratio: at most "
        "max_instance_series of the live instance x region pairs)",
        ["N x R", "live pairs", "instance_hit_ratio series", "otel_metric_overflow series"],
        [
            [
                _label(x),
                f"{x['n'] * x['r']:,}",
                f"{x['ratio_series']:,}",
                x["overflow"],
            ]
            for x in rows
        ],
    )

    by = {(x["n"], x["r"]): x for x in results}
    (n1, r1), (n2, _), (_, r2), _ = scales
    steps = [
        (f"N x10 at R={r1}", (n1, r1), (n2, r1)),
        (f"N x10 at R={r2}", (n1, r2), (n2, r2)),
        (f"R x10 at N={n1}", (n1, r1), (n1, r2)),
        (f"R x10 at N={n2}", (n2, r1), (n2, r2)),
    ]
    figures: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("cold scrape", lambda x: x["cold"].median),
        ("warm scrape", lambda x: x["warm"].median),
        ("read_cluster()", lambda x: x["read_cluster"].median),
        ("aggregation part of cold scrape", lambda x: x["cold_view"].median),
        ("text exposition", lambda x: x["text"].median),
        ("per-instance pass", lambda x: x["view_sync"].median),
        ("seed HGETALL sum", lambda x: x["seed_totals"].median),
        ("drift fields only (HMGET)", lambda x: x["drift_fields"].median),
        ("scrape series", lambda x: x["series"]),
        ("cold scrape round trips", lambda x: x["cold_trips"]),
        ("B / instance / region", lambda x: x["mem_per_pair"]),
    ]
    show(
        "Growth: figure at 10x / figure before (median)",
        ["figure", *[s[0] for s in steps]],
        [
            [name, *[f"{get(by[b]) / get(by[a]):.2f}x" if get(by[a]) else "-" for _, a, b in steps]]
            for name, get in figures
        ],
    )

    big = results[-1]
    label = f"{big['n']} x {big['r']}"
    # two serve replicas, each reading the totals every aggregation_cache_ttl and doing the
    # per-instance pass every aggregation_interval (the defaults); the seed sums at each read
    replicas, every, passes = 2, Settings().aggregation_cache_ttl, Settings().aggregation_interval
    show(
        "Redis CPU of reading the cluster view (INFO cpu), and of "
        f"{replicas} serve replicas (totals every {every:g} s, per-instance pass every "
        f"{passes:g} s; the seed sums every instance at every read)",
        ["N x R", "ours: totals (read_cluster) ms", "ours: with the per-instance pass ms",
         "seed: HGETALL every instance x region ms", f"ours, {replicas} replicas: % of a core",
         f"seed, {replicas} replicas: % of a core"],
        [[_label(x), f"{x['cpu_read_totals'] / 1e3:,.2f}", f"{x['cpu_read_pass'] / 1e3:,.2f}",
          f"{x['cpu_read_seed'] / 1e3:,.1f}",
          f"{replicas * (x['cpu_read_totals'] / every + x['cpu_read_pass'] / passes) / 1e4:,.2f}",
          f"{replicas * x['cpu_read_seed'] / 1e6 / every * 100:,.1f}"]
         for x in results],
    )  # fmt: skip
    if "rss" in big:
        rss = big["rss"]
        show(
            f"Exporter process RSS at {label} (subprocess, /proc/self/status)",
            [
                "after imports MB",
                "after per-instance pass MB",
                "after 4 scrapes MB",
                "peak (VmHWM) MB",
                "scrape bytes",
            ],
            [
                [
                    f"{rss['before_kb'] / 1024:,.0f}",
                    f"{rss['ready_kb'] / 1024:,.0f}",
                    f"{rss['after_kb'] / 1024:,.0f}",
                    f"{rss['peak_kb'] / 1024:,.0f}",
                    f"{rss['bytes']:,}",
                ]
            ],
        )

    cold_ms = big["cold"].median * 1e3
    pass_s = big["view_sync"].median
    mem = big["mem_per_pair"]
    targets = [
        Target(
            f"cold scrape < 10 ms at {label}",
            cold_ms < 10,
            f"{cold_ms:,.1f} ms median ({cold_ms / 10:.1f}x the target); prometheus_client's "
            f"text writer alone takes {big['text'].median * 1e3:,.1f} ms for these "
            f"{big['series']:,} series, {big['text_required'].median * 1e3:,.1f} ms for the "
            "required ones without per-instance series",
        ),
        Target(
            f"aggregation part of a cold scrape < 10 ms at {label}",
            big["cold_view"].median < 0.010,
            f"{big['cold_view'].median * 1e3:,.2f} ms median (read_cluster() "
            f"{big['read_cluster'].median * 1e3:,.2f} ms)",
        ),
        Target(
            f"per-instance pass with drift < 1 s at {label}",
            pass_s < 1.0,
            f"{pass_s * 1e3:,.0f} ms median ({pass_s:.2f}x the target)",
        ),
        Target(
            "Redis memory < 100 KB per instance per region",
            mem < 100 * 1024,
            f"{mem:,.0f} B ({100 * 1024 / mem:,.0f}x under) at {label}",
        ),
        Target(
            f"bounded per-instance series on /metrics at {label}",
            big["ratio_series"] == min(MAX_INSTANCE_SERIES, big["n"] * big["r"])
            and not big["overflow"],
            f"{big['ratio_series']:,} of {big['n'] * big['r']:,} live pairs"
            + (" (OTel cardinality limit overflow)" if big["overflow"] else ""),
        ),
        Target(
            "scrape round trips independent of N",
            all(by[(n2, r)]["cold_trips"] == by[(n1, r)]["cold_trips"] for r in (r1, r2)),
            ", ".join(f"{x['n']}x{x['r']}: {x['cold_trips']:g}" for x in results),
        ),
    ]
    return judged("Scale targets", targets, quick)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small N, few reps")
    parser.add_argument("--rss-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.expected)
        return
    run(quick=args.quick)


if __name__ == "__main__":
    main()

"""A fleet of 10,000 instances: Redis CPU per primary of a 3-master Redis Cluster, in the
default layout (by region) and in ``SHARDS`` shards by instance (``redis_cluster_shards``),
beside a standalone Redis, for the flushes and for two ``serve`` replicas reading, and the
duration of the per-instance pass.

``python -m benchmarks.fleet [--quick]``

For each topology, Redis is first filled to the fleet's size, N instances x R regions:
``SEED_INSTANCES`` instances are written through ``Store.flush()`` (as ``scale.py`` does),
then copied inside Redis under new instance ids (``CLONE_LUA``: ``DUMP``/``RESTORE`` of each
seed's statistics hashes and instance keys, its field in each region's counts hash and
its member in the heartbeats), so that Redis holds the keys, encodings and sizes of N
instances written by the library in under a minute, where writing 1,000,000 regions one
flush at a time takes 7 (standalone) to 15 minutes (Redis Cluster) on this machine. Only
the totals are not those of N instances (the copies add nothing to them): what is measured
does not depend on their values.

Measured, per primary (``INFO cpu``: ``used_cpu_sys`` + ``used_cpu_user`` of the server
process, protocol handling included, less the node's idle rate once it has settled after
the fill;
``INFO commandstats`` for the calls):

- *flushes*: ``SAMPLE_INSTANCES`` real application instances (``setup()``, the
  application's flush path), each with R regions, flushing ``ROUNDS`` times with 10 % of
  their regions changed (a different tenth each round, so every region is written equally
  often and each instance's every-10th-write check of the unchanged regions is included);
  every topology is filled and alive at once, and ``PHASES`` such phases of each alternate
  between them (the median phase of each is the figure), so that the machine's drift
  weighs on each alike;
- *reads*: what a ``serve`` replica does against Redis: the totals
  (``Aggregator.view()`` with the pass in the background: ``lua/liveness.lua``, the
  aggregated hashes, ``INFO memory``) and the per-instance pass
  (``Aggregator.refresh_instances()``: the heartbeats checked, one counts hash read per
  region), whose duration is timed too, with the default ``socket_timeout``. It runs on
  ``PASS_REGIONS`` of the regions (all of them: its reads grow linearly with them; fewer
  are scaled to all), after one read of the totals.

Extrapolated: N / ``flush_interval`` flushes per second times the CPU per flush of each
primary; two replicas reading the totals every ``aggregation_cache_ttl`` and running the pass
every ``aggregation_interval`` (the defaults). The ``{global}`` slot's own share is
estimated on its primary: its CPU less its region calls (``EVALSHA`` calls beyond one beat
per flush) at the CPU per region call of the other primaries.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import redis
from redis.cluster import RedisCluster
from tests.servers import RedisClusterServers

from conduit_otel_cache import setup
from conduit_otel_cache import store as store_module
from conduit_otel_cache.aggregate import Aggregator
from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.keys import KeySchema
from conduit_otel_cache.shards import Shards, open_store, shard_tags
from conduit_otel_cache.store import Store

from .common import Target, Timing, fmt_ms, judged, measure, settings, show
from .scale import populate, region_name

#: the fleet: instances x regions, the share of regions a flush changes, flush_interval
FULL = (10_000, 100)
QUICK = (200, 10)
CHANGED = 0.10
FLUSH_INTERVAL = Settings().flush_interval or 10.0
MASTERS = 3
#: ``redis_cluster_shards`` of the sharded layout: twice the primaries, as docs/how-it-works.md
#: advises (room to reshard)
SHARDS = 2 * MASTERS
#: the topologies measured: the default layout of a Redis Cluster (by region) and shards
TOPOLOGIES = {
    "standalone": "standalone Redis",
    "cluster": f"{MASTERS}-master Redis Cluster",
    "shards": f"{MASTERS}-master Redis Cluster, {SHARDS} shards",
}
REPLICAS = 2  # serve replicas reading
SEED_INSTANCES = 100  # written through Store.flush(), then copied inside Redis
SAMPLE_INSTANCES = 20  # real application instances flushing while Redis CPU is measured
ROUNDS = 20  # flushes of each (covers two every-10th-write checks)
#: flush phases per topology, alternated between the topologies (all filled and alive at
#: once): on a shared machine the same flushes cost a Redis process up to 60 % more from one
#: minute to the next, so topologies measured minutes apart did not compare
PHASES = 3
RT = 0.0012
#: a replica's reads: totals every aggregation_cache_ttl, the pass every aggregation_interval
TOTALS_EVERY = Settings().aggregation_cache_ttl
PASS_EVERY = Settings().aggregation_interval
#: targets: each primary at most this share of the standalone Redis CPU; the pass under this
MASTER_SHARE = 0.40
PASS_LIMIT_S = 5.0
#: the per-instance pass is measured on this many regions and scaled to all (its reads grow
#: linearly with the regions: one counts hash per region)
PASS_REGIONS = 100
CLONE_CHUNK = 500  # copies per script call (short: see CLONE_LUA)

#: Copies of seed instances' keys of one slot under new ids ``inst-<n>`` (n from ARGV[5] to
#: ARGV[6]), from their ``DUMP``s: the statistics hash of one region (and its samples list,
#: if any) and the field of the region's counts hash; or, with ARGV[4] empty, the
#: instance's meta hash and regions set and its heartbeat (score: now). Small calls: a
#: script that holds a Redis Cluster node for long gets it marked as failing.
#: KEYS[1]: a key of the slot (aggregated hash of the region, or the heartbeats zset).
#: ARGV: key prefix, key suffix (a key is prefix .. id .. suffix), the second key's suffix
#: after that, counts hash key or '', first n, last n, then per seed: DUMP and PTTL of
#: its key, of its second key ('' if none), its counts ('' if none).
CLONE_LUA = """
local prefix, suffix, extra, rates = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local seeds = (#ARGV - 6) / 5
local t = redis.call('TIME')
local zadd = {}
for n = tonumber(ARGV[5]), tonumber(ARGV[6]) do
  local a = 7 + (n % seeds) * 5
  local id = string.format('inst-%05d', n)
  local key = prefix .. id .. suffix
  redis.call('RESTORE', key, ARGV[a + 1], ARGV[a], 'REPLACE')
  if ARGV[a + 2] ~= '' then
    redis.call('RESTORE', key .. extra, ARGV[a + 3], ARGV[a + 2], 'REPLACE')
  end
  if rates == '' then
    zadd[#zadd + 1], zadd[#zadd + 2] = t[1], id
  elseif ARGV[a + 4] ~= '' then
    zadd[#zadd + 1], zadd[#zadd + 2] = id, ARGV[a + 4]
  end
end
if #zadd > 0 then
  if rates == '' then
    redis.call('ZADD', KEYS[1], unpack(zadd))
  else
    redis.call('HSET', rates, unpack(zadd))
  end
end
return #zadd / 2
"""


@dataclasses.dataclass
class Node:
    """One primary: its port and CPU (µs) and ``EVALSHA`` calls so far."""

    port: int
    label: str = ""
    regions: int = 0
    holds_global: bool = False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def cpu_us(self) -> float:
        with self.client() as c:
            cpu = c.info("cpu")
        return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6

    def evalsha(self) -> int:
        with self.client() as c:
            stats = c.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@dataclasses.dataclass
class Usage:
    """CPU µs (idle subtracted, at least 0) and ``EVALSHA`` calls of each primary over one
    phase."""

    cpu: list[float]
    calls: list[int]
    seconds: float


class Nodes:
    """The primaries of one topology, with their idle CPU rate."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.idle = [0.0] * len(nodes)  # µs of CPU per second with no client

    def measure_idle(self, seconds: float, most: float) -> None:
        """The idle rate of every primary, over windows of ``seconds``, once it is below 1 %
        of a core on each (after a fill, a node rehashes its tables for a while), or after
        ``most`` seconds."""
        deadline = time.monotonic() + most
        while True:
            before = [n.cpu_us() for n in self.nodes]
            time.sleep(seconds)  # nothing to force: the servers' own background work
            after = [n.cpu_us() for n in self.nodes]
            self.idle = [(b - a) / seconds for a, b in zip(before, after)]
            if max(self.idle) < 1e4 or time.monotonic() > deadline:
                return

    @contextmanager
    def usage(self) -> Iterator[Usage]:
        used = Usage([], [], 0.0)
        calls0 = [n.evalsha() for n in self.nodes]
        cpu0 = [n.cpu_us() for n in self.nodes]
        start = time.perf_counter()
        try:
            yield used
        finally:
            used.seconds = time.perf_counter() - start
            cpu1 = [n.cpu_us() for n in self.nodes]
            calls1 = [n.evalsha() for n in self.nodes]
            used.cpu = [max(0.0, b - a - idle * used.seconds)
                        for a, b, idle in zip(cpu0, cpu1, self.idle)]  # fmt: skip
            used.calls = [b - a for a, b in zip(calls0, calls1)]


@contextmanager
def topology(layout: str, r: int) -> Iterator[tuple[str, Any, Nodes]]:
    """A fresh standalone Redis or Redis Cluster of ``MASTERS`` primaries (``layout``: one of
    :data:`TOPOLOGIES`): its URL, a client without ``decode_responses`` and its primaries
    (which one holds ``{global}``, how many of ``r`` regions or shards each)."""
    if layout == "standalone":
        with RedisServer() as server:
            raw = redis.Redis.from_url(server.url)
            node = Node(server.port, "standalone", r, True)
            try:
                yield server.url, raw, Nodes([node])
            finally:
                raw.close()
        return
    with RedisClusterServers(masters=MASTERS, replicas=0) as servers:
        port = servers.servers[0].port
        rc = RedisCluster(host="127.0.0.1", port=port)
        nodes = [Node(int(n.port)) for n in sorted(rc.get_primaries(), key=lambda n: n.port)]
        by_port = {n.port: n for n in nodes}
        if layout == "shards":
            for tag in shard_tags(SHARDS):
                by_port[int(rc.get_node_from_key(f"{{{tag}}}").port)].regions += 1
        else:
            keys = KeySchema(redis_cluster=True)
            by_port[int(rc.get_node_from_key(keys.instances).port)].holds_global = True
            for j in range(r):
                by_port[int(rc.get_node_from_key(keys.aggregate(region_name(j))).port)].regions += 1
        for k, n in enumerate(nodes):
            n.label = f"primary {k + 1}" + (" ({global})" if n.holds_global else "")
        try:
            yield f"redis+cluster://127.0.0.1:{port}", rc, Nodes(nodes)
        finally:
            rc.close()


def fill(store: Store | Shards, raw: Any, n: int, r: int) -> tuple[float, float]:
    """Redis holds ``n`` instances x ``r`` regions: ``SEED_INSTANCES`` (at most ``n``) written
    through ``Store.flush()``, the rest copied from them (``CLONE_LUA``; ``raw``: a client
    without ``decode_responses``, for ``DUMP``), each shard's from its own seeds (the copies'
    ids are not those their shard's hash gives: the benchmark reads no instance by id).
    Seconds of each."""
    seeds = min(SEED_INSTANCES, n)
    seeded = populate(store, seeds, r)
    ids = [f"inst-{i:04d}" for i in range(seeds)]  # scale.populate's ids
    start = time.perf_counter()
    parts = getattr(store, "own", [store])  # the keyspaces written
    for k, part in enumerate(parts):
        own = [i for i in ids if store.of(i) is part]
        first = seeds + k * (n - seeds) // len(parts)
        _clone(part, raw, own, first, seeds + (k + 1) * (n - seeds) // len(parts), r)
    return seeded, time.perf_counter() - start


def _clone(store: Store, raw: Any, ids: list[str], first_n: int, end: int, r: int) -> None:
    """Copies ``inst-<first_n>`` to ``inst-<end - 1>`` of the seeds ``ids`` of one key schema."""
    keys = store.keys
    # (key naming the slot, prefix, suffix, second key's suffix, counts hash) of each slot
    meta_prefix, meta_suffix = keys.meta("\0").split("\0")
    slots = [(keys.instances, meta_prefix, meta_suffix, ":regions", "")]
    for j in range(r):
        region = region_name(j)
        prefix, suffix = keys.stats("\0", region).split("\0")
        slots.append((keys.aggregate(region), prefix, suffix, ":response_times",
                      keys.counts(region)))  # fmt: skip
    dumps: list[list[Any]] = []  # per slot: the seeds' DUMP, PTTL, ... (CLONE_LUA's ARGV)
    for _, prefix, suffix, extra, rates in slots:
        pipe = raw.pipeline(transaction=False)
        for seed in ids:
            key = prefix + seed + suffix
            for name in (key, key + extra):
                pipe.dump(name)
                pipe.pttl(name)
            pipe.hget(rates, seed) if rates else pipe.exists(key)  # a reply in its place
        replies = pipe.execute()
        args: list[Any] = []
        for k in range(0, len(replies), 5):
            main, main_ttl, second, second_ttl, score = replies[k : k + 5]
            args += [main, max(0, main_ttl), second or "", max(0, second_ttl),
                     score if rates and score is not None else ""]  # fmt: skip
        dumps.append(args)
    copied = 0
    for first in range(first_n, end, CLONE_CHUNK):
        last = min(end, first + CLONE_CHUNK) - 1
        pipe = raw.pipeline(transaction=False)
        for (key, prefix, suffix, extra, rates), args in zip(slots, dumps):
            pipe.execute_command("EVAL", CLONE_LUA, 1, key, prefix, suffix, extra, rates,
                                 first, last, *args)  # fmt: skip
        copied += int(pipe.execute()[0])
    assert copied == max(0, end - first_n), (copied, first_n, end)


def sample_flushes(
    url: str, r: int, nodes: Nodes, quick: bool, shards: int = 0
) -> tuple[Usage, int]:
    """Real application instances flushing with ``CHANGED`` of their regions changed each
    time; the primaries' usage over those flushes, and the number of flushes. With
    ``shards`` (``redis_cluster_shards``), as many instances in each shard: what a large
    fleet's ids give on average."""
    k, rounds = (4, 10) if quick else (SAMPLE_INSTANCES, ROUNDS)
    regions = [region_name(j) for j in range(r)]
    changed = max(1, round(r * CHANGED))
    options = settings(redis_url=url, redis_cluster_shards=shards)
    store = open_store(options.connection)
    parts = getattr(store, "own", [store])  # the keyspaces written
    k = -(-k // len(parts)) * len(parts)  # as many in every shard
    ids = [
        next(f"fleet-sample-{i:02d}-{n}" for n in range(10_000)
             if store.of(f"fleet-sample-{i:02d}-{n}") is parts[i % len(parts)])
        for i in range(k)
    ]  # fmt: skip
    store.close()
    instances = [
        setup(redis_url=url, instance_id=i, set_global=False, flush_interval=None,
              max_regions=r, aggregation_cache_ttl=0, redis_cluster_shards=shards)
        for i in ids
    ]  # fmt: skip
    try:
        for stats in instances:  # every region written once, then the steady state
            for region in regions:
                stats.record_hit(region, RT)
                stats.record_miss(region, RT * 5)
            assert stats.flush() and stats.flush()
        ok = 0
        with nodes.usage() as used:
            for f in range(rounds):
                for i, stats in enumerate(instances):
                    first = (i + f) * changed
                    for j in range(first, first + changed):
                        region = regions[j % r]
                        for _ in range(3):
                            stats.record_hit(region, RT)
                        stats.record_miss(region, RT * 5)
                    ok += stats.flush()
        assert ok == k * rounds, f"{k * rounds - ok} flushes failed"
    finally:
        for stats in instances:
            stats.shutdown()
    return used, k * rounds


@dataclasses.dataclass
class Reads:
    """A replica's reads: the totals, and the per-instance pass (read on ``regions`` of the
    regions, ``scale`` times fewer than all when sampled)."""

    totals: Timing
    totals_cpu: list[float]  # Redis CPU µs per read of the totals, per primary
    sampled: Timing  # the pass's reads of ``regions`` regions and the heartbeats
    sampled_cpu: list[float]  # Redis CPU µs per sampled pass, per primary
    regions: int
    scale: float
    live: int
    pairs: int  # instance x region pairs the sampled pass read

    @property
    def pass_s(self) -> float:
        """Seconds of one whole pass (median): its read of the totals, then every region."""
        return self.totals.median + self.sampled.median * self.scale

    @property
    def pass_cpu(self) -> list[float]:
        """Redis CPU µs of one whole pass, per primary."""
        return [t + p * self.scale for t, p in zip(self.totals_cpu, self.sampled_cpu)]


def reads(url: str, nodes: Nodes, r: int, quick: bool, shards: int = 0) -> Reads:
    """A ``serve`` replica's Redis reads: the totals, and the per-instance pass on
    ``PASS_REGIONS`` of the ``r`` regions."""
    s = settings(redis_url=url, aggregation_cache_ttl=0, instance_timeout=3600,
                 retention_period=7200, redis_cluster_shards=shards)  # fmt: skip
    store = open_store(s.connection)
    agg = Aggregator(store, s.aggregation, background=True)
    try:
        live = agg.view().active_count  # connections open, scripts loaded
        reps, budget = (3, 5.0) if quick else (5, 10.0)
        with nodes.usage() as t_used:
            totals = measure(lambda: agg.view(max_age=0), reps, budget)
        k = r if quick else min(r, PASS_REGIONS)
        sample = {
            part: dataclasses.replace(data, aggregates={
                region: data.aggregates[region] for region in sorted(data.aggregates)[:k]
            })
            for part, data in ((p, p.read_cluster(s.instance_timeout)) for p in store.parts)
        }  # fmt: skip
        with nodes.usage() as p_used:  # twice if the first is quick
            passes = measure(lambda: agg.refresh_instances(sample), 2, 1.0 if quick else 10.0)
        pairs = sum(len(v) for v in agg.view(max_age=0).instance_hit_ratios.values())
    finally:
        store.close()
    return Reads(
        totals, [c / totals.reps for c in t_used.cpu], passes,
        [c / passes.reps for c in p_used.cpu], k, r / k, live, pairs,
    )  # fmt: skip


@dataclasses.dataclass
class Run:
    label: str
    nodes: Nodes
    seeded_s: float
    cloned_s: float
    used_memory: int
    flushes: Usage
    n_flushes: int
    reads: Reads

    def flush_cpu(self) -> list[float]:
        """Redis CPU µs per flush of each primary."""
        return [c / self.n_flushes for c in self.flushes.cpu]

    def read_cpu(self) -> list[float]:
        """Redis CPU µs per second of each primary for ``REPLICAS`` replicas reading."""
        rd = self.reads
        return [REPLICAS * (t / TOTALS_EVERY + p / PASS_EVERY)
                for t, p in zip(rd.totals_cpu, rd.pass_cpu)]  # fmt: skip


@dataclasses.dataclass
class Filled:
    """A topology filled to the fleet's size, alive until its context ends."""

    layout: str
    url: str
    nodes: Nodes
    seeded_s: float
    cloned_s: float
    used_memory: int
    shards: int  # redis_cluster_shards


@contextmanager
def filled(layout: str, n: int, r: int) -> Iterator[Filled]:
    """:func:`topology` ``layout``, filled to ``n`` x ``r``."""
    shards = SHARDS if layout == "shards" else 0
    with topology(layout, r) as (url, raw, nodes):
        s = settings(redis_url=url, aggregation_cache_ttl=0, instance_timeout=3600,
                     retention_period=7200, redis_cluster_shards=shards)  # fmt: skip
        store = open_store(s.connection)
        try:
            mem0 = store.used_memory()
            seeded, cloned = fill(store, raw, n, r)
            used_memory = store.used_memory() - mem0
        finally:
            store.close()
        yield Filled(layout, url, nodes, seeded, cloned, used_memory, shards)


def _per_flush(phase: tuple[Usage, int]) -> float:
    """Redis CPU µs per flush of a flush phase, summed over its primaries."""
    used, count = phase
    return sum(used.cpu) / count


def _median_phase(phases: list[tuple[Usage, int]]) -> tuple[Usage, int]:
    """Of the flush phases of one topology, the one of median Redis CPU per flush."""
    return sorted(phases, key=_per_flush)[len(phases) // 2]


def pct(us_per_s: float) -> str:
    """µs of CPU per second as % of one core."""
    return f"{us_per_s / 1e4:,.2f}"


def run(quick: bool = False) -> list[Target]:
    n, r = QUICK if quick else FULL
    rate = n / FLUSH_INTERVAL  # flushes per second of the fleet
    changed = max(1, round(r * CHANGED))
    print(
        f"\n## Fleet: {n:,} instances x {r} regions, {changed} changed per flush, "
        f"flush every {FLUSH_INTERVAL:g} s, {REPLICAS} serve replicas",
        flush=True,
    )
    runs: list[Run] = []
    phases = 1 if quick else PHASES
    with ExitStack() as stack:
        tops = []
        for layout in TOPOLOGIES:
            started = time.perf_counter()
            top = stack.enter_context(filled(layout, n, r))
            tops.append(top)
            print(
                f"  {TOPOLOGIES[layout]}: {min(SEED_INSTANCES, n)} instances written through "
                f"Store.flush() in {top.seeded_s:.1f} s, copied to {n:,} in "
                f"{top.cloned_s:.1f} s ({top.used_memory / (n * r):,.0f} B per instance per "
                f"region); filled in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        # every topology filled and alive: their flush phases alternate, so that what the
        # machine does meanwhile weighs on each alike
        measured: dict[str, list[tuple[Usage, int]]] = {top.layout: [] for top in tops}
        for _ in range(phases):
            for top in tops:
                top.nodes.measure_idle(1.0, 3.0 if quick else 15.0)
                measured[top.layout].append(
                    sample_flushes(top.url, r, top.nodes, quick, top.shards)
                )
        for top in tops:
            rd = reads(top.url, top.nodes, r, quick, top.shards)
            used, count = _median_phase(measured[top.layout])
            runs.append(Run(TOPOLOGIES[top.layout], top.nodes, top.seeded_s, top.cloned_s,
                            top.used_memory, used, count, rd))  # fmt: skip
            print(
                f"  {TOPOLOGIES[top.layout]}: {rd.live:,} live instances and {rd.pairs:,} "
                f"instance x region pairs read back; flushes per phase (Redis CPU µs per "
                f"flush, all primaries): "
                + " / ".join(f"{_per_flush(phase):,.0f}" for phase in measured[top.layout]),
                flush=True,
            )
    alone, rc, sharded = runs
    alone_cpu = alone.flush_cpu()[0] * rate + alone.read_cpu()[0]

    rows: list[list[object]] = []
    for one in runs:
        for k, node in enumerate(one.nodes.nodes):
            calls = one.flushes.calls[k] / one.n_flushes
            rows.append([f"{one.label}: {node.label}", node.regions, f"{calls:.2f}",
                         f"{one.flush_cpu()[k]:,.0f}", pct(one.nodes.idle[k])])  # fmt: skip
        if len(one.nodes.nodes) > 1:
            calls = sum(one.flushes.calls) / one.n_flushes
            rows.append([f"{one.label}: all primaries", r, f"{calls:.2f}",
                         f"{sum(one.flush_cpu()):,.0f}", pct(sum(one.nodes.idle))])  # fmt: skip
    show(
        f"Fleet: Redis CPU per flush, measured ({alone.n_flushes} real flushes of "
        f"{r} regions with {changed} changed, per topology; the median of {phases} such "
        f"phases, alternated between the topologies)",
        ["primary", "regions (shards) on it", "EVALSHA per flush", "Redis CPU µs per flush",
         "idle (subtracted), % of a core"],
        rows,
    )  # fmt: skip

    rows = []
    for one in runs:
        rd = one.reads
        for k, node in enumerate(one.nodes.nodes):
            rows.append([f"{one.label}: {node.label}", f"{rd.totals_cpu[k] / 1e3:,.2f}",
                         f"{rd.pass_cpu[k] / 1e3:,.0f}", pct(one.read_cpu()[k])])  # fmt: skip
    show(
        f"Fleet: Redis CPU of a serve replica's reads (ms per read; the pass measured on "
        f"{runs[0].reads.regions} of {r} regions, scaled), and of {REPLICAS} replicas "
        f"(totals every {TOTALS_EVERY:g} s, pass every {PASS_EVERY:g} s)",
        ["primary", "totals ms", "per-instance pass ms", f"{REPLICAS} replicas, % of a core"],
        rows,
    )
    show(
        f"Fleet: the per-instance pass at {n:,} x {r} (Aggregator.refresh_instances(): "
        "one read of the totals, then every region)",
        ["topology", "regions read", "pairs read", "s min / median", "reps",
         f"whole pass s (x {r} / regions read)", "totals read ms (min / median)"],
        [[one.label, one.reads.regions, f"{one.reads.pairs:,}",
          f"{one.reads.sampled.min:,.2f} / {one.reads.sampled.median:,.2f}",
          one.reads.sampled.reps, f"{one.reads.pass_s:,.1f}",
          f"{fmt_ms(one.reads.totals.min)} / {fmt_ms(one.reads.totals.median)}"]
         for one in runs],
    )  # fmt: skip

    # extrapolated: the fleet's flush rate x CPU per flush, plus the replicas' reads
    loads: list[tuple[str, float, float, float]] = []  # label, flushes, reads, total (µs/s)
    for one in runs:
        for k, node in enumerate(one.nodes.nodes):
            f_cpu, r_cpu = one.flush_cpu()[k] * rate, one.read_cpu()[k]
            loads.append((f"{one.label}: {node.label}", f_cpu, r_cpu, f_cpu + r_cpu))
    show(
        f"Fleet: Redis CPU at {n:,} instances x {r} regions, extrapolated (% of one core; "
        f"{rate:,.0f} flushes/s)",
        ["primary", "flushes", f"{REPLICAS} replicas reading", "total", "/ standalone"],
        [[label, pct(f), pct(rd), pct(t), f"{t / alone_cpu:.0%}"] for label, f, rd, t in loads],
    )

    # the {global} slot: its primary's CPU less the region calls it served
    nodes = rc.nodes.nodes
    g = next(k for k, node in enumerate(nodes) if node.holds_global)
    others = [k for k in range(len(nodes)) if k != g]
    per_region_call = sum(rc.flushes.cpu[k] for k in others) / max(
        1, sum(rc.flushes.calls[k] for k in others)
    )
    region_calls_g = max(0, rc.flushes.calls[g] - rc.n_flushes)  # one beat per flush
    beat_us = max(0.0, rc.flushes.cpu[g] - per_region_call * region_calls_g) / rc.n_flushes
    reads_g = rc.read_cpu()[g] - sum(rc.read_cpu()[k] for k in others) / len(others)
    global_load = beat_us * rate + max(0.0, reads_g)
    totals = [rc.flush_cpu()[k] * rate + rc.read_cpu()[k] for k in range(len(nodes))]
    region_load = (sum(totals) - global_load) / len(nodes)
    g_share = totals[g] / sum(totals)
    print(
        f"\n{{global}} slot ({nodes[g].label}): beat {beat_us:,.0f} µs per flush "
        f"(its primary's CPU less {region_calls_g / rc.n_flushes:.2f} region calls per flush at "
        f"{per_region_call:,.0f} µs, the other primaries' CPU per region call), reads "
        f"{max(0.0, reads_g) / 1e4:,.2f} % of a core beyond the other primaries': "
        f"{global_load / 1e4:,.2f} % of a core at {n:,} instances; its primary carries "
        f"{g_share:.0%} of the Redis Cluster's CPU; the {{global}} slot alone would fill one "
        f"core at {1e6 / max(beat_us, 1e-9) * FLUSH_INTERVAL:,.0f} instances",
        flush=True,
    )

    worst = max(range(len(nodes)), key=lambda k: totals[k])
    parts = where_it_goes(quick)
    why = (
        f"; by region: one call per region x{parts['split'] / parts['standalone']:.2f}, a "
        f"Redis Cluster x{parts['cluster-1'] / parts['split']:.2f}, spread over {MASTERS} "
        f"primaries x{parts['cluster-3'] / parts['cluster-1']:.2f} (the layouts table)"
    )
    label = f"{n:,} x {r}"
    s_totals = [sharded.flush_cpu()[k] * rate + sharded.read_cpu()[k]
                for k in range(len(sharded.nodes.nodes))]  # fmt: skip
    s_worst = max(range(len(s_totals)), key=lambda k: s_totals[k])
    targets = [
        Target(
            f"{MASTERS}-master Redis Cluster at {label}, 10 % changed, flush every "
            f"{FLUSH_INTERVAL:g} s, {REPLICAS} replicas: each primary <= "
            f"{MASTER_SHARE:.0%} of the standalone Redis CPU (redis_cluster_shards "
            f"{SHARDS})",
            max(s_totals) <= MASTER_SHARE * alone_cpu,
            f"busiest {sharded.nodes.nodes[s_worst].label}: {s_totals[s_worst] / 1e4:,.1f} % "
            f"of a core = {s_totals[s_worst] / alone_cpu:.0%} of standalone's "
            f"{alone_cpu / 1e4:,.1f} %; primaries "
            + " / ".join(f"{t / 1e4:,.1f}" for t in s_totals)
            + f" %; by region (the default) {totals[worst] / alone_cpu:.0%}, primaries "
            + " / ".join(f"{t / 1e4:,.1f}" for t in totals)
            + " %"
            + why,
        ),
        Target(
            f"the {{global}} slot is not the bottleneck at {label} (its own load below a "
            "primary's share of the region load)",
            global_load <= region_load,
            f"{{global}} slot {global_load / 1e4:,.2f} % of a core (beat {beat_us:,.0f} µs per "
            f"flush) against {region_load / 1e4:,.1f} % of region load per primary; its "
            f"primary carries {g_share:.0%} of the Redis Cluster's CPU",
        ),
    ]
    for one in runs:
        rd = one.reads
        sampled = f" from {rd.regions} regions x {rd.scale:g}" if rd.scale != 1 else ""
        targets.append(
            Target(
                f"per-instance pass < {PASS_LIMIT_S:g} s at {label}, {one.label}",
                rd.pass_s < PASS_LIMIT_S,
                f"{rd.pass_s:,.1f} s{sampled} (median of {rd.sampled.reps}); Redis CPU "
                f"{sum(rd.pass_cpu) / 1e3:,.0f} ms per pass",
            )
        )
    return judged("Fleet targets", targets, quick)


class _ClusterCallsOnStandalone(store_module.RedisClusterTopology):
    """The Redis Cluster's key layout and calls (a beat, then one call per region) on a
    standalone Redis: what splitting a write costs, apart from spreading it."""

    read_hashes = store_module.Standalone.read_hashes


@contextmanager
def _layout(name: str, r: int) -> Iterator[tuple[str, Nodes]]:
    """A fresh Redis of one of the layouts :func:`where_it_goes` compares: its URL and
    primaries."""
    if name in ("standalone", "split"):
        with RedisServer() as server:
            node = Node(server.port, name, r, True)
            if name == "standalone":
                yield server.url, Nodes([node])
                return
            with mock.patch.object(store_module, "Standalone", _ClusterCallsOnStandalone):
                yield server.url, Nodes([node])
        return
    with RedisClusterServers(masters=1 if name == "cluster-1" else MASTERS, replicas=0) as rc:
        ports = [server.port for server in rc.servers]
        yield f"redis+cluster://127.0.0.1:{ports[0]}", Nodes([Node(p) for p in ports])


#: the layouts :func:`where_it_goes` compares, and what each adds to the one before
LAYOUTS = (
    ("standalone", "standalone Redis: one flush.lua call per flush"),
    ("split", "standalone Redis, the Redis Cluster's calls: beat.lua + one regions.lua per region"),
    ("cluster-1", "Redis Cluster of 1 primary (every slot), same calls"),
    ("cluster-3", f"Redis Cluster of {MASTERS} primaries, same calls"),
    ("sharded", f"Redis Cluster of {MASTERS} primaries, one flush.lua call per flush: every "
     f"key of an instance under its shard's hash tag (redis_cluster_shards {SHARDS})"),
)  # fmt: skip


def where_it_goes(quick: bool) -> dict[str, float]:
    """Redis CPU per flush of the same flushes (``SAMPLE_INSTANCES`` instances x 100
    regions, ``CHANGED`` of them changed) in each of :data:`LAYOUTS`, summed over the
    primaries: what splitting a write into one call per hash slot costs, and what
    spreading the calls over primaries adds. Printed; ``{layout: µs per flush}``."""
    r = 10 if quick else 100
    cpu: dict[str, float] = {}
    busiest: dict[str, float] = {}
    for name, _ in LAYOUTS:
        with _layout(name, r) as (url, nodes):
            nodes.measure_idle(1.0, 3.0 if quick else 10.0)
            shards = SHARDS if name == "sharded" else 0
            used, count = sample_flushes(url, r, nodes, quick, shards)
            cpu[name] = sum(used.cpu) / count
            busiest[name] = max(used.cpu) / count
    alone = cpu["standalone"]
    rows, before = [], alone
    for name, label in LAYOUTS:
        rows.append([label, f"{cpu[name]:,.0f}", f"{cpu[name] / alone:.2f}x",
                     f"{cpu[name] / before:.2f}x", f"{busiest[name] / alone:.0%}"])  # fmt: skip
        before = cpu[name]
    show(
        f"Fleet: where a Redis Cluster's CPU goes (the same flushes of {r} regions, "
        f"{max(1, round(r * CHANGED))} changed, in each layout; Redis CPU summed over primaries)",
        ["layout", "µs per flush", "x standalone", "x the row above",
         "busiest primary / standalone"],
        rows,
    )  # fmt: skip
    return cpu


def main() -> None:
    from .common import arguments

    run(quick=arguments(__doc__ or "").quick)


if __name__ == "__main__":
    main()

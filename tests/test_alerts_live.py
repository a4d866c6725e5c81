"""Every alert of grafana/alerts.yml, evaluated by a real Prometheus on what it scraped from
three real `serve` replicas, each reading Redis through its own real TCP proxy, while real
application processes record traffic: each expression selects exactly what it must when its
failure is provoked (one replica slowed, cut off, every one cut off, a process killed, every
application stopped, memory filled, a malformed entry, a region's totals deleted, an
application cut off from Redis, replicas stopped) and nothing when it
must not, in particular while one replica is cut off from Redis and keeps its last good
values. The expressions are evaluated through the query API as Prometheus loaded them (their
``for`` is the unit tests' job: tests/promtool/alerts_test.yml). Meanwhile a fourth replica,
scraped as another job, reads Redis through a proxy that trickles its replies (each byte
within the socket timeout, so Redis stays up for it, but its refresh never ends): scrapes
keep getting its last view and ConduitCacheAggregationStale, with its ``for``, fires for it
alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.keys import KeySchema

from .tcp_proxy import TcpProxy
from .test_prometheus_tools import (
    ALERTS,
    HERE,
    JOB,
    active_alerts,
    alert_names,
    api,
    query,
    run_prometheus,
)
from .test_prometheus_tools import wait_for as wait

#: the replicas' settings: every scrape reads Redis; short timeouts so that a cut is seen fast
SERVE_ENV = {
    "CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0",
    "CONDUIT_CACHE_STATS_AGGREGATION_INTERVAL": "1",
    "CONDUIT_CACHE_STATS_SOCKET_TIMEOUT": "1",
    "CONDUIT_CACHE_STATS_CONNECT_TIMEOUT": "1",
    "CONDUIT_CACHE_STATS_FLUSH_INTERVAL": "1",
    "CONDUIT_CACHE_STATS_INSTANCE_TIMEOUT": "3",
    "CONDUIT_CACHE_STATS_RETENTION_PERIOD": "4",
}
#: (ProviderResponses hits, misses, Sessions hits, misses) per step of each application:
#: ProviderResponses at 0.8 with the instances 10 points apart (drift), Sessions at 0.2
TRAFFIC = {"api-1": (9, 1, 2, 8), "api-2": (7, 3, 2, 8)}
KEYS = KeySchema()
#: the job of the replica whose refresh never ends (its own job: its last view, which it
#: keeps publishing, would otherwise stand beside the other replicas' cluster series)
STUCK_JOB = "conduit-cache-stuck"
#: seconds between two bytes of a reply to the stuck replica, and its socket timeout: each
#: byte comes well within it, even on a loaded machine (a read that times out ends the refresh
#: and reports Redis down, which the stale alert rightly leaves to ConduitCacheRedisDown), and
#: its Redis read's replies (some 2 KB) take minutes
TRICKLE = 0.5
STUCK_SOCKET_TIMEOUT = "10"


class Replica:
    """A real `serve` process reading Redis through its own proxy."""

    def __init__(self, name: str, redis_port: int, **env: str) -> None:
        self.name = name
        self.proxy = TcpProxy(("127.0.0.1", redis_port))
        self.port = free_port()
        self.instance = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url",
             self.proxy.url(), "--port", str(self.port)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, **SERVE_ENV, **env},
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().startswith("serving")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proxy.close()


def application(
    url: str, instance_id: str, traffic: str = "", ticks: Path | None = None
) -> subprocess.Popen[str]:
    """A traffic process recording ``TRAFFIC[traffic or instance_id]`` every 0.1 s (writing
    ``<time> <hits so far>`` to ``ticks`` after each step)."""
    env = {**os.environ, **({"TRAFFIC_TICKS": str(ticks)} if ticks else {})}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "traffic_process.py"), url, instance_id,
         *map(str, TRAFFIC[traffic or instance_id])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "recording"
    return proc


@pytest.fixture
def replicas(redis_server: RedisServer) -> Iterator[dict[str, Replica]]:
    started: dict[str, Replica] = {}
    try:
        for name in "abc":
            started[name] = Replica(name, redis_server.port)
        started["d"] = Replica(
            "d", redis_server.port, CONDUIT_CACHE_STATS_SOCKET_TIMEOUT=STUCK_SOCKET_TIMEOUT
        )
        yield started
    finally:
        for replica in started.values():
            replica.proxy.trickle = 0.0  # its refresh ends: it can stop
            replica.stop()


@pytest.mark.slow
def test_every_alert_fires_when_it_must_with_one_replica_cut_off(
    redis_server: RedisServer, replicas: dict[str, Replica], tmp_path: Path, r: Any
) -> None:
    a, b, c, d = (replicas[name] for name in "abcd")
    targets = ", ".join(f"'{rep.instance}'" for rep in (a, b, c))
    config = (
        "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        f"    static_configs: [{{targets: [{targets}]}}]\n"
        f"  - job_name: {STUCK_JOB}\n"
        f"    static_configs: [{{targets: ['{d.instance}']}}]\n"
    )
    apps = {i: application(redis_server.url, i) for i in TRAFFIC}
    try:
        with run_prometheus(tmp_path, config) as prometheus:
            stuck_since = stick(prometheus, d)
            run_scenario(prometheus, redis_server, apps, a, b, c, r)
            stale_fires_for_the_stuck_replica_alone(prometheus, d, stuck_since)
    finally:
        for proc in apps.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def run_scenario(
    prometheus: str,
    redis_server: RedisServer,
    apps: dict[str, subprocess.Popen[str]],
    a: Replica,
    b: Replica,
    c: Replica,
    r: Any,
) -> None:
    reply = wait("the rules loaded", lambda: api(prometheus, "/api/v1/rules")["data"]["groups"])
    rules = {rule["name"]: rule["query"] for group in reply for rule in group["rules"]}
    assert set(rules) == set(alert_names())

    def selected(name: str, expr: str | None = None) -> list[dict[str, str]]:
        """The label sets the alert's expression selects now (in the job of a, b, c)."""
        found = [s["metric"] for s in query(prometheus, expr or rules[name])]
        return [labels for labels in found if labels.get("job") == JOB]

    def instances(name: str, expr: str | None = None) -> set[str]:
        return {labels.get("instance", "") for labels in selected(name, expr)}

    def regions(name: str) -> set[str]:
        return {labels["region"] for labels in selected(name)}

    def scraped(expr: str) -> list[dict[str, Any]]:
        return query(prometheus, f'{expr}{{job="{JOB}"}}')

    def value(expr: str, instance: str) -> float | None:
        for series in scraped(expr):
            if series["metric"]["instance"] == instance:
                return float(series["value"][1])
        return None

    def silent(*names: str) -> None:
        for name in names:
            assert selected(name) == [], name

    everything = set(rules)
    # -- healthy: three replicas, two applications; only the traffic alerts select, and
    #    each only its region (drift 10 points in ProviderResponses, hit ratio 0.2 in Sessions)
    wait(
        "every replica publishes two live instances",
        lambda: [s["value"][1] for s in scraped("conduit_cache_instances_active")] == ["2"] * 3,
    )
    wait("drift and hit-ratio rules to see the traffic",
         lambda: regions("ConduitCacheDriftHigh") == {"ProviderResponses"}
         and regions("ConduitCacheLowHitRatio") == {"Sessions"})  # fmt: skip
    silent(*everything - {"ConduitCacheDriftHigh", "ConduitCacheLowHitRatio"})

    # -- Redis loses the Sessions totals (a DEL; an eviction does the same): the applications
    #    rebuild them, and the loss (what ended instances had added) is reported once, by
    #    region: every replica publishes 0 before it, so that it is an increase
    assert {float(s["value"][1]) for s in scraped("conduit_cache_data_losses_total")} == {0.0}
    r.delete(KEYS.aggregate("Sessions"))
    wait("the loss's alert", lambda: selected("ConduitCacheDataLost"))
    assert selected("ConduitCacheDataLost") == [{"job": JOB, "region": "Sessions"}]

    # -- the first failed flushes of a kind no series had (not one published at 0): the
    #    kindless counter, on every replica at 0 before any failure, counts them (the kind's
    #    own series is born at its count, which increase() does not see). The hash is written
    #    as an application's next successful write carries its failures (tests/test_partitions.py)
    every_kind = "conduit_cache_instances_flush_errors_all_kinds_total"
    assert [s["value"][1] for s in scraped(every_kind)] == ["0"] * 3
    silent("ConduitCacheInstanceFlushErrors")
    r.hincrby(KEYS.flush_errors, "BusyLoadingError", 2)
    wait("the flush errors' alert", lambda: selected("ConduitCacheInstanceFlushErrors"))
    assert selected("ConduitCacheInstanceFlushErrors") == [{"job": JOB}]
    # the per-kind series alone (what the rule summed before) see no increase at all
    by_kind = "increase(conduit_cache_instances_flush_errors_total[10m])"
    assert not selected("", f"sum without (kind) (max without (instance, pod) ({by_kind})) > 0")

    # -- an application cut off from Redis (its own proxy) fails to flush; its next write
    #    carries the failures, and they are alerted on once for the job
    with TcpProxy(("127.0.0.1", redis_server.port)) as path:
        api3 = application(path.url(), "api-3", traffic="api-1")
        try:
            wait("api-3 live", lambda: len(r.zrange(KEYS.instances, 0, -1)) == 3)
            path.cut()
            wait("api-3's flushes to fail", lambda: path.refused >= 3)
            path.restore()
            wait("api-3's failures carried", lambda: (value(every_kind, a.instance) or 0) > 2)
            assert selected("ConduitCacheInstanceFlushErrors") == [{"job": JOB}]
        finally:
            assert api3.stdin is not None
            api3.stdin.close()  # a clean shutdown: it departs
            assert api3.wait(15) == 0

    # -- replica c slowed (every forwarded chunk 0.15 s late): c alone is slow
    c.proxy.delay = 0.15
    wait(
        "c's aggregation to be slow",
        lambda: instances("ConduitCacheAggregationSlow") == {c.instance},
    )
    c.proxy.delay = 0.0
    wait("c to be fast again", lambda: not selected("ConduitCacheAggregationSlow"))

    # -- Redis memory over a threshold, seen by every replica (the rule with a threshold
    #    40 MiB above the memory now: 1 GiB cannot be filled in a test)
    base = max(float(s["value"][1]) for s in scraped("conduit_cache_redis_memory_bytes"))
    memory_rule = rules["ConduitCacheRedisMemoryHigh"].replace(
        "1.073741824e+09", str(int(base) + 40 * 2**20)
    )
    assert memory_rule != rules["ConduitCacheRedisMemoryHigh"]
    r.set("ballast", "x" * (64 * 2**20))
    high = {a.instance, b.instance, c.instance}
    wait("every replica to see the memory", lambda: instances("", memory_rule) == high)

    # -- c cut off from Redis: it publishes only its own series
    c.proxy.cut()
    wait("c's redis_up 0", lambda: value("conduit_cache_redis_up", c.instance) == 0)
    wait("c's cluster series to go stale",
         lambda: {s["metric"]["instance"] for s in scraped("conduit_cache_instances_active")}
         == {a.instance, b.instance})  # fmt: skip
    assert instances("ConduitCacheExporterReplicaRedisDown") == {c.instance}
    silent("ConduitCacheRedisDown", "ConduitCacheNoLiveInstances", "ConduitCacheAggregationStale",
           "ConduitCacheExporterDown", "ConduitCacheExporterReplicaDown")  # fmt: skip
    # the memory is freed: c saw it high, but no longer masks a and b
    r.delete("ballast")
    wait("the memory rule to clear", lambda: not selected("", memory_rule))
    assert value("conduit_cache_redis_memory_bytes", c.instance) is None

    # -- api-2 killed (no clean shutdown): missing, named, from a and b
    apps["api-2"].send_signal(signal.SIGKILL)
    apps["api-2"].wait()
    wait(
        "api-2 missing",
        lambda: (
            {s.get("instance_id") for s in selected("ConduitCacheInstanceMissing")} == {"api-2"}
        ),
    )
    # -- every application stopped while c is cut off: no live instance
    proc = apps["api-1"]
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    assert proc.wait(15) == 0
    wait("ConduitCacheNoLiveInstances to select", lambda: selected("ConduitCacheNoLiveInstances"))
    assert selected("ConduitCacheNoLiveInstances") == [{"job": JOB}]
    # -- cleanup removes api-2: the missing alert clears (c's last good value does not hold it)
    wait("cleanup to remove api-2 (retention_period 4 s)", lambda: cleanup(redis_server.url))
    assert r.zscore(KEYS.instances, "api-2") is None
    wait(
        "ConduitCacheInstanceMissing to clear", lambda: not selected("ConduitCacheInstanceMissing")
    )

    # -- a malformed entry: one alert naming its key (a and b read it, each counts it once)
    silent("ConduitCacheAggregationErrors")
    r.hset(KEYS.aggregate("Sessions"), "hit_count", "x y")
    wait("the malformed entry's alert", lambda: selected("ConduitCacheAggregationErrors"))
    assert selected("ConduitCacheAggregationErrors") == [
        {"job": JOB, "key": KEYS.aggregate("Sessions")}
    ]
    errors = "conduit_cache_aggregation_errors_total"
    wait("a and b to count it once each",
         lambda: {value(errors, i) for i in (a.instance, b.instance)} == {1})  # fmt: skip
    assert selected("ConduitCacheAggregationErrors") == [
        {"job": JOB, "key": KEYS.aggregate("Sessions")}
    ]

    # -- c reads Redis again
    c.proxy.restore()
    wait(
        "c to publish the cluster series again",
        lambda: len(scraped("conduit_cache_instances_active")) == 3,
    )
    wait(
        "ConduitCacheExporterReplicaRedisDown to clear",
        lambda: not selected("ConduitCacheExporterReplicaRedisDown"),
    )

    # -- every replica cut off: Redis down for the exporter, once; no cluster alert
    for replica in (a, b, c):
        replica.proxy.cut()
    wait("ConduitCacheRedisDown to select", lambda: selected("ConduitCacheRedisDown"))
    assert selected("ConduitCacheRedisDown") == [{"job": JOB}]
    wait("every cluster series to go stale", lambda: not scraped("conduit_cache_instances_active"))
    silent("ConduitCacheNoLiveInstances", "ConduitCacheExporterReplicaRedisDown",
           "ConduitCacheAggregationStale", "ConduitCacheInstanceMissing")  # fmt: skip

    # -- replica c stopped: its target is down, the others serve
    c.stop()
    wait("c's target down", lambda: instances("ConduitCacheExporterReplicaDown") == {c.instance})
    silent("ConduitCacheExporterDown")
    # -- every replica stopped: one critical alert for the job, no replica alert
    a.stop()
    b.stop()
    wait("ConduitCacheExporterDown to select", lambda: selected("ConduitCacheExporterDown"))
    assert selected("ConduitCacheExporterDown") == [{"job": JOB}]
    silent("ConduitCacheExporterReplicaDown", "ConduitCacheNoLiveInstances")


def stick(prometheus: str, d: Replica) -> float:
    """Once Prometheus has scraped a good view of ``d``, trickle its Redis replies: its next
    refresh never ends while each read gets a byte within its socket timeout. Returns the
    time of its last good read."""
    up = f'conduit_cache_redis_up{{job="{STUCK_JOB}"}} == 1'
    wait("d's first good view", lambda: query(prometheus, up), timeout=60)
    d.proxy.trickle = TRICKLE
    stamp = f'conduit_cache_last_successful_aggregation_timestamp_seconds{{job="{STUCK_JOB}"}}'

    def read_at() -> list[float]:
        return [float(s["value"][1]) for s in query(prometheus, stamp)]

    def last_read() -> float | None:  # the view d keeps serving: its time stops moving
        first = read_at()
        time.sleep(5)
        again = read_at()
        return again[0] if first and again == first else None

    stuck_since: float = wait("d's refresh to hang", last_read, timeout=60)
    return stuck_since


def stale_fires_for_the_stuck_replica_alone(
    prometheus: str, d: Replica, stuck_since: float
) -> None:
    """ConduitCacheAggregationStale, with its ``for``, fires for ``d`` (Redis up, its last
    successful aggregation more than 120 s old), and for no replica of the other job."""
    firing = lambda: [  # noqa: E731
        alert
        for alert in active_alerts(prometheus, "ConduitCacheAggregationStale")
        if alert["state"] == "firing"
    ]
    left = stuck_since + 120 + 60 + 30 - time.time()  # its threshold, its `for`, a margin
    alerts = wait("the stale alert to fire for d", firing, timeout=max(left, 10))
    assert [(a["labels"]["job"], a["labels"]["instance"]) for a in alerts] == [
        (STUCK_JOB, d.instance)
    ]
    fired = time.time() - stuck_since
    assert fired >= 180  # not before its threshold and its `for`
    assert float(alerts[0]["value"]) > 120
    print(f"AggregationStale firing for the stuck replica {fired:.0f} s after its last good "
          f"read (value {float(alerts[0]['value']):.0f} s)")  # fmt: skip
    # Redis was up for it all along, as it reported (no timeout: a byte at a time)
    redis_up = query(prometheus, f'min_over_time(conduit_cache_redis_up{{job="{STUCK_JOB}"}}[3m])')
    assert [s["value"][1] for s in redis_up] == ["1"]
    assert [a for a in active_alerts(prometheus, "ConduitCacheAggregationStale")
            if a["labels"]["job"] == JOB] == []  # fmt: skip
    # its view stale (older than ServeSettings.stale_after, 30 s here), d publishes its own series
    # only, as a replica cut off from Redis does: no stale cluster series for the rules'
    # max over replicas to take; its data age keeps growing
    for name in ("conduit_cache_hits_total", "conduit_cache_instances_active"):
        assert query(prometheus, f'{name}{{job="{STUCK_JOB}"}}') == [], name
    age = query(prometheus, f'conduit_cache_exporter_data_age_seconds{{job="{STUCK_JOB}"}}')
    assert [float(s["value"][1]) > 120 for s in age] == [True]


def cleanup(url: str) -> bool:
    """Run `conduit-otel-cache cleanup` (retention_period 4 s); True when it removed one."""
    done = subprocess.run(
        [sys.executable, "-m", "conduit_otel_cache.cli", "cleanup", "--redis-url", url],
        capture_output=True, text=True, timeout=30, env={**os.environ, **SERVE_ENV},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return not done.stdout.startswith("removed 0 ")


@pytest.mark.slow
@pytest.mark.usefixtures("private_redis")  # restarts Redis empty
def test_rate_stays_true_across_an_empty_redis_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two applications record while Redis restarts empty (no persistence): the live
    instances write their lifetime counts again, the departed part is gone from Redis, and
    `serve` keeps the counters where they were, so `rate()` over every window that spans the
    restart stays within 10 % of the true rate, what the applications recorded in that
    window (by their own timestamped tallies). Without that, 2.2 times the true rate."""
    replica = Replica("a", redis_server.port)
    config = (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        f"    static_configs: [{{targets: ['{replica.instance}']}}]\n"
    )
    apps: dict[str, subprocess.Popen[str]] = {}
    try:
        with run_prometheus(tmp_path, config) as prometheus:
            # a departed instance: its counts are in Redis's totals, and the loss takes them
            gone = application(redis_server.url, "api-0", "api-1")
            time.sleep(3)  # it records traffic meanwhile (what the loss will take)
            stop_cleanly(gone)
            ticks = {i: tmp_path / f"{i}.ticks" for i in ("api-1", "api-2")}
            apps = {i: application(redis_server.url, i, ticks=ticks[i]) for i in ticks}
            hits = f'conduit_cache_hits_total{{job="{JOB}"}}'
            rate = f"sum(max without (instance, pod) (rate({hits}[30s])))"
            time.sleep(35)  # real traffic for rate() to measure before the restart
            restart = time.time()
            redis_server.kill()
            redis_server.start()
            time.sleep(40)  # and after it
            for proc in apps.values():
                stop_cleanly(proc)
            rates = {}
            for at in range(int(restart) - 5, int(restart) + 35):
                reply = api(prometheus, "/api/v1/query", query=rate, time=str(at))
                result = reply["data"]["result"]
                rates[at - int(restart)] = float(result[0]["value"][1]) if result else None
    finally:
        for proc in apps.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        replica.stop()
    # the true rate over each window: what the applications recorded in it, by their ticks
    recorded = [tally(path) for path in ticks.values()]
    true = {
        t: sum(hits_at(r, int(restart) + t) - hits_at(r, int(restart) + t - 30) for r in recorded)
        / 30
        for t in rates
    }
    off = {t: (v / true[t] - 1 if v is not None else None) for t, v in rates.items()}
    print("seconds from the restart: rate / true rate - 1: "
          + " ".join(f"{t}:{d:+.3f}" for t, d in off.items() if d is not None)
          + f" (true rate about {true[0]:.0f} hits/s)")  # fmt: skip
    assert all(d is not None and abs(d) <= 0.10 for d in off.values()), (true, rates)


def tally(path: Path) -> list[tuple[float, int]]:
    """``(time, hits so far)`` of a traffic process, from its ticks file."""
    rows = (line.split() for line in path.read_text().splitlines())
    return [(float(t), int(h)) for t, h in rows]


def hits_at(ticks: list[tuple[float, int]], at: float) -> float:
    """Hits recorded by ``at``, interpolated between the ticks around it."""
    before = [(t, h) for t, h in ticks if t <= at]
    after = [(t, h) for t, h in ticks if t > at]
    if not before or not after:
        return float(before[-1][1] if before else 0)
    (t0, h0), (t1, h1) = before[-1], after[0]
    return h0 + (h1 - h0) * (at - t0) / (t1 - t0)


def stop_cleanly(proc: subprocess.Popen[str]) -> dict[str, dict[str, int]]:
    """Stop a traffic process: its totals, once it has flushed and shut down cleanly."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    word, _, payload = proc.stdout.readline().partition(" ")
    assert word == "done"
    proc.stdin.close()
    assert proc.wait(15) == 0
    totals: dict[str, dict[str, int]] = json.loads(payload)
    return totals

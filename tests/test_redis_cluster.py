"""The same exact totals on a real Redis Cluster (3 primaries, 3 replicas, loopback).

Keys are hash-tagged (``{global}`` for the instance-level keys, ``{<region>}`` for a region's
keys) and a flush is one pipeline of one script call per hash slot; see store.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.config import Settings

from .conftest import MakeStats, scrape_once, wait_for
from .servers import RedisClusterServers, chosen_server, running_server

pytestmark = pytest.mark.redis_cluster

# Regions whose hash tags fall in the slot ranges of three different primaries
# (0-5460, 5461-10922, 10923-16383): checked by test_regions_land_on_different_primaries.
REGIONS = ("Users", "ProviderResponses", "Sessions")
REGION = "ProviderResponses"


@pytest.fixture
def url(redis_cluster: RedisClusterServers) -> str:
    return f"redis+cluster://127.0.0.1:{redis_cluster.servers[0].port}"


@pytest.fixture
def redis_url(url: str, rc: RedisCluster) -> str:
    """The Redis Cluster, for conftest's make_stats (rc has emptied it)."""
    return url


def record(stats: CacheStatistics, region: str, hits: int, misses: int, sets: int = 0,
           evictions: int = 0, size: int = 0) -> None:  # fmt: skip
    for _ in range(hits):
        stats.record_hit(region, 0.002)
    for _ in range(misses):
        stats.record_miss(region, 0.03)
    for _ in range(sets):
        stats.record_set(region)
    for _ in range(evictions):
        stats.record_eviction(region)
    stats.set_size_bytes(region, size)


def owner_port(rc: RedisCluster, key: str) -> int:
    """Port of the primary that serves ``key`` now."""
    return int(rc.get_node_from_key(key).port)


def on_node(port: int, *args: Any) -> Any:
    """A command sent to one node only (no redirection): MOVED if the key is elsewhere."""
    with redis.Redis(port=port, decode_responses=True) as node:
        return node.execute_command(*args)


PLAN = {"api-1": (100, 10, 5, 1, 1000), "api-2": (200, 50, 7, 2, 2000),
        "api-3": (50, 50, 9, 3, 4000)}  # fmt: skip


def test_the_nodes_run_the_chosen_server(redis_cluster: RedisClusterServers) -> None:
    assert {running_server(node.port) for node in redis_cluster.servers} == {chosen_server()}


def test_regions_land_on_different_primaries(make_stats: MakeStats, rc: RedisCluster) -> None:
    stats = make_stats("api-1")
    for region in REGIONS:
        record(stats, region, 1, 0)
    assert stats.flush()
    owners = {}
    for region in REGIONS:
        keys = [f"conduit:cache:{{{region}}}:stats:api-1", f"conduit:cache:{{{region}}}:aggregated",
                f"conduit:cache:{{{region}}}:counts"]  # fmt: skip
        assert len({rc.keyslot(k) for k in keys}) == 1  # one slot: one script call
        port = owner_port(rc, keys[0])
        assert [on_node(port, "EXISTS", k) for k in keys] == [1, 1, 1]  # really on that node
        owners[region] = port
    assert len(set(owners.values())) == 3
    instance_keys = ["conduit:cache:{global}:instances", "conduit:cache:{global}:regions",
                     "conduit:cache:{global}:instance:api-1",
                     "conduit:cache:{global}:instance:api-1:regions"]  # fmt: skip
    assert len({rc.keyslot(k) for k in instance_keys}) == 1
    port = owner_port(rc, instance_keys[0])
    assert [on_node(port, "EXISTS", k) for k in instance_keys] == [1, 1, 1, 1]
    # the standalone schema is not written on a Redis Cluster
    assert rc.exists(f"conduit:cache:stats:aggregated:{REGION}", "conduit:cache:instances") == 0


def test_three_instances_exact_totals_everywhere(
    make_stats: MakeStats, rc: RedisCluster, url: str
) -> None:
    handles = {i: make_stats(i) for i in PLAN}
    for i, (h, m, s, e, size) in PLAN.items():
        for n, region in enumerate(REGIONS):  # region n gets (n + 1) times the plan
            record(handles[i], region, h * (n + 1), m * (n + 1), s, e, size * (n + 1))
        assert handles[i].flush()
    for i, (h, m, s, e, size) in PLAN.items():
        stored = rc.hgetall(f"conduit:cache:{{{REGION}}}:stats:{i}")
        assert (stored["hit_count"], stored["miss_count"], stored["set_count"],
                stored["eviction_count"], stored["size_bytes"], stored["token"]) == (
                    str(2 * h), str(2 * m), str(s), str(e), str(2 * size),
                    handles[i].exporter.token)  # fmt: skip
    for n, region in enumerate(REGIONS):
        cluster = handles["api-1"].cluster_statistics(region)
        assert (cluster.hit_count, cluster.miss_count) == (350 * (n + 1), 110 * (n + 1))
        assert (cluster.set_count, cluster.eviction_count) == (21, 6)
        assert cluster.size_bytes == 7000 * (n + 1) and cluster.instance_count == 3
        assert cluster.response_times.count == 460 * (n + 1)
        assert cluster.response_times.sum == pytest.approx(0.002 * 350 * (n + 1)
                                                           + 0.03 * 110 * (n + 1))  # fmt: skip
    per = handles["api-2"].per_instance_statistics(REGION)
    assert {i: (s.hit_count, s.size_bytes, s.live) for i, s in per.items()} == {
        "api-1": (200, 2000, True), "api-2": (400, 4000, True), "api-3": (100, 8000, True)
    }  # fmt: skip
    view = handles["api-3"].cluster_view()
    assert view.active_count == 3 and view.redis_up
    assert handles["api-3"].aggregator.instances() == (["api-1", "api-2", "api-3"], [])
    assert view.instance_hit_ratios[REGION] == {
        i: pytest.approx(h / (h + m)) for i, (h, m, *_) in PLAN.items()
    }
    live = 100 * sum(h for h, *_ in PLAN.values()) / sum(h + m for h, m, *_ in PLAN.values())
    expected = max(abs(100 * h / (h + m) - live) for h, m, *_ in PLAN.values())
    assert view.drift[REGION] == pytest.approx(expected) and expected > 5  # read per slot
    # memory is summed over the three primaries
    node_memory = [int(on_node(p, "INFO", "memory")["used_memory"]) for p in primaries(rc)]
    assert view.redis_memory_bytes > max(node_memory)

    text = scrape_once(redis_url=url)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    for n, region in enumerate(REGIONS):
        label = (("region", region),)
        assert samples[("conduit_cache_hits_total", label)] == 350 * (n + 1)
        assert samples[("conduit_cache_misses_total", label)] == 110 * (n + 1)
        assert samples[("conduit_cache_sets_total", label)] == 21
        assert samples[("conduit_cache_evictions_total", label)] == 6
        assert samples[("conduit_cache_size_bytes", label)] == 7000 * (n + 1)
        assert samples[("conduit_cache_response_time_seconds_count", label)] == 460 * (n + 1)
    assert samples[("conduit_cache_instances_active", ())] == 3
    assert samples[("conduit_cache_redis_up", ())] == 1
    assert samples[("conduit_cache_health_status", ())] == 1  # Degraded: drift 26 % > 5 %
    api_3 = (("instance_id", "api-3"), ("region", REGION))
    assert samples[("conduit_cache_instance_hit_ratio", api_3)] == pytest.approx(0.5)


def primaries(rc: RedisCluster) -> list[int]:
    return sorted(int(node.port) for node in rc.get_primaries())


def test_same_flush_twice_changes_nothing(make_stats: MakeStats, rc: RedisCluster) -> None:
    stats = make_stats("api-1")
    record(stats, REGION, 10, 5, size=100)
    assert stats.flush()
    key = f"conduit:cache:{{{REGION}}}:aggregated"
    before = rc.hgetall(key)
    assert stats.flush() and stats.flush()
    after = rc.hgetall(key)
    before.pop("last_aggregated"), after.pop("last_aggregated")
    assert before == after and after["hit_count"] == "10" and after["instance_count"] == "1"
    assert stats.cluster_statistics(REGION).hit_count == 10


def test_every_key_has_a_ttl(make_stats: MakeStats, rc: RedisCluster) -> None:
    stats = make_stats("api-1", statistics_ttl=3600)
    for region in REGIONS:
        record(stats, region, 1, 1)
    assert stats.flush()
    keys = list(rc.scan_iter("conduit:*", target_nodes=RedisCluster.PRIMARIES))
    # the layout, the instance's 4 keys; per region: stats hash, aggregated hash and the
    # record of its writes, counts hash, response-time samples list
    assert "conduit:cache:layouts" in keys
    assert len(keys) == 5 + 5 * len(REGIONS)
    for key in keys:
        assert 0 < rc.ttl(key) <= 3600, key


def test_shutdown_keeps_counters_and_drops_live_gauges(
    make_stats: MakeStats, rc: RedisCluster
) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, REGION, 10, 0, size=100)
    record(b, REGION, 20, 0, size=200)
    record(b, "Users", 4, 0, size=7)
    assert a.flush() and b.flush()
    b.shutdown()
    b.shutdown()  # idempotent
    cluster = a.cluster_statistics(REGION)
    assert (cluster.hit_count, cluster.size_bytes, cluster.instance_count) == (30, 100, 1)
    users = a.cluster_statistics("Users")
    assert (users.hit_count, users.size_bytes, users.instance_count) == (4, 0, 0)
    assert a.cluster_view().active_count == 1
    assert a.aggregator.instances() == (["api-1"], [])
    assert rc.zscore("conduit:cache:{global}:instances", "api-2") is None
    assert rc.exists(f"conduit:cache:{{{REGION}}}:stats:api-2", "conduit:cache:{Users}:stats:api-2",
                     "conduit:cache:{global}:instance:api-2",
                     "conduit:cache:{global}:instance:api-2:regions") == 0  # fmt: skip
    assert rc.hgetall(f"conduit:cache:{{{REGION}}}:counts") == {"api-1": "10 0"}
    record(b, REGION, 5, 0)  # after shutdown: writes nothing
    assert not b.flush()
    assert a.cluster_statistics(REGION).hit_count == 30


def test_expired_heartbeat_leaves_live_gauges_then_late_flush(
    make_stats: MakeStats, rc: RedisCluster
) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    record(a, REGION, 10, 0, size=100)
    record(b, REGION, 20, 0, size=200)
    assert a.flush() and b.flush()
    # api-2 last beat 2 minutes ago (server clock): older than instance_timeout (60 s)
    now = float(rc.time()[0])
    rc.zadd("conduit:cache:{global}:instances", {"api-2": now - 120})
    view = a.cluster_view()  # reaps api-2
    assert view.active_count == 1 and view.missing_instances == ("api-2",)
    assert a.aggregator.instances() == (["api-1"], ["api-2"])
    cluster = view.regions[REGION]
    assert (cluster.hit_count, cluster.size_bytes, cluster.instance_count) == (30, 100, 1)
    assert rc.hget("conduit:cache:{global}:instance:api-2", "live") == "0"
    assert rc.hget(f"conduit:cache:{{{REGION}}}:stats:api-2", "live") == "0"
    assert a.health().data["MissingInstances"] == 1
    assert b.flush()  # a late flush: gauges count again, counters are not counted twice
    cluster = a.cluster_statistics(REGION)
    assert (cluster.hit_count, cluster.size_bytes, cluster.instance_count) == (30, 300, 2)


def test_restart_with_same_id_keeps_counters_monotonic(make_stats: MakeStats) -> None:
    first = make_stats("api-1")
    record(first, REGION, 100, 10, size=500)
    assert first.flush()
    first.pipeline.closed = True  # crashed: no more flushes, no deregistration
    second = make_stats("api-1")  # a new token, the same id, from zero
    record(second, REGION, 7, 3, size=50)
    assert second.flush()
    cluster = second.cluster_statistics(REGION)
    assert (cluster.hit_count, cluster.miss_count) == (107, 13)
    assert (cluster.size_bytes, cluster.instance_count) == (50, 1)
    record(second, REGION, 3, 0, size=60)
    assert second.flush()
    assert second.cluster_statistics(REGION).hit_count == 110


def redis_cluster_nodes(redis_cluster: RedisClusterServers) -> list[list[str]]:
    """``CLUSTER NODES`` rows: id, address, flags, master id, ..."""
    out = redis_cluster.command(redis_cluster.servers[0].port, "CLUSTER", "NODES")
    return [line.split() for line in out.splitlines() if line.strip()]


def replica_of(redis_cluster: RedisClusterServers, port: int) -> int:
    rows = redis_cluster_nodes(redis_cluster)
    master_id = next(r[0] for r in rows if r[1].split("@")[0].endswith(f":{port}"))
    return next(int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows if r[3] == master_id)


class Traffic:
    """Instances (three by default) that record in every region and flush, round after
    round, counting what they recorded and how many flushes failed."""

    def __init__(
        self, make_stats: MakeStats, ids: Sequence[str] = ("api-0", "api-1", "api-2")
    ) -> None:
        self.handles = [make_stats(i) for i in ids]
        self.recorded = dict.fromkeys(REGIONS, 0)
        self.rounds = 0
        self.failed = 0

    def round(self) -> None:
        for k, handle in enumerate(self.handles):
            for region in REGIONS:
                hits = 1 + (self.rounds + k) % 5
                record(handle, region, hits, 1)
                self.recorded[region] += hits
            self.failed += not handle.flush()
        self.rounds += 1

    def check_exact(self) -> None:
        """Every instance flushes once more, then the totals equal what was recorded."""
        for handle in self.handles:
            assert wait_for(handle.flush, timeout=10)
        for region in REGIONS:
            totals = self.handles[0].cluster_statistics(region)
            assert totals.hit_count == self.recorded[region]  # nothing lost, nothing doubled
            assert totals.miss_count == len(self.handles) * self.rounds
            assert totals.instance_count == len(self.handles)
            per = self.handles[0].per_instance_statistics(region)
            assert sum(s.hit_count for s in per.values()) == self.recorded[region]
        assert self.failed < len(self.handles) * self.rounds  # the next flush resends one


@pytest.mark.usefixtures("private_redis_cluster")  # the roles stay swapped
def test_failover_mid_run_loses_and_doubles_nothing(
    redis_cluster: RedisClusterServers, make_stats: MakeStats, rc: RedisCluster
) -> None:
    """Instances record and flush before, during and after a manual failover of the primary
    that holds REGION's keys."""
    traffic = Traffic(make_stats)
    for _ in range(5):
        traffic.round()
    old_primary = owner_port(rc, f"conduit:cache:{{{REGION}}}:aggregated")
    new_primary = replica_of(redis_cluster, old_primary)
    assert redis_cluster.command(new_primary, "CLUSTER", "FAILOVER") == "OK"
    deadline = time.monotonic() + 20
    while "role:master" not in redis_cluster.command(new_primary, "INFO", "replication"):
        traffic.round()  # keeps flushing while the roles switch
        assert time.monotonic() < deadline, "failover did not happen"
    redis_cluster.wait_ok(20)
    for _ in range(3):
        traffic.round()
    traffic.check_exact()

    def moved() -> bool:
        rc.nodes_manager.initialize()  # this client's slot map predates the failover
        return owner_port(rc, f"conduit:cache:{{{REGION}}}:aggregated") == new_primary

    wait_for(moved, timeout=20)  # every node's view of the slot agrees eventually
    assert on_node(new_primary, "EXISTS", f"conduit:cache:{{{REGION}}}:aggregated") == 1


@pytest.mark.usefixtures("private_redis_cluster")  # the slot stays moved
def test_slot_migration_mid_run_loses_and_doubles_nothing(
    redis_cluster: RedisClusterServers, make_stats: MakeStats, rc: RedisCluster
) -> None:
    """REGION's hash slot moves to another primary key by key (CLUSTER SETSLOT IMPORTING /
    MIGRATING, MIGRATE, SETSLOT NODE) while the instances keep recording and flushing.
    The totals' record of writes moves last: a script that wrote a key it did not declare
    would then find its declared keys all moved (ASK) and create a second record on the
    target, and MIGRATE would fail with BUSYKEY."""
    traffic = Traffic(make_stats)
    for _ in range(3):
        traffic.round()
    key = f"conduit:cache:{{{REGION}}}:aggregated"
    rc.nodes_manager.initialize()
    slot = rc.keyslot(key)
    source = owner_port(rc, key)
    ports = [server.port for server in redis_cluster.servers]
    primaries = [p for p in ports if on_node(p, "ROLE")[0] == "master"]  # asked, not gossip
    target = next(p for p in primaries if p != source)
    source_id, target_id = (on_node(p, "CLUSTER", "MYID") for p in (source, target))
    on_node(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    on_node(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    traffic.round()  # flushes meet a slot in migration (ASK / TRYAGAIN)
    keys = sorted(on_node(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000),
                  key=lambda k: k.endswith(":writes"))  # fmt: skip
    assert keys[-1] == f"conduit:cache:{{{REGION}}}:aggregated:writes"
    for key_ in keys:
        on_node(source, "MIGRATE", "127.0.0.1", target, key_, 0, 5000)
        traffic.round()  # and flush between the keys moving
    assert on_node(source, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    for port in primaries:
        on_node(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    redis_cluster.wait_ok(20)
    for _ in range(2):
        traffic.round()
    traffic.check_exact()
    rc.nodes_manager.initialize()
    assert owner_port(rc, key) == target
    assert on_node(target, "EXISTS", key) == 1


def test_cluster_urls_and_option() -> None:
    from conduit_otel_cache.config import ConfigError, redis_cluster_address

    s = Settings.load({}, redis_url="redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2,[::1]:7002/0")
    assert s.is_redis_cluster and "s3cret" not in s.safe_redis_url and "s3cret" not in repr(s)
    assert s.safe_redis_url == "redis+cluster://u:***@10.0.0.1:7000,10.0.0.2,[::1]:7002/0"
    address = redis_cluster_address(s.redis_url or "")
    assert address.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (address.username, address.password, address.tls) == ("u", "s3cret", False)
    assert redis_cluster_address("rediss+cluster://h:1").tls
    env = {
        "CONDUIT_CACHE_STATS_REDIS_URL": "redis://h:7000",
        "CONDUIT_CACHE_STATS_REDIS_CLUSTER": "1",
    }
    assert Settings.load(env).is_redis_cluster
    assert not Settings.load({}, redis_url="redis://h:7000").is_redis_cluster
    for bad in ("redis+cluster://h:1/3", "redis+cluster://h:1,:2", "redis+cluster://h:99999"):
        with pytest.raises(ConfigError, match="redis_url"):
            Settings.load({}, redis_url=bad)
    with pytest.raises(ConfigError, match="redis_url"):
        Settings.load({}, redis_url="unix:///tmp/r.sock", redis_cluster=True)


def test_plain_url_with_cluster_option(
    redis_cluster: RedisClusterServers, make_stats: MakeStats, rc: RedisCluster
) -> None:
    stats = make_stats("api-1", redis_url=f"redis://127.0.0.1:{redis_cluster.servers[1].port}/0",
                       redis_cluster=True)  # fmt: skip
    record(stats, REGION, 3, 1)
    assert stats.flush()
    assert rc.hget(f"conduit:cache:{{{REGION}}}:aggregated", "hit_count") == "3"
    assert stats.cluster_statistics(REGION).hit_count == 3


def test_lost_keys_and_a_duplicate_id_stay_exact_on_a_redis_cluster(
    make_stats: MakeStats, rc: RedisCluster
) -> None:
    """Issue 22 on a Redis Cluster (beat and regions in separate calls): a lost stats hash
    adds only what is new, a lost aggregated hash is rebuilt and reported, and a second
    writer under one id is told apart by token."""
    stats = make_stats("api-1")
    record(stats, REGION, 100, 50, size=1000)
    record(stats, "Users", 5, 0)
    assert stats.flush()
    rc.delete(f"conduit:cache:{{{REGION}}}:stats:api-1")
    record(stats, REGION, 10, 0, size=1000)
    assert stats.flush()
    totals = rc.hgetall(f"conduit:cache:{{{REGION}}}:aggregated")
    assert (totals["hit_count"], totals["size_bytes"], totals["instance_count"]) == (
        "110", "1000", "1",
    )  # fmt: skip
    rc.delete("conduit:cache:{Users}:aggregated")
    for _ in range(11):  # the check of the unchanged region finds it lost
        record(stats, REGION, 1, 0, size=1000)
        assert stats.flush()
    users = rc.hgetall("conduit:cache:{Users}:aggregated")
    assert (users["hit_count"], users["instance_count"], users["lost_count"]) == ("5", "1", "1")
    second = CacheStatistics(stats.settings)  # one id, one owner: told apart by token
    try:
        record(second, REGION, 7, 0)
        assert second.flush() and stats.flush()
        record(stats, REGION, 3, 0, size=1000)
        assert stats.flush() and second.flush()
        totals = rc.hgetall(f"conduit:cache:{{{REGION}}}:aggregated")
        assert totals["hit_count"] == str(110 + 11 + 7 + 3)
        assert totals["instance_count"] == "2"
    finally:
        second.shutdown()


def test_a_data_loss_is_carried_once_and_shared_on_a_redis_cluster(
    make_stats: MakeStats, rc: RedisCluster
) -> None:
    """The region's continuity record lives in its hash slot: a reader that saw the loss of
    the totals shares what it took, and a reader started afterwards publishes the same."""
    gone, live, first = make_stats("api-0"), make_stats("api-1"), make_stats("reader-1")
    record(gone, "R", 30, 10)
    assert gone.flush()
    gone.shutdown()  # departs: 30 hits, 10 misses are the departed part
    record(live, "R", 5, 5)
    assert live.flush()
    assert first.cluster_view().regions["R"].hit_count == 35
    keys = live.exporter.store.of("api-1").keys
    rc.delete(keys.aggregate("R"))  # lost: the live instance rebuilds its part
    record(live, "R", 2, 0)
    assert live.flush()
    assert int(rc.hget(keys.aggregate("R"), "hit_count")) == 7
    assert first.cluster_view().regions["R"].hit_count == 37
    assert rc.hget(keys.continuity("R"), "hit_count") == "30"
    assert make_stats("reader-2").cluster_view().regions["R"].hit_count == 37


@pytest.mark.usefixtures("private_redis_cluster")  # the slot stays moved
def test_global_slot_migration_keeps_every_live_instance(
    redis_cluster: RedisClusterServers, make_stats: MakeStats, rc: RedisCluster
) -> None:
    """The ``{global}`` slot (heartbeats, instance meta hashes and regions sets) moves to
    another primary key by key while the instances flush and the per-instance pass checks
    every heartbeat between the moves: no live instance is taken for a stray and removed,
    and the totals stay exact."""
    traffic = Traffic(make_stats)
    for _ in range(2):
        traffic.round()
    store = traffic.handles[0].aggregator.store
    key = "conduit:cache:{global}:instances"
    rc.nodes_manager.initialize()
    slot = rc.keyslot(key)
    source = owner_port(rc, key)
    ports = [server.port for server in redis_cluster.servers]
    primaries = [p for p in ports if on_node(p, "ROLE")[0] == "master"]
    target = next(p for p in primaries if p != source)
    source_id, target_id = (on_node(p, "CLUSTER", "MYID") for p in (source, target))
    on_node(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    on_node(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    # the instances' own keys first, the heartbeats last: a check that read an instance's
    # keys where they no longer are would find no instance behind its heartbeat
    keys = sorted(on_node(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000), key=lambda k: k == key)
    for key_ in keys:
        on_node(source, "MIGRATE", "127.0.0.1", target, key_, 0, 5000)
        assert store.remove_strays(60.0) == [], key_
        traffic.round()
    for port in primaries:
        on_node(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    redis_cluster.wait_ok(20)
    assert store.remove_strays(60.0) == []
    traffic.check_exact()

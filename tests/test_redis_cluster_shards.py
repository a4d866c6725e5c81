"""``redis_cluster_shards``: a Redis Cluster's statistics in shards by instance (shards.py),
on a real Redis Cluster (3 primaries, 3 replicas, loopback).

Every key of an instance, and its shard's part of every region's totals, live under the
shard's hash tag: a flush is one script call, in one slot. Readers add the shards up.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster
from redis.crc import key_slot

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.cli import main
from conduit_otel_cache.config import ConfigError, Settings
from conduit_otel_cache.shards import Shards, shard_tags

from .conftest import MakeStats, scrape_once
from .servers import RedisClusterServers
from .test_redis_cluster import REGIONS, Traffic, on_node, owner_port, record, replica_of

pytestmark = pytest.mark.redis_cluster

SHARDS = 3
IDS = [f"api-{n}" for n in range(6)]


@pytest.fixture
def url(redis_cluster: RedisClusterServers) -> str:
    return f"redis+cluster://127.0.0.1:{redis_cluster.servers[0].port}"


@pytest.fixture
def redis_url(url: str, rc: RedisCluster) -> str:
    """The Redis Cluster, for conftest's make_stats (rc has emptied it)."""
    return url


@pytest.fixture
def sharded(make_stats: MakeStats) -> MakeStats:
    """Handles with ``redis_cluster_shards`` SHARDS."""

    def make(instance_id: str, **options: Any) -> CacheStatistics:
        return make_stats(instance_id, redis_cluster_shards=SHARDS, **options)

    return make


def store_of(handle: CacheStatistics) -> Shards:
    assert handle.exporter is not None and isinstance(handle.exporter.store, Shards)
    return handle.exporter.store


def evalsha_calls(rc: RedisCluster) -> int:
    """Script calls every primary ran so far."""
    stats = rc.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
    return sum(node.get("cmdstat_evalsha", {}).get("calls", 0) for node in stats.values())


def test_shard_tags_split_the_slot_range_evenly() -> None:
    for count in (1, 2, 3, 7, 16):
        slots = [key_slot(tag.encode()) for tag in shard_tags(count)]
        assert [slot * count // 16384 for slot in slots] == list(range(count))
    assert shard_tags(3) == shard_tags(3)  # the same on every process: a pure function


def test_each_flush_is_one_call_in_its_shard_and_readers_add_the_shards_up(
    sharded: MakeStats, rc: RedisCluster, url: str
) -> None:
    handles = {i: sharded(i) for i in IDS}
    store = store_of(handles[IDS[0]])
    assert len({store.of(i).keys.prefix for i in IDS}) == SHARDS  # every shard has instances
    plan = {i: (10 * (n + 1), n + 1) for n, i in enumerate(IDS)}
    for i, (hits, misses) in plan.items():
        record(handles[i], REGIONS[0], 1, 0)
        assert handles[i].flush()  # (a first write may settle earlier incarnations)
        for region in REGIONS:
            record(handles[i], region, hits - (region == REGIONS[0]), misses, sets=1, size=100)
        before = evalsha_calls(rc)
        assert handles[i].flush()
        assert evalsha_calls(rc) - before == 1  # the layout by region: 1 + 3 calls
    # an instance's keys and its shard's totals share one slot, the shards' slots three
    # primaries
    owners = set()
    for i in IDS:
        keys = store.of(i).keys
        names = [keys.instances, keys.meta(i), keys.instance_regions(i), keys.regions,
                 *(keys.stats(i, r) for r in REGIONS), *(keys.aggregate(r) for r in REGIONS),
                 *(keys.counts(r) for r in REGIONS)]  # fmt: skip
        assert len({rc.keyslot(k) for k in names}) == 1
        port = owner_port(rc, names[0])
        assert all(on_node(port, "EXISTS", k) == 1 for k in names)
        owners.add(port)
    assert len(owners) == SHARDS
    assert rc.exists("conduit:cache:{global}:instances", "conduit:cache:instances") == 0
    assert rc.zrange("conduit:cache:layouts", 0, -1) == [str(SHARDS)]
    reader = sharded("reader")
    view = reader.cluster_view()
    assert view.active_count == len(IDS)
    for region in REGIONS:
        totals = view.regions[region]
        assert totals.hit_count == sum(h for h, _ in plan.values())
        assert totals.miss_count == sum(m for _, m in plan.values())
        assert (totals.set_count, totals.size_bytes) == (len(IDS), 100 * len(IDS))
        assert totals.instance_count == len(IDS)
        assert totals.response_times.count == totals.hit_count + totals.miss_count
        per = reader.per_instance_statistics(region)
        assert {i: (s.hit_count, s.miss_count) for i, s in per.items()} == plan
    reader.aggregator.refresh_instances()
    ratios = reader.cluster_view().instance_hit_ratios[REGIONS[0]]
    assert ratios == pytest.approx({i: h / (h + m) for i, (h, m) in plan.items()})
    assert reader.aggregator.instances() == (sorted(IDS), [])
    text = scrape_once(redis_url=url, redis_cluster_shards=SHARDS)
    hits = {
        s.labels["region"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "conduit_cache_hits_total"
    }
    assert hits == dict.fromkeys(REGIONS, sum(h for h, _ in plan.values()))
    # a departure leaves the counters and takes the live gauges out of its shard alone
    handles[IDS[1]].shutdown()
    view = reader.cluster_view()
    assert view.active_count == len(IDS) - 1
    assert view.regions[REGIONS[0]].hit_count == sum(h for h, _ in plan.values())
    assert view.regions[REGIONS[0]].size_bytes == 100 * (len(IDS) - 1)


def test_a_data_loss_in_one_shard_is_carried_for_that_shard_alone(
    sharded: MakeStats, rc: RedisCluster
) -> None:
    """Each shard's part of a region's totals has its own epoch and continuity record: a
    shard that loses its part carries over its departed instances' counts, not the other
    shards' (that would count them twice)."""
    probe = Shards(rc, count=SHARDS)
    gone_a, live_a, gone_b = (sharded(i) for i in (
        in_shard(probe, 0, "gone"), in_shard(probe, 0, "live"), in_shard(probe, 1, "gone")
    ))  # fmt: skip
    a = in_shard(probe, 0, "gone")
    record(gone_a, "R", 30, 10)
    record(gone_b, "R", 100, 0)
    record(live_a, "R", 5, 5)
    assert gone_a.flush() and gone_b.flush() and live_a.flush()
    gone_a.shutdown()
    gone_b.shutdown()
    reader = sharded("reader-1")
    assert reader.cluster_view().regions["R"].hit_count == 135
    rc.delete(probe.of(a).keys.aggregate("R"))  # shard a's part is lost: 30 departed hits
    record(live_a, "R", 2, 0)
    assert live_a.flush()
    view = reader.cluster_view()
    assert view.regions["R"].hit_count == 137  # not 137 + 100 (b's departed part again)
    assert view.regions["R"].miss_count == 15
    assert make_late_reader(sharded).cluster_view().regions["R"].hit_count == 137


def in_shard(shards: Shards, k: int, name: str) -> str:
    """The first instance id ``<name>-<n>`` of shard ``k``."""
    return next(i for i in (f"{name}-{n}" for n in range(1000)) if shards.of(i) is shards.own[k])


def make_late_reader(sharded: MakeStats) -> CacheStatistics:
    """A reader started after the loss: it publishes what the shared records carry."""
    return sharded("reader-late")


def test_lost_keys_and_a_duplicate_id_stay_exact_in_a_shard(
    sharded: MakeStats, rc: RedisCluster
) -> None:
    stats = sharded("api-1")
    record(stats, "R", 100, 50, size=1000)
    record(stats, "Users", 5, 0)
    assert stats.flush()
    keys = store_of(stats).of("api-1").keys
    rc.delete(keys.stats("api-1", "R"))
    record(stats, "R", 10, 0, size=1000)
    assert stats.flush()
    totals = rc.hgetall(keys.aggregate("R"))
    assert (totals["hit_count"], totals["size_bytes"], totals["instance_count"]) == (
        "110", "1000", "1",
    )  # fmt: skip
    second = CacheStatistics(stats.settings)  # one id, one owner: told apart by token
    try:
        record(second, "R", 7, 0)
        assert second.flush() and stats.flush()
        assert stats.cluster_statistics("R").hit_count == 117
        assert rc.hget(keys.aggregate("R"), "instance_count") == "2"
    finally:
        second.shutdown()


def test_layouts_in_use_add_up_during_a_rolling_change_of_the_option(
    make_stats: MakeStats, rc: RedisCluster, url: str
) -> None:
    """Instances by region (the default) and in 3 and 6 shards under one key_prefix, as in a
    rolling change of redis_cluster_shards: one instance restarts from by region into shards
    under the same id. Readers of every layout read every layout in use and publish the same
    exact totals; per-instance reads find each instance where it is."""
    old, gone = make_stats("api-1"), make_stats("api-2")
    record(old, "R", 3, 1)
    record(gone, "R", 5, 0)
    assert old.flush() and gone.flush()
    gone.shutdown()
    old.shutdown()  # restarts with the new option, under the same id
    new = make_stats("api-1", redis_cluster_shards=3)
    third = make_stats("api-3", redis_cluster_shards=3)
    sixth = make_stats("api-4", redis_cluster_shards=6)
    for handle, hits in ((new, 7), (third, 11), (sixth, 13)):
        record(handle, "R", hits, 0)
        assert handle.flush()
    assert sorted(rc.zrange("conduit:cache:layouts", 0, -1)) == ["0", "3", "6"]
    total = 3 + 5 + 7 + 11 + 13
    for options in ({}, {"redis_cluster_shards": 3}, {"redis_cluster_shards": 6}):
        reader = make_stats(f"reader-{len(options)}-{options.get('redis_cluster_shards', 0)}",
                            **options)  # fmt: skip
        view = reader.cluster_view()
        assert view.regions["R"].hit_count == total, options
        assert view.regions["R"].miss_count == 1
        assert view.active_count == 3  # api-1 counts once: its old incarnation departed
        per = reader.per_instance_statistics("R")
        assert {i: s.hit_count for i, s in per.items()} == {"api-1": 7, "api-3": 11, "api-4": 13}
    text = scrape_once(redis_url=url)  # serve with the default layout
    hits = [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "conduit_cache_hits_total" and s.labels["region"] == "R"]  # fmt: skip
    assert hits == [total]
    assert main(["cleanup", "--redis-url", url]) == 0


def test_the_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="redis_cluster_shards: needs a Redis Cluster"):
        Settings.load({}, redis_url="redis://h:6379", redis_cluster_shards=3)
    for bad in (-1, 257):
        with pytest.raises(ConfigError, match="redis_cluster_shards: must be 0-256"):
            Settings.load({}, redis_url="redis+cluster://h:1", redis_cluster_shards=bad)
    env = {"CONDUIT_CACHE_STATS_REDIS_URL": "redis+cluster://h:1",
           "CONDUIT_CACHE_STATS_REDIS_CLUSTER_SHARDS": "4"}  # fmt: skip
    assert Settings.load(env).connection.redis_cluster_shards == 4


@pytest.mark.slow  # a fault scenario on a cluster of its own (by region: test_redis_cluster.py)
@pytest.mark.usefixtures("private_redis_cluster")  # the roles stay swapped
def test_failover_of_a_shard_loses_and_doubles_nothing(
    redis_cluster: RedisClusterServers, sharded: MakeStats, rc: RedisCluster
) -> None:
    traffic = Traffic(sharded, IDS)
    for _ in range(3):
        traffic.round()
    key = store_of(traffic.handles[0]).of(IDS[0]).keys.instances
    old_primary = owner_port(rc, key)
    new_primary = replica_of(redis_cluster, old_primary)
    assert redis_cluster.command(new_primary, "CLUSTER", "FAILOVER") == "OK"
    deadline = time.monotonic() + 20
    while "role:master" not in redis_cluster.command(new_primary, "INFO", "replication"):
        traffic.round()
        assert time.monotonic() < deadline, "failover did not happen"
    redis_cluster.wait_ok(20)
    for _ in range(3):
        traffic.round()
    traffic.check_exact()


@pytest.mark.slow  # a fault scenario on a cluster of its own (by region: test_redis_cluster.py)
@pytest.mark.usefixtures("private_redis_cluster")  # the slot stays moved
def test_a_shard_slot_migration_mid_run_loses_and_doubles_nothing(
    redis_cluster: RedisClusterServers, sharded: MakeStats, rc: RedisCluster
) -> None:
    """A shard's slot (its instances' keys and its part of every region's totals) moves to
    another primary key by key while every instance flushes and the per-instance pass
    checks the heartbeats between the moves."""
    traffic = Traffic(sharded, IDS)
    for _ in range(2):
        traffic.round()
    store = store_of(traffic.handles[0])
    part = store.of(IDS[0])
    key = part.keys.instances
    rc.nodes_manager.initialize()
    slot = rc.keyslot(key)
    source = owner_port(rc, key)
    ports = [server.port for server in redis_cluster.servers]
    primaries = [p for p in ports if on_node(p, "ROLE")[0] == "master"]
    target = next(p for p in primaries if p != source)
    source_id, target_id = (on_node(p, "CLUSTER", "MYID") for p in (source, target))
    on_node(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    on_node(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    traffic.round()  # flushes meet a slot in migration (ASK / TRYAGAIN)
    # the instances' records first, the records of writes and the heartbeats last
    keys = sorted(on_node(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000),
                  key=lambda k: (k == key, k.endswith(":writes")))  # fmt: skip
    for key_ in keys:
        on_node(source, "MIGRATE", "127.0.0.1", target, key_, 0, 5000)
        assert part.remove_strays(60.0) == [], key_
        traffic.round()
    for port in primaries:
        on_node(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    redis_cluster.wait_ok(20)
    for _ in range(2):
        traffic.round()
    traffic.check_exact()


def test_read_errors_of_one_shard_are_reported_and_the_others_still_add_up(
    sharded: MakeStats, rc: RedisCluster
) -> None:
    handles = [sharded(i) for i in IDS]
    for handle in handles:
        record(handle, "R", 2, 0)
        assert handle.flush()
    store = store_of(handles[0])
    bad = store.own[1].keys.aggregate("R")
    rc.delete(bad)
    rc.set(bad, "not a hash")
    rc.zadd("conduit:cache:layouts", {"999999": time.time(), "-1": time.time()})
    reader = sharded("reader")
    view = reader.cluster_view()
    assert view.redis_up
    assert any(bad in e for e in view.data_errors)
    assert sum("invalid layout" in e for e in view.data_errors) == 2
    assert reader.aggregator.errors_total >= 3  # counted once each
    before = reader.aggregator.errors_total
    reader.cluster_view()
    assert reader.aggregator.errors_total == before  # not again while they stay
    in_bad = sum(1 for i in IDS if store.of(i) is store.own[1])
    assert view.regions["R"].hit_count == 2 * (len(IDS) - in_bad)
    with pytest.raises(redis.ResponseError):
        rc.hgetall(bad)

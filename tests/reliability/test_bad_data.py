"""Malformed data in Redis is skipped and reported; it never crashes a scrape."""

from __future__ import annotations

import math

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.serve.service import ExporterService

from ..conftest import MakeStats

REGION = "ProviderResponses"


def scrape(service: ExporterService) -> dict[tuple[str, str], float]:
    text = generate_latest(service.exposition.registry).decode()
    return {
        (s.name, s.labels.get("region", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels.get("instance_id")
    }


@pytest.fixture
def service(redis_url: str):
    svc = ExporterService(Settings.load(redis_url=redis_url, aggregation_cache_ttl=0), port=0)
    yield svc
    svc.stop()


def populate(make_stats: MakeStats) -> None:
    for n, hits in ((1, 10), (2, 20)):
        stats = make_stats(f"api-{n}")
        for _ in range(hits):
            stats.record_hit(REGION, 0.001)
        stats.record_hit("Other")
        stats.flush()


CORRUPTIONS = {
    "non-numeric field": lambda r: r.hset("conduit:cache:stats:aggregated:Other", "hit_count", "x"),
    "wrong type aggregate": lambda r: (r.delete("conduit:cache:stats:aggregated:Other"),
                                       r.set("conduit:cache:stats:aggregated:Other", "junk")),
    "negative counter": lambda r: r.hset("conduit:cache:stats:aggregated:Other", "miss_count", -5),
    "huge number": lambda r: r.hset("conduit:cache:stats:aggregated:Other", "set_count", 10**30),
    "nan bucket": lambda r: r.hset("conduit:cache:stats:aggregated:Other", "le:nan", 1),
    "instance hash garbage": lambda r: r.hset("conduit:cache:stats:api-1:Other", "hit_count", "?"),
    "instance key wrong type": lambda r: (r.delete("conduit:cache:stats:api-2:Other"),
                                          r.lpush("conduit:cache:stats:api-2:Other", "x")),
    "wrong type counts": lambda r: (r.delete("conduit:cache:counts:Other"),
                                   r.set("conduit:cache:counts:Other", "junk")),
    "counts not a number": lambda r: r.hset("conduit:cache:counts:Other", "ghost", "x 1"),
    "counts malformed": lambda r: r.hset("conduit:cache:counts:Other", "ghost", "250"),
    "member without stats": lambda r: r.zadd("conduit:cache:instances", {"ghost": 1e12}),
    "bad region member": lambda r: r.sadd("conduit:cache:regions", "bad region\n"),
}  # fmt: skip


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_malformed_entry_is_skipped_reported_and_rest_is_exact(
    corruption: str, make_stats: MakeStats, r: redis.Redis, service: ExporterService
) -> None:
    populate(make_stats)
    CORRUPTIONS[corruption](r)
    service.aggregator.refresh_instances()
    assert set(service.aggregator.per_instance("Other")) <= {"api-1", "api-2"}  # read, skipped
    m = scrape(service)
    assert m[("conduit_cache_hits_total", REGION)] == 30  # everything else still correct
    assert m[("conduit_cache_redis_up", "")] == 1
    health = service.health()
    if corruption != "member without stats":  # an empty member is not malformed
        assert m[("conduit_cache_aggregation_errors_total", "")] >= 1
        assert health.status.label == "Degraded"
        assert "malformed" in health.check_json()["description"]
    for value in m.values():
        assert math.isfinite(value) and value >= 0


def test_flush_repairs_own_keys_of_the_wrong_type(make_stats: MakeStats, r: redis.Redis) -> None:
    r.set("conduit:cache:instances", "not a zset")
    r.set("conduit:cache:regions", "not a set")
    r.set(f"conduit:cache:stats:api-1:{REGION}", "not a hash")
    stats = make_stats("api-1")
    stats.record_hit(REGION)
    assert stats.flush()
    assert stats.cluster_statistics(REGION).hit_count == 1


KEYS = st.sampled_from([
    "conduit:cache:instances", "conduit:cache:regions", f"conduit:cache:stats:aggregated:{REGION}",
    f"conduit:cache:stats:api-1:{REGION}", "conduit:cache:instance:api-1",
    "conduit:cache:instance:api-1:regions", "conduit:cache:stats:aggregated:Other",
])  # fmt: skip
FIELDS = st.sampled_from(["hit_count", "miss_count", "set_count", "eviction_count", "size_bytes",
                          "rt_sum", "le:0.001", "le:+Inf", "le:abc", "instance_count",
                          "last_aggregated", "last_updated", "live", "token"])  # fmt: skip
VALUES = st.one_of(st.integers(-(10**25), 10**25), st.floats(allow_nan=True),
                   st.text(max_size=20), st.binary(max_size=20))  # fmt: skip
WRITE = st.tuples(st.sampled_from(["hset", "set", "zadd", "sadd", "lpush", "del"]), KEYS, FIELDS,
                  VALUES)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=st.lists(WRITE, max_size=8))
def test_random_garbage_never_breaks_the_exporter(writes, redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    from conduit_otel_cache import setup

    stats = setup(redis_url=redis_server.url, instance_id="api-1", set_global=False,
                  flush_interval=None, aggregation_cache_ttl=0)  # fmt: skip
    stats.record_hit(REGION, 0.002)
    stats.flush()
    for op, key, field, value in writes:
        v = value if not isinstance(value, float) else repr(value)
        try:
            if op == "hset":
                r.hset(key, field, v)
            elif op == "set":
                r.set(key, v)
            elif op == "zadd":
                r.zadd(key, {str(v): 1.0})
            elif op == "sadd":
                r.sadd(key, v)
            elif op == "lpush":
                r.lpush(key, v)
            else:
                r.delete(key)
        except redis.ResponseError:
            pass  # e.g. WRONGTYPE: the garbage could not even be written
    svc = ExporterService(Settings.load(redis_url=redis_server.url, aggregation_cache_ttl=0),
                          port=0)  # fmt: skip
    try:
        svc.aggregator.refresh_instances()
        for region in ("Other", REGION):
            svc.aggregator.per_instance(region)
        text = generate_latest(svc.exposition.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert math.isfinite(sample.value) and sample.value >= 0, sample
        assert stats.flush()  # the writer survives the garbage too
    finally:
        svc.stop()
        stats.shutdown()
        r.close()

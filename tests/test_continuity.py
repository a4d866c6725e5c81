"""The published cluster counters never go backwards across Redis data losses, and once the
live instances have written their counts again they are where they would have been without
the loss (hits and misses exactly): a model of departed and live instances, Redis losing
everything at random moments and the instances rebuilding one at a time, read by readers
that share what the losses took through a real Redis, one of them started late. Then real
`serve` replicas: two see one loss and add it once, a replica started after the loss and a
restarted one publish the same totals, also after the shared record itself was lost."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import setup
from conduit_otel_cache.continuity import Continuity, _add
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.model import ResponseTimes, Statistics
from conduit_otel_cache.store import Store

from .conftest import wait_for
from .serve_process import ServeProcess

BOUNDS = (0.001, 0.01)


def aggregate(
    live: dict[str, list[int]], departed: list[int], epoch: int = 0
) -> tuple[Statistics, dict[str, str]]:
    """Redis's totals of one region: departed instances' counts plus the live ones' (each
    ``[hits, misses, sets, evictions, fast, slow]``), and the live sums and the epoch (one
    life of the hash: a new one after each loss) of the hash."""
    rows = [*live.values(), departed]
    total = [sum(col) for col in zip(*rows)]
    stats = Statistics(
        hit_count=total[0],
        miss_count=total[1],
        set_count=total[2],
        eviction_count=total[3],
        response_times=ResponseTimes(BOUNDS, (total[4], total[5], 0), 0.0005 * total[4]),
    )
    fields = {
        "live_hit_count": str(sum(v[0] for v in live.values())),
        "live_miss_count": str(sum(v[1] for v in live.values())),
        "epoch": f"epoch-{epoch}",
    }
    return stats, fields


@pytest.fixture
def store(redis_url: str) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield Store(client)
    client.close()


def reader(store: Store) -> tuple[Continuity, Any]:
    """A reader sharing through Redis, and what it publishes for one read of ``raw``."""
    continuity = Continuity(BOUNDS, share=store.share_continuity)

    def publish(raw: Statistics, fields: dict[str, str]) -> Statistics:
        record = store.client.hgetall(store.keys.continuity("r"))
        return continuity.apply({"r": raw}, {"r": fields}, {"r": record})["r"]

    return continuity, publish


@pytest.mark.parametrize("seed", range(12))
def test_counters_stay_monotonic_and_recover_exactly_after_losses(seed: int, store: Store) -> None:
    rng = random.Random(seed)
    counts: dict[str, list[int]] = {f"i{n}": [0] * 6 for n in range(4)}  # lifetime, in-process
    in_redis: dict[str, list[int]] = {}  # each live instance's part of Redis's totals
    departed = [0] * 6  # departed instances' part of Redis's totals
    truth = [0] * 6  # every event ever recorded
    first, publish_first = reader(store)
    late: Any = None  # a second reader, started after the first losses
    published: list[Statistics] = []
    losses = agreed = 0
    for step in range(300):
        event = rng.random()
        if event < 0.02 and len(counts) > 1:  # an instance leaves cleanly
            name = rng.choice(sorted(counts))
            departed = [a + b for a, b in zip(departed, counts.pop(name))]
            in_redis.pop(name, None)
        elif event < 0.04:  # a new instance
            counts[f"n{step}"] = [0] * 6
        elif event < 0.06:  # Redis loses everything: the totals, and what was carried
            in_redis, departed = {}, [0] * 6
            store.client.delete(store.keys.continuity("r"))
            losses += 1
        for name, mine in counts.items():  # traffic
            hits, misses = rng.randrange(5), rng.randrange(5)
            delta = [hits, misses, misses, rng.randrange(2), hits, misses]
            counts[name] = [a + b for a, b in zip(mine, delta)]
            truth = [a + b for a, b in zip(truth, delta)]
        for name in rng.sample(sorted(counts), k=rng.randrange(len(counts) + 1)):
            in_redis[name] = list(counts[name])  # a flush: writes (rebuilds) its lifetime
        raw, fields = aggregate({n: in_redis[n] for n in in_redis if n in counts}, departed, losses)
        out = publish_first(raw, fields)
        if late is None and step >= 150:
            late = reader(store)[1]
        if late is not None:  # the late reader: what the first publishes, once not held
            mine = late(raw, fields)
            if out == _add(raw, first_carried(first)):
                assert mine == out, step
                agreed += 1
        if published:
            before = published[-1]
            for field in ("hit_count", "miss_count", "set_count", "eviction_count"):
                assert getattr(out, field) >= getattr(before, field), (step, field)
            cumulative = lambda h: [sum(h.counts[: i + 1]) for i in range(len(h.counts))]  # noqa: E731
            old, new = cumulative(before.response_times), cumulative(out.response_times)
            assert all(b >= a for a, b in zip(old, new)), step
            assert out.response_times.sum >= before.response_times.sum
        published.append(out)
    # everyone writes once more: hits and misses are the truth, less nothing
    for name in counts:
        in_redis[name] = list(counts[name])
    raw, fields = aggregate({n: in_redis[n] for n in counts}, departed, losses)
    out = publish_first(raw, fields)
    assert (out.hit_count, out.miss_count) == (truth[0], truth[1])
    assert abs(out.set_count - truth[2]) <= max(2, 0.05 * truth[2])
    assert first.losses >= min(losses, 1)
    assert late(raw, fields) == out
    assert agreed > 50


def first_carried(continuity: Continuity) -> Statistics:
    """What a reader carries over the losses of region ``r`` now."""
    return continuity._regions["r"].carried


def test_two_readers_that_see_one_loss_carry_it_once(store: Store) -> None:
    """Both readers read the totals before the loss (the second before an instance with
    30 hits departed, so their departed parts differ) and the record before either shares
    the loss: the first to share it wins, the other takes its record, and both publish
    the same counters (without the compare-and-set the second's would replace it)."""
    (a, publish_a), (b, publish_b) = reader(store), reader(store)
    live = {"api-0": [30, 10, 10, 0, 30, 10], "api-1": [5, 5, 5, 0, 5, 5]}
    publish_b(*aggregate(live, [0] * 6))  # b read before api-0 departed
    api0 = live.pop("api-0")
    publish_a(*aggregate(live, api0))
    # Redis loses everything; api-1 rebuilds: 7 hits. Both read the same snapshot.
    raw, fields = aggregate({"api-1": [7, 5, 5, 0, 7, 5]}, [0] * 6, epoch=1)
    record: dict[str, str] = {}
    out_a = a.apply({"r": raw}, {"r": fields}, {"r": record})["r"]
    out_b = b.apply({"r": raw}, {"r": fields}, {"r": record})["r"]
    assert out_a.hit_count == 37  # api-0's 30 carried over
    assert out_b == out_a
    assert store.client.hgetall(store.keys.continuity("r"))["hit_count"] == "30"


def test_without_a_loss_the_counters_are_redis_totals() -> None:
    continuity = Continuity()
    for hits in (0, 5, 9):
        raw, fields = aggregate({"a": [hits, 1, 1, 0, hits, 1]}, [3, 0, 0, 0, 3, 0])
        assert continuity.apply({"r": raw}, {"r": fields})["r"] == raw
    assert continuity.losses == 0


#: the replicas read Redis at every scrape
SERVE_ENV = {"CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0"}
REGION = "Orders"


def hits(serve: ServeProcess) -> float | None:
    """``conduit_cache_hits_total`` of the region, as one scrape of the replica publishes it."""
    status, body, _ = serve.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "conduit_cache_hits_total" and sample.labels["region"] == REGION:
                return sample.value
    return None


@pytest.mark.usefixtures("private_redis")  # restarts Redis empty
def test_replicas_publish_the_same_totals_after_a_loss_started_before_or_after_it(
    redis_server: RedisServer, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SERVE_ENV.items():
        monkeypatch.setenv(name, value)
    url = redis_server.url
    options: dict[str, Any] = {"redis_url": url, "set_global": False, "flush_interval": None}
    gone = setup(instance_id="api-0", **options)
    live = setup(instance_id="api-1", **options)
    store = Store(r)
    try:
        for _ in range(30):
            gone.record_hit(REGION)
        assert gone.flush()
        gone.shutdown()  # departs: its 30 hits are the departed part of the totals
        for _ in range(5):
            live.record_hit(REGION)
        assert live.flush()
        with ServeProcess(url) as a, ServeProcess(url) as b:
            wait_for(lambda: hits(a) == hits(b) == 35, what="both replicas read 35 hits")
            redis_server.kill()  # an empty restart: the totals lose api-0's 30 hits
            redis_server.start()
            live.record_hit(REGION)
            live.record_hit(REGION)
            wait_for(live.flush, what="api-1 to rebuild its part (7 hits)")
            aggregated = store.keys.aggregate(REGION)
            assert r.hget(aggregated, "hit_count") == "7"
            # both saw the loss; its 30 hits are carried once, by both
            wait_for(lambda: hits(a) == hits(b) == 37, what="both replicas carry the loss")
            record = store.keys.continuity(REGION)
            assert r.hget(record, "hit_count") == "30"
            ttls = r.pipeline().pttl(record).pttl(aggregated).execute()  # at one moment
            assert 0 < ttls[0] <= ttls[1]  # it lives as long as the totals
            with ServeProcess(url) as c:  # started after the loss
                assert hits(c) == 37
            a.stop()  # a restarted replica: no reset
            with ServeProcess(url) as again:
                assert hits(again) == 37
                # the record itself lost while replicas run: written again from memory
                r.delete(record)
                assert hits(b) == 37
                assert r.hget(record, "hit_count") == "30"
            with ServeProcess(url) as d:
                assert hits(d) == 37
            # the counters continue from there
            live.record_hit(REGION)
            assert live.flush()
            assert hits(b) == 38
    finally:
        live.shutdown()


def test_totals_lost_with_no_live_instance_to_rebuild_them_stay_published(
    redis_url: str, r: redis.Redis
) -> None:
    """Every instance of a region departed, then Redis loses its totals (evicted, deleted):
    nobody writes them again. The reader that saw them keeps publishing what it read, a
    reader started afterwards publishes the same (the shared record), and a later write
    continues from there."""
    options: dict[str, Any] = {"redis_url": redis_url, "set_global": False,
                               "flush_interval": None, "aggregation_cache_ttl": 0}  # fmt: skip
    gone = setup(instance_id="api-0", **options)
    first = setup(instance_id="reader-1", **options)
    handles = [gone, first]
    store = Store(r)
    try:
        for _ in range(30):
            gone.record_hit(REGION)
        assert gone.flush()
        gone.shutdown()  # departs: its 30 hits are all the region's totals
        assert first.cluster_view().regions[REGION].hit_count == 30
        assert r.delete(store.keys.aggregate(REGION)) == 1
        assert first.cluster_view().regions[REGION].hit_count == 30  # was: the region vanished
        assert r.hget(store.keys.continuity(REGION), "hit_count") == "30"
        late = setup(instance_id="reader-2", **options)
        handles.append(late)
        assert late.cluster_view().regions[REGION].hit_count == 30
        again = setup(instance_id="api-1", **options)
        handles.append(again)
        for _ in range(4):
            again.record_hit(REGION)
        assert again.flush()
        assert first.cluster_view().regions[REGION].hit_count == 34
        assert late.cluster_view().regions[REGION].hit_count == 34
    finally:
        for handle in handles:
            handle.shutdown()

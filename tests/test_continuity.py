"""The published cluster counters never go backwards across Redis data losses, and once the
live instances have written their counts again they are where they would have been without
the loss (hits and misses exactly): a model of departed and live instances, Redis losing
everything at random moments and the instances rebuilding one at a time."""

from __future__ import annotations

import random

import pytest

from conduit_otel_cache.continuity import Continuity
from conduit_otel_cache.model import ResponseTimes, Statistics

BOUNDS = (0.001, 0.01)


def aggregate(live: dict[str, list[int]], departed: list[int]) -> tuple[Statistics, dict[str, str]]:
    """Redis's totals of one region: departed instances' counts plus the live ones' (each
    ``[hits, misses, sets, evictions, fast, slow]``), and the live sums of the hash."""
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
    }
    return stats, fields


@pytest.mark.parametrize("seed", range(20))
def test_counters_stay_monotonic_and_recover_exactly_after_losses(seed: int) -> None:
    rng = random.Random(seed)
    counts: dict[str, list[int]] = {f"i{n}": [0] * 6 for n in range(4)}  # lifetime, in-process
    in_redis: dict[str, list[int]] = {}  # each live instance's part of Redis's totals
    departed = [0] * 6  # departed instances' part of Redis's totals
    truth = [0] * 6  # every event ever recorded
    continuity = Continuity()
    published: list[Statistics] = []
    losses = 0
    for step in range(300):
        event = rng.random()
        if event < 0.02 and len(counts) > 1:  # an instance leaves cleanly
            name = rng.choice(sorted(counts))
            departed = [a + b for a, b in zip(departed, counts.pop(name))]
            in_redis.pop(name, None)
        elif event < 0.04:  # a new instance
            counts[f"n{step}"] = [0] * 6
        elif event < 0.06:  # Redis loses everything
            in_redis, departed = {}, [0] * 6
            losses += 1
        for name, mine in counts.items():  # traffic
            hits, misses = rng.randrange(5), rng.randrange(5)
            delta = [hits, misses, misses, rng.randrange(2), hits, misses]
            counts[name] = [a + b for a, b in zip(mine, delta)]
            truth = [a + b for a, b in zip(truth, delta)]
        for name in rng.sample(sorted(counts), k=rng.randrange(len(counts) + 1)):
            in_redis[name] = list(counts[name])  # a flush: writes (rebuilds) its lifetime
        raw, fields = aggregate({n: in_redis[n] for n in in_redis if n in counts}, departed)
        out = continuity.apply({"r": raw}, {"r": fields})["r"]
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
    raw, fields = aggregate({n: in_redis[n] for n in counts}, departed)
    out = continuity.apply({"r": raw}, {"r": fields})["r"]
    assert (out.hit_count, out.miss_count) == (truth[0], truth[1])
    assert abs(out.set_count - truth[2]) <= max(2, 0.05 * truth[2])
    assert continuity.losses >= min(losses, 1)


def test_without_a_loss_the_counters_are_redis_totals() -> None:
    continuity = Continuity()
    for hits in (0, 5, 9):
        raw, fields = aggregate({"a": [hits, 1, 1, 0, hits, 1]}, [3, 0, 0, 0, 3, 0])
        assert continuity.apply({"r": raw}, {"r": fields})["r"] == raw
    assert continuity.losses == 0

"""Aggregation strategies: sum (default), weighted, lazy; exact results on a real Redis."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from conduit_otel_cache import ConfigError, LazyStrategy, Statistics, WeightedStrategy, setup

from .conftest import MakeStats

REGION = "ProviderResponses"


def populate(make_stats: MakeStats, **options) -> list:
    handles = [make_stats(f"api-{n}", **options) for n in range(2)]
    for n, handle in enumerate(handles):
        for _ in range(10 * (n + 1)):
            handle.record_hit(REGION)
        handle.record_miss(REGION)
        handle.set_size_bytes(REGION, 100 * (n + 1))
        handle.flush()
    return handles


def test_sum_is_the_default(make_stats: MakeStats) -> None:
    handles = populate(make_stats)
    stats = handles[0].cluster_statistics(REGION)
    assert (stats.hit_count, stats.miss_count, stats.size_bytes) == (30, 2, 300)


def test_weighted_strategy_is_exact(make_stats: MakeStats) -> None:
    seen: list[Mapping[str, Statistics]] = []

    def weights(instances: Mapping[str, Statistics]) -> dict[str, float]:
        seen.append(instances)
        return {"api-0": 2.0, "api-1": 0.5}

    handles = populate(make_stats, aggregation_strategy=WeightedStrategy(weights))
    stats = handles[0].cluster_statistics(REGION)
    assert set(seen[0]) == {"api-0", "api-1"}
    assert stats.hit_count == 2 * 10 + 0.5 * 20  # 30
    assert stats.miss_count == round(2 * 1 + 0.5 * 1)  # 2 (2.5 rounds to even)
    assert stats.size_bytes == 2 * 100 + 0.5 * 200
    assert stats.instance_count == 2
    seen.clear()
    handles[1].shutdown()
    stats = handles[0].cluster_statistics(REGION)
    assert stats.hit_count == 20 and stats.size_bytes == 200  # only api-0 is registered


def test_lazy_strategy_answers_with_last_known_and_refreshes(make_stats: MakeStats) -> None:
    lazy = LazyStrategy(max_age=0.0)
    handles = populate(make_stats, aggregation_strategy=lazy)
    reader = handles[0]
    assert reader.cluster_statistics(REGION).hit_count == 30  # first call waits
    handles[1].record_hit(REGION)
    handles[1].flush()
    assert reader.cluster_statistics(REGION).hit_count == 30  # stale at once ...
    assert lazy.wait_idle()
    assert reader.cluster_statistics(REGION).hit_count == 31  # ... refreshed meanwhile


def test_strategy_option_by_name(redis_url: str) -> None:
    stats = setup(redis_url=redis_url, instance_id="x", set_global=False, flush_interval=None,
                  aggregation_strategy="lazy")  # fmt: skip
    assert isinstance(stats.strategy, LazyStrategy)
    stats.shutdown()
    with pytest.raises(ConfigError, match="aggregation_strategy"):
        setup(set_global=False, aggregation_strategy="fastest")

"""Health rules and the options that set their thresholds (evaluate is a pure function)."""

from __future__ import annotations

import pytest

from conduit_otel_cache import Settings, Statistics
from conduit_otel_cache.aggregate import ClusterView
from conduit_otel_cache.health import Status, evaluate


def view(**changes) -> ClusterView:
    base = {
        "regions": {"r": Statistics(hit_count=90, miss_count=10, instance_count=2)},
        "drift": {"r": 3.0},
        "active_count": 2,
        "server_time": 1000.0,
        "redis_up": True,
        "aggregation_latency": 0.01,
        "redis_memory_bytes": 10 * 2**20,
        "last_successful_aggregation": 1000.0,
    }
    return ClusterView(**{**base, **changes})


def settings(**options) -> Settings:
    return Settings.load({}, **options)


def test_healthy_by_default() -> None:
    health = evaluate(view(), settings().health)
    assert health.status is Status.HEALTHY and health.http_status == 200
    assert health.data["ActiveInstances"] == 2 and health.data["RedisConnected"] is True


@pytest.mark.parametrize(
    ("changes", "options", "status", "reason"),
    [
        ({"redis_up": False, "redis_error": "refused"}, {}, Status.UNHEALTHY, "Redis"),
        ({}, {"min_active_instances": 3}, Status.UNHEALTHY, "min_active_instances=3"),
        ({"aggregation_latency": 0.3}, {"max_aggregation_latency": 0.2}, Status.DEGRADED,
         "aggregation took"),
        ({"drift": {"r": 3.0}}, {"max_drift_percent": 2}, Status.DEGRADED, "drift"),
        ({"drift": {"r": 30.0}}, {"drift_min_requests": 1000}, Status.HEALTHY, ""),
        ({"redis_memory_bytes": 2 * 2**20}, {"max_memory_bytes": 2**20}, Status.DEGRADED,
         "Redis memory"),
        ({"missing_heartbeats": {"b": 900.0}, "active_count": 1},
         {"missing_instance_grace": 30}, Status.DEGRADED,
         "missing"),
        ({"missing_heartbeats": {"b": 900.0}, "active_count": 1},
         {"missing_instance_grace": 60}, Status.HEALTHY, ""),
        ({"data_errors": ("bad field",)}, {}, Status.DEGRADED, "malformed"),
    ],
)  # fmt: skip
def test_each_rule_and_its_option(changes, options, status, reason) -> None:
    health = evaluate(view(**changes), settings(**options).health)
    assert health.status is status, health.reasons
    assert reason in "; ".join(health.reasons)
    assert health.http_status == (503 if status is Status.UNHEALTHY else 200)


def test_worst_rule_wins() -> None:
    health = evaluate(
        view(redis_up=False, aggregation_latency=9.0, drift={"r": 50.0}), settings().health
    )
    assert health.status is Status.UNHEALTHY and len(health.reasons) == 3

"""The scrape path as data: :func:`series` of a view is what ``/metrics`` renders (parsed
here by prometheus_client) and what the OTLP push sends, a pure function of the view. The
views are built as the aggregator returns them (the end-to-end tests with Redis are
tests/test_scrape.py and tests/test_otlp.py)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, Sum
from opentelemetry.sdk.resources import Resource
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import Settings
from conduit_otel_cache.aggregate import ClusterView
from conduit_otel_cache.model import ResponseTimes, Statistics
from conduit_otel_cache.serve.otlp import metrics_data
from conduit_otel_cache.serve.rendering import encode
from conduit_otel_cache.serve.series import (
    FLUSH_ERROR_KINDS,
    PROMETHEUS_UNITS,
    families,
    series,
)

SETTINGS = Settings.load(instance_id="exporter-1", max_instance_series=5000).serve
NOW = 1910.0  # 10 s after the view's Redis read: fresh
#: the series a replica cut off from Redis publishes: its own, none of the cluster's
OWN_ONLY = {
    "conduit_cache_redis_up",
    "conduit_cache_aggregation_latency_seconds",
    "conduit_cache_last_successful_aggregation_timestamp_seconds",
    "conduit_cache_health_status",
    "conduit_cache_exporter_data_age_seconds",
    "conduit_cache_aggregation_errors_total",
    "conduit_cache_instances_flush_errors_total",
    "conduit_cache_instances_flush_errors_all_kinds_total",
    "conduit_cache_data_losses_total",
}


def a_view(rng: random.Random, *, up: bool = True, instances: int = 3) -> ClusterView:
    bounds = (0.001, 0.01, 0.1)
    regions = {}
    for i in range(rng.randint(1, 4)):
        counts = tuple(rng.randint(0, 9) for _ in range(len(bounds) + 1))
        regions[f"R{i}"] = Statistics(
            hit_count=rng.randint(0, 99),
            miss_count=rng.randint(0, 99),
            set_count=rng.randint(0, 9),
            eviction_count=rng.randint(0, 9),
            size_bytes=rng.randint(0, 10**6),
            response_times=ResponseTimes(bounds, counts, rng.random()),
        )
    return ClusterView(
        regions=regions,
        drift={r: rng.random() * 10 for r in regions},
        instance_series=tuple(("R0", f"app-{i}", rng.random()) for i in range(instances)),
        active_count=instances,
        missing_heartbeats={"gone-1": 1000.0},
        server_time=1900.0,
        redis_up=up,
        aggregation_latency=0.01,
        redis_memory_bytes=12345,
        last_successful_aggregation=1900.0,
        data_errors=("k1: bad", "k1: worse", "k2: bad"),
        losses_published={"R0": rng.randint(0, 3)},
        instance_flush_errors={"Weird": 2},
    )


def scraped(view: ClusterView) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition of ``view``."""
    encoder, content_type = choose_encoder("")
    body = encode(
        families(view, settings=SETTINGS, errors_total=3, now=NOW), {(content_type, False): encoder}
    )[(content_type, False)]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def pushed(view: ClusterView) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The same samples from the OTLP data of ``view``, named as Prometheus names them."""
    data = metrics_data(
        series(view, settings=SETTINGS, errors_total=3, now=NOW), Resource.create({}), 1, 2
    )
    (resource_metrics,) = data.resource_metrics
    (scope,) = resource_metrics.scope_metrics
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for metric in scope.metrics:
        suffix = PROMETHEUS_UNITS.get(metric.unit)
        name = metric.name.replace(".", "_") + (f"_{suffix}" if suffix else "")
        data_: Any = metric.data
        for p in data_.data_points:
            labels = tuple(sorted(p.attributes.items()))
            if isinstance(data_, Histogram):
                assert data_.aggregation_temporality is AggregationTemporality.CUMULATIVE
                total = 0
                for bound, n in zip([*p.explicit_bounds, "+Inf"], p.bucket_counts):
                    total += n
                    le = bound if bound == "+Inf" else str(float(bound))
                    found[(name + "_bucket", tuple(sorted((*labels, ("le", le)))))] = total
                found[(name + "_count", labels)] = p.count
                found[(name + "_sum", labels)] = p.sum
                continue
            if isinstance(data_, Sum):
                assert data_.is_monotonic and p.start_time_unix_nano == 1
                assert data_.aggregation_temporality is AggregationTemporality.CUMULATIVE
                found[(name + "_total", labels)] = p.value
            else:
                found[(name, labels)] = p.value
    return found


def test_metrics_and_the_push_carry_the_same_series_of_one_view() -> None:
    rng = random.Random(24)
    for _ in range(50):
        view = a_view(rng, up=rng.random() < 0.8)
        before = copy.deepcopy(view)
        published = scraped(view)
        assert published == pushed(view)
        assert view == before  # the view is only read
        assert scraped(view) == published  # and the function is pure
        hits = {k[1]: v for k, v in published.items() if k[0] == "conduit_cache_hits_total"}
        if view.redis_up:
            assert hits == {(("region", r),): s.hit_count for r, s in view.regions.items()}
            missing = ("conduit_cache_instance_missing_seconds", (("instance_id", "gone-1"),))
            assert published[missing] == 900.0 - SETTINGS.instance_timeout
            assert published[("conduit_cache_malformed_entries", (("key", "k1"),))] == 2
        else:  # cut off from Redis: this replica's own series only
            assert {name for name, _ in published} <= OWN_ONLY
            assert published[("conduit_cache_redis_up", ())] == 0
        kinds = {dict(k[1])["kind"] for k in published if k[0].endswith("flush_errors_total")}
        assert kinds == {*FLUSH_ERROR_KINDS, "Weird"}
        assert published[("conduit_cache_instances_flush_errors_all_kinds_total", ())] == 2
        age = published[("conduit_cache_exporter_data_age_seconds", ())]
        assert age == pytest.approx(NOW - 1900.0 + 0.01)


def test_every_instance_series_is_published_none_folded() -> None:
    """Series are bounded by regions and ``max_instance_series``, never folded (an SDK
    reader folds those above its cardinality limit, 2000 by default)."""
    view = a_view(random.Random(1), instances=2500)
    published = scraped(view)
    ratios = [k for k in published if k[0] == "conduit_cache_instance_hit_ratio"]
    assert len(ratios) == 2500
    assert len(pushed(view)) == len(published)


def test_a_stale_view_publishes_its_own_series_only() -> None:
    """A view that reached Redis but whose refresh has not ended for longer than
    stale_after (a Redis that trickles its reply): the replica publishes what a replica cut
    off from Redis does, with its data age; a view just within the bound publishes all."""
    view = a_view(random.Random(7))  # its Redis read began at 1899.99
    read = 1900.0 - view.aggregation_latency
    within = families(view, settings=SETTINGS, errors_total=0, now=read + SETTINGS.stale_after)
    assert "conduit_cache_hits" in {f.name for f in within}
    late = read + SETTINGS.stale_after + 1
    published = {f.name: f for f in families(view, settings=SETTINGS, errors_total=0, now=late)}
    assert {f"{name}_total" if published[name].type == "counter" else name
            for name in published} <= OWN_ONLY  # fmt: skip
    (age,) = published["conduit_cache_exporter_data_age_seconds"].samples
    assert age.value == pytest.approx(SETTINGS.stale_after + 1)

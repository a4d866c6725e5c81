"""OpenTelemetry: instruments on the provider, other readers beside the write-through."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
)

from conduit_otel_cache import lifecycle, setup, views

from .conftest import MakeStats


def points(reader: InMemoryMetricReader) -> dict[str, dict]:
    out: dict[str, dict] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    key = p.attributes.get("region") or p.attributes.get("reason") or ""
                    out.setdefault(metric.name, {})[key] = p
    return out


def test_in_memory_reader_beside_write_through_sees_same_numbers(make_stats: MakeStats) -> None:
    reader = InMemoryMetricReader()
    stats = make_stats("api-1", metric_readers=[reader])
    for _ in range(7):
        stats.record_hit("r", 0.004)
    stats.record_miss("r", 2.0)
    stats.record_eviction("r")
    stats.set_size_bytes("r", 4096)
    assert stats.flush()
    p = points(reader)
    assert p["conduit.cache.hits"]["r"].value == 7
    assert p["conduit.cache.misses"]["r"].value == 1
    assert p["conduit.cache.evictions"]["r"].value == 1
    assert p["conduit.cache.size"]["r"].value == 4096
    hist = p["conduit.cache.response_time"]["r"]
    assert isinstance(hist, HistogramDataPoint)
    assert hist.count == 8 and hist.sum == pytest.approx(2.028)
    assert sum(hist.bucket_counts) == 8
    cluster = stats.cluster_statistics("r")
    assert cluster.hit_count == 7 and cluster.response_times.counts == hist.bucket_counts


def test_resource_identity() -> None:
    reader = InMemoryMetricReader()
    stats = setup(instance_id="api-9", set_global=False, metric_readers=[reader])
    stats.record_hit("r")
    resource = reader.get_metrics_data().resource_metrics[0].resource
    assert resource.attributes["service.instance.id"] == "api-9"
    stats.shutdown()


def test_delta_temporality_histogram() -> None:
    reader = InMemoryMetricReader(
        preferred_temporality={cls: AggregationTemporality.DELTA for cls in _kinds()}
    )
    stats = setup(instance_id="d", set_global=False, metric_readers=[reader])
    stats.record_hit("r", 0.01)
    assert points(reader)["conduit.cache.response_time"]["r"].count == 1
    stats.record_hit("r", 0.01)
    stats.record_hit("r", 0.01)
    assert points(reader)["conduit.cache.response_time"]["r"].count == 2
    stats.shutdown()


def test_users_own_meter_provider(make_stats: MakeStats) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=views())
    stats = make_stats("api-1", meter_provider=provider)
    stats.record_hit("r", 0.001)
    assert stats.flush()
    assert points(reader)["conduit.cache.hits"]["r"].value == 1
    assert points(reader)["conduit.cache.response_time"]["r"].count == 1
    assert stats.cluster_statistics("r").hit_count == 1


def test_views_keep_no_exemplars_and_leave_other_instruments_alone() -> None:
    """With every measurement offered to the reservoirs (always_on), conduit's instruments
    keep no exemplar (an observable one has no span to point at) while the application's
    own instruments on the same provider keep theirs."""
    from opentelemetry.sdk.metrics import AlwaysOnExemplarFilter

    reader = InMemoryMetricReader()
    provider = MeterProvider(
        metric_readers=[reader], views=views(), exemplar_filter=AlwaysOnExemplarFilter()
    )
    stats = setup(instance_id="x", set_global=False, meter_provider=provider)
    stats.record_hit("r", 0.001)
    provider.get_meter("app").create_counter("app.requests").add(1)
    found = {
        m.name: [p.exemplars for p in m.data.data_points]
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert found["conduit.cache.hits"] == [[]]
    assert found["conduit.cache.response_time"] == [[]]
    assert found["app.requests"] != [[]]  # the filter offers every measurement
    stats.shutdown()
    provider.shutdown()


def _kinds() -> list[type]:
    from opentelemetry.sdk.metrics import ObservableCounter, ObservableGauge

    return [ObservableCounter, ObservableGauge]


def test_set_global_and_service_name() -> None:
    import subprocess
    import sys

    code = (
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "from conduit_otel_cache import setup\n"
        "reader = InMemoryMetricReader()\n"
        "a = setup(instance_id='a', service_name='checkout', metric_readers=[reader])\n"
        "assert metrics.get_meter_provider() is a.meter_provider\n"
        "b = setup(instance_id='b', set_global=False)\n"
        "assert metrics.get_meter_provider() is a.meter_provider\n"
        "a.record_hit('r')\n"
        "resource = reader.get_metrics_data().resource_metrics[0].resource\n"
        "print(resource.attributes['service.name'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "checkout"


def test_own_instruments_reach_a_reader_beside_the_write_through(make_stats: MakeStats) -> None:
    reader = InMemoryMetricReader()
    stats = make_stats("own-1", metric_readers=[reader])
    stats.record_hit("r")
    assert stats.flush()
    p = points(reader)
    assert p["conduit.cache.flush.errors"][""].value == 0
    assert p["conduit.cache.folded_events"]["max_regions"].value == 0


def test_main_thread_flushes_run_in_one_worker_that_lives_as_long_as_the_handle(
    make_stats: MakeStats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread's flushes run in a worker thread (a signal handler may interrupt the
    main thread anywhere), and it is one worker, not a Thread per flush: a finished Thread
    is freed by a weakref callback that may run on the main thread, where a signal
    handler's SystemExit is printed ("Exception ignored in") instead of ending the process.
    The worker ends with the handle."""
    workers: list[threading.Thread] = []
    start_thread = lifecycle.start_thread

    def counted(target: Callable[[], object], name: str) -> threading.Thread | None:
        thread = start_thread(target, name)
        if name == "conduit-flush" and thread is not None:
            workers.append(thread)
        return thread

    monkeypatch.setattr(lifecycle, "start_thread", counted)
    stats = make_stats("main-flusher")
    for n in range(1, 21):
        stats.record_hit("r", 0.001)
        assert stats.flush() and stats.cluster_totals("r").hit_count == n
    assert len(workers) == 1 and workers[0].is_alive()
    stats.shutdown()
    workers[0].join(5)
    assert not workers[0].is_alive()

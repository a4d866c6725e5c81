"""The private SDK hooks check what they rely on and fail loudly, naming the SDK version."""

from __future__ import annotations

import math
import subprocess
import sys
from importlib.metadata import version
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    InMemoryMetricReader,
    PeriodicExportingMetricReader,
)

from conduit_otel_cache import Settings, sdk_hook, setup
from conduit_otel_cache.autoconfig import ConduitRedisMetricExporter
from conduit_otel_cache.sdk_hook import (
    SdkCompatibilityError,
    check_histogram_hook,
    collecting_readers,
    exporter_of,
    reader_locks,
)

SDK = f"opentelemetry-sdk {version('opentelemetry-sdk')}"


def test_installed_sdk_passes_the_check_and_the_self_test() -> None:
    check_histogram_hook()
    # the end-to-end self-test: known histograms through a real provider, cumulative and delta
    assert sdk_hook._self_test() is None


class _CollectChanged(_ExplicitBucketHistogramAggregation):
    def collect(  # type: ignore[override]
        self, collection_aggregation_temporality: AggregationTemporality
    ) -> Any:
        return None


class _StateRenamed(_ExplicitBucketHistogramAggregation):
    def __init__(
        self,
        attributes: Any,
        instrument_aggregation_temporality: Any,
        start_time_unix_nano: int,
        reservoir_builder: Any,
        boundaries: Any = None,
        record_min_max: bool = True,
    ) -> None:
        super().__init__(attributes, instrument_aggregation_temporality, start_time_unix_nano,
                         reservoir_builder, boundaries, record_min_max)  # fmt: skip
        self._previous_collection_start = self.__dict__.pop("_previous_collection_start_nano")


class _InitChanged(_ExplicitBucketHistogramAggregation):
    def __init__(self, attributes: Any, temporality: Any, start: int, builder: Any) -> None:
        super().__init__(attributes, temporality, start, builder)


@pytest.mark.parametrize(
    ("base", "names"),
    [
        (_CollectChanged, "_CollectChanged.collect"),
        (_StateRenamed, "_StateRenamed has no _previous_collection_start_nano"),
        (_InitChanged, "_InitChanged.__init__"),
    ],
)
def test_a_changed_private_api_is_refused_with_the_sdk_version(base: type, names: str) -> None:
    with pytest.raises(SdkCompatibilityError) as info:
        check_histogram_hook(base)
    message = str(info.value)
    assert SDK in message and names in message
    with pytest.raises(SdkCompatibilityError):  # every later use fails the same way
        check_histogram_hook(base)


def test_setup_fails_at_start_when_the_sdk_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a future SDK with another collect() signature looks like to setup()
    monkeypatch.setattr(_ExplicitBucketHistogramAggregation, "collect", _CollectChanged.collect)
    monkeypatch.setattr(sdk_hook, "_checked", {})
    with pytest.raises(SdkCompatibilityError, match=SDK.replace(".", r"\.")):
        setup(instance_id="x", set_global=False)


def test_readers_and_exporters_of_a_provider(redis_url: str) -> None:
    memory = InMemoryMetricReader()
    settings = Settings.load(redis_url=redis_url, instance_id="a", flush_interval=None)
    exporter = ConduitRedisMetricExporter(settings)
    periodic = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[memory, periodic], shutdown_on_exit=False)
    try:
        assert set(collecting_readers(provider)) == {memory, periodic}
        assert exporter_of(memory) is None
        assert exporter_of(periodic) is exporter
    finally:
        provider.shutdown()
    assert collecting_readers(object()) == ()  # not the SDK's provider: it holds none of ours


def test_a_provider_whose_readers_cannot_be_seen_is_refused() -> None:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    provider._measurement_consumer = object()  # as if the SDK had moved its readers
    with pytest.raises(SdkCompatibilityError, match="_reader_storages"):
        collecting_readers(provider)


def test_a_reader_whose_fork_locks_cannot_be_seen_is_refused() -> None:
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=math.inf)
    export, ticker = reader_locks(reader)  # the installed SDK's: real locks
    assert export.acquire(blocking=False) and ticker.acquire(blocking=False)
    export.release()
    ticker.release()
    reader._shutdown_event = object()  # type: ignore[assignment]  # as if the SDK changed
    with pytest.raises(SdkCompatibilityError, match=f"{SDK}.*_shutdown_event"):
        reader_locks(reader)
    del reader._export_lock
    with pytest.raises(SdkCompatibilityError, match="_export_lock"):
        reader_locks(reader)


def test_the_library_loads_nothing_of_serve() -> None:
    """An application that records and flushes loads no serve-side module: not the
    Prometheus exporter, prometheus_client, the HTTP server or its configuration."""
    serve_side = (
        "prometheus_client",
        "opentelemetry.exporter.prometheus",
        "hypercorn",
        "a2wsgi",
        "yaml",
        "bcrypt",
        "conduit_otel_cache.api",
        "conduit_otel_cache.serve",
    )
    code = (
        "import sys, conduit_otel_cache\n"
        "s = conduit_otel_cache.setup(redis_url='redis://127.0.0.1:1/0', set_global=False,"
        " flush_interval=None)\n"
        "s.record_hit('r'); s.shutdown()\n"
        f"print(sorted(m for m in sys.modules if m.startswith({serve_side!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

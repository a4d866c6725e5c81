"""OpenTelemetry SDK auto-configuration: ``OTEL_METRICS_EXPORTER=conduit_redis``.

The SDK's configurator (``opentelemetry-instrument``, a distro, or
``opentelemetry.sdk._configuration``) builds :class:`ConduitRedisMetricExporter` with no
arguments from the entry point ``conduit_redis`` of the group
``opentelemetry_metrics_exporter`` and drives it with a ``PeriodicExportingMetricReader``
every ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds. ``setup(meter_provider=
metrics.get_meter_provider())`` then puts the instruments on that provider and writes
through this exporter instead of creating its own (:func:`shared_write_through`).

Every such exporter is kept in a weak registry when it is built, so a ``setup()`` in a
process without one never looks into a provider; with one, the provider's readers are read
through :mod:`conduit_otel_cache.sdk_hook`, which fails loudly if the SDK changed.
"""

from __future__ import annotations

import os
import weakref

from opentelemetry.sdk.metrics import ObservableGauge
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from .config import ConfigError, Settings, WriteThroughSettings
from .instruments import RESPONSE_TIME_INSTRUMENT
from .sdk_hook import (
    PreAggregatedHistogramFor,
    collecting_readers,
    exporter_of,
)
from .writethrough import RedisMetricExporter

__all__ = ["ConduitRedisMetricExporter", "shared_write_through"]

#: every live exporter built from this module (by the SDK's configurator or by hand)
_exporters: weakref.WeakSet[ConduitRedisMetricExporter] = weakref.WeakSet()


class ConduitRedisMetricExporter(RedisMetricExporter):
    """The write-through, configured from ``CONDUIT_CACHE_STATS_*`` environment variables.

    ``CONDUIT_CACHE_STATS_REDIS_URL`` is required; ``flush_interval`` does not apply (the
    SDK's reader exports every ``OTEL_METRIC_EXPORT_INTERVAL`` ms, default 60000, which must
    not exceed ``instance_timeout``). Invalid settings raise :class:`ConfigError`.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        settings = Settings.load() if settings is None else settings
        if settings.redis_url is None:
            raise ConfigError(
                "redis_url: the conduit_redis metrics exporter needs CONDUIT_CACHE_STATS_REDIS_URL"
            )
        interval = _export_interval_seconds()
        if settings.instance_timeout < interval:
            raise ConfigError(
                f"instance_timeout: {settings.instance_timeout:g}s is shorter than "
                f"OTEL_METRIC_EXPORT_INTERVAL {interval:g}s; live instances would look dead"
            )
        # The auto-configured provider has no views: report the pre-aggregated response
        # times as a histogram on this exporter's reader, other gauges as usual.
        super().__init__(
            settings.write_through,
            preferred_aggregation={
                ObservableGauge: PreAggregatedHistogramFor(RESPONSE_TIME_INSTRUMENT)
            },
        )
        _exporters.add(self)


def _export_interval_seconds() -> float:
    """The interval the SDK's ``PeriodicExportingMetricReader`` will use (it reads the same)."""
    try:
        return float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", 60000)) / 1000
    except ValueError:
        return 60.0


def shared_write_through(
    provider: object, settings: WriteThroughSettings
) -> tuple[PeriodicExportingMetricReader, RedisMetricExporter] | None:
    """The reader and exporter of a :class:`ConduitRedisMetricExporter` that ``provider``
    collects for, else None.

    Raises :class:`ConfigError` when that exporter writes another instance id, key prefix or
    Redis, and :class:`~conduit_otel_cache.sdk_hook.SdkCompatibilityError` when such an
    exporter exists but the SDK no longer lets us see the provider's readers.
    """
    live = set(_exporters)
    if not live:
        return None
    for reader in collecting_readers(provider):
        exporter = exporter_of(reader)
        if exporter in live:
            assert isinstance(reader, PeriodicExportingMetricReader)
            assert isinstance(exporter, ConduitRedisMetricExporter)
            _check_same_target(settings, exporter.settings)
            return reader, exporter
    return None


def _check_same_target(mine: WriteThroughSettings, theirs: WriteThroughSettings) -> None:
    targets: tuple[tuple[str, object, object], ...] = (
        ("instance_id", mine.instance_id, theirs.instance_id),
        ("key_prefix", mine.connection.key_prefix, theirs.connection.key_prefix),
        ("redis_url", mine.connection.redis_url, theirs.connection.redis_url),
    )
    for name, wanted, used in targets:
        if wanted != used:
            if name == "redis_url":
                wanted = mine.connection.safe_redis_url
                used = theirs.connection.safe_redis_url
            raise ConfigError(
                f"{name}: setup() got {wanted!r} but the conduit write-through "
                f"already on meter_provider uses {used!r}"
            )

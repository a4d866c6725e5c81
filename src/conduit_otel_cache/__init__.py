"""Exact, cluster-wide cache statistics through OpenTelemetry, Redis and Prometheus.

>>> stats = setup(redis_url="redis://localhost:6379/1", instance_id="api-1")
>>> stats.record_hit("ProviderResponses", 0.0012)
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader

from .config import ConfigError, Settings
from .handle import CacheStatistics, views
from .health import Health, Status
from .model import ResponseTimes, Statistics
from .strategies import AggregationStrategy, LazyStrategy, SumStrategy, WeightedStrategy

log = logging.getLogger(__name__)

__version__ = "0.1.0"
__all__ = [
    "AggregationStrategy",
    "CacheStatistics",
    "ConfigError",
    "Health",
    "LazyStrategy",
    "ResponseTimes",
    "Settings",
    "Statistics",
    "Status",
    "SumStrategy",
    "WeightedStrategy",
    "setup",
    "views",
]


def setup(
    *,
    meter_provider: MeterProvider | None = None,
    metric_readers: Sequence[MetricReader] = (),
    aggregation_strategy: str | AggregationStrategy | None = None,
    **options: Any,
) -> CacheStatistics:
    """Start recording cache statistics for this instance.

    Every option of :class:`Settings` is a keyword here and an environment variable
    ``CONDUIT_CACHE_STATS_<NAME>``; invalid values raise :class:`ConfigError` naming it.
    ``metric_readers`` are added to the meter provider built here; a user's own
    ``meter_provider`` gets the instruments instead (build it with ``views=views()``).
    With ``enabled=False`` it returns a handle whose ``record_*`` do nothing, whose reads are
    empty, with no SDK ``MeterProvider``, no thread and no Redis connection.
    ``aggregation_strategy`` is ``"sum"``, ``"lazy"`` or a strategy object such as
    :class:`WeightedStrategy`.

    Called again in the same process while a handle with the same instance id, Redis and
    ``key_prefix`` is open (not shut down), it returns that handle and logs a warning: one
    identity has one writer. Other settings of the second call are then ignored.
    """
    strategy = None
    if isinstance(aggregation_strategy, str):
        options["aggregation_strategy"] = aggregation_strategy
    elif aggregation_strategy is not None:
        strategy = aggregation_strategy
    settings = Settings.load(**options)
    if not settings.enabled:  # no-op handle: no MeterProvider, no Redis
        return CacheStatistics(settings)
    key = (settings.instance_id, settings.redis_url, settings.key_prefix)
    with _setup_lock:
        existing = _handles.get(key)
        if (
            existing is not None
            and not existing.pipeline.closed
            and existing.settings.instance_id == settings.instance_id  # not forked since
        ):
            log.warning(
                "conduit-otel-cache: setup() called again for instance %r, which this "
                "process already records as; returning the open handle (its settings "
                "stand). Call setup() once per process, or give each handle its own "
                "instance_id",
                settings.instance_id,
            )
            return existing
        handle = CacheStatistics(
            settings,
            meter_provider=meter_provider,
            metric_readers=metric_readers,
            aggregation_strategy=strategy,
        )
        _handles[key] = handle
        return handle


#: open handles by (instance id, Redis URL, key prefix): setup() twice returns the first
_handles: weakref.WeakValueDictionary[tuple[str, str | None, str], CacheStatistics] = (
    weakref.WeakValueDictionary()
)
_setup_lock = threading.Lock()

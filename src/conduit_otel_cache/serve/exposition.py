"""The cluster view as observable OpenTelemetry instruments, exposed to Prometheus
through ``opentelemetry-exporter-prometheus`` on a private ``CollectorRegistry``, next to
prometheus_client's process, platform and GC collectors and a build-info series.

Scrapes are served from finished bytes: once a format (text or OpenMetrics, gzipped or
not, as the scrape negotiates) has been asked for, a background thread reads the view and
renders it every ``aggregation_cache_ttl``, and a scrape returns the last rendering whole,
so that concurrent scrapes each see one consistent view and no scrape waits for the
OpenTelemetry collection. The data a scrape sees (header ``X-Conduit-Data-Age``) is at
most ``aggregation_cache_ttl`` plus one refresh (Redis read and rendering) old. With
``aggregation_cache_ttl`` 0 (or ``prerender=False``) every scrape collects and renders
on demand. A name filter (``?name[]=...``) is rendered on demand by prometheus_client.
A ``renderer`` (``serve``'s :class:`~conduit_otel_cache.serve.render_process.RenderProcess`)
renders a background refresh in another process: this one collects only its own process,
platform, GC and build-info series and hands them over with the view. More ``readers``
of the same instruments (``serve``'s OTLP push, :mod:`~conduit_otel_cache.serve.otlp`) read them
with :meth:`Exposition.read`.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, MetricsData
from opentelemetry.sdk.resources import Resource
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

from .. import __version__
from ..aggregate import ClusterView
from ..background import quietly
from ..config import Settings
from ..health import evaluate
from ..instruments import (
    RESPONSE_TIME_INSTRUMENT,
    SCOPE,
    histogram_views,
    observe,
    register_cache_instruments,
)
from ..model import Statistics
from ..ratelimit import RateLimitedLog
from ..sdk_hook import prometheus_reader

log = logging.getLogger(__name__)

#: the response header with the age in seconds of the Redis read a scrape reflects
DATA_AGE_HEADER = "X-Conduit-Data-Age"
#: at most this many keys with malformed entries get a series (the first found)
MAX_MALFORMED_KEYS = 20
#: ``service.name`` of the exporter's resource (``service.instance.id`` is its ``instance_id``)
SERVICE_NAME = "conduit-otel-cache-exporter"
#: flush error kinds published at 0 until an instance reports one: a first failure is then
#: an increase Prometheus sees (a series born at its count is not); other kinds appear
#: when first reported
FLUSH_ERROR_KINDS = (
    "ConnectionError",
    "TimeoutError",
    "OutOfMemoryError",
    "NoPermissionError",
    "AuthenticationError",
    "ReadOnlyError",
    "ResponseError",
)
#: seconds a format stays rendered in the background after the last scrape that asked for it
KEEP_WARM = 300.0
_RETRY = 0.005  # seconds before asking again when another reader is refreshing the view
_EARLY = 0.01  # seconds a refresh starts before the data reaches its TTL (timer slack)
#: A background refresh gives way to scrapes in flight (between callbacks and between metric
#: families, for at most this many seconds each time) and runs quietly (background.py), so
#: that a scrape that arrives during a refresh waits for the interpreter lock for fractions
#: of a millisecond, not 5 ms a time.
_GIVE_WAY = 0.02
_PATIENCE = 0.25  # seconds one refresh gives way in all (it must end: the data age bound)

_T = TypeVar("_T")
Encoder = Callable[[Any], bytes]
Variant = tuple[str, bool]  # (content type, gzipped)
#: ``(view, aggregation errors so far, own series, {variant: encoder}) -> {variant: bytes}``:
#: :meth:`Exposition.render` done elsewhere; None when it cannot now (then it runs here)
Renderer = Callable[
    [ClusterView, int, list[Metric], dict[Variant, Encoder]], dict[Variant, bytes] | None
]


class ViewSource(Protocol):
    """What the exposition reads: the :class:`~conduit_otel_cache.aggregate.Aggregator`."""

    settings: Settings
    errors_total: int

    def view(self, max_age: float | None = None) -> ClusterView: ...


class Exposition:
    """Publishes cluster totals, hit ratios, drift and health for Prometheus to scrape."""

    def __init__(
        self,
        aggregator: ViewSource,
        *,
        prerender: bool = True,
        keep_warm: float = KEEP_WARM,
        renderer: Renderer | None = None,
        readers: Sequence[MetricReader] = (),
    ) -> None:
        settings = aggregator.settings
        self.aggregator = aggregator
        self.ttl = settings.aggregation_cache_ttl if settings.enable_aggregation_cache else 0.0
        #: render in the background and serve finished bytes (needs a TTL above 0)
        self.prerender = prerender and self.ttl > 0
        self.keep_warm = keep_warm
        self.renderer = renderer
        #: duration in seconds of the last refresh (view read, collection, rendering)
        self.refresh_seconds = 0.0
        self.refresh_seconds_max = 0.0
        self.refreshes = 0
        #: every series /metrics serves (collecting it directly is safe from any thread)
        self.registry = CollectorRegistry(auto_describe=False)
        self._otel = CollectorRegistry(auto_describe=False)
        self._collecting = threading.RLock()  # one collection at a time, of one view
        self._pinned: ClusterView | None = None
        self._refreshing = threading.Lock()  # one refresh at a time
        self._lock = threading.Lock()
        self._current: _Rendering | None = None
        self._wanted: dict[Variant, tuple[Encoder, float]] = {}
        self._wake = threading.Event()
        self._in_flight = 0  # scrapes being answered (until the server closes the reply)
        self._quiet = threading.Event()  # set while none is
        self._quiet.set()
        self._patience = 0.0  # seconds the current background refresh may still give way
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = RateLimitedLog(log)
        self._render_errors = RateLimitedLog(log)
        self._reader = prometheus_reader(self._otel, series_limit=series_limit(settings))
        self.meter_provider = MeterProvider(
            metric_readers=[self._reader, *readers],
            resource=Resource.create(
                {"service.name": SERVICE_NAME, "service.instance.id": settings.instance_id}
            ),
            views=histogram_views(RESPONSE_TIME_INSTRUMENT),
            shutdown_on_exit=False,
            exemplar_filter=AlwaysOffExemplarFilter(),  # no spans here; Prometheus text has none
        )
        meter = self.meter_provider.get_meter(SCOPE)
        regions = self._regions
        register_cache_instruments(meter, regions)
        gauges: list[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]]] = [
            (
                "conduit.cache.hit_ratio",
                "1",
                "Cluster hit ratio (0-1) over the lifetime totals",
                observe(regions, lambda s: s.hit_ratio),
            ),
            (
                "conduit.cache.drift",
                "%",
                "Largest distance between a live instance's hit ratio "
                "and the live cluster's over the hits and misses since the previous per-instance "
                "pass, in percentage points (hit ratio x 100)",
                self._drift,
            ),
            (
                "conduit.cache.instance.hit_ratio",
                "1",
                "Hit ratio (0-1) of one live instance",
                self._instance_ratios,
            ),
            (
                "conduit.cache.instances.active",
                "{instance}",
                "Live instances",
                self._cluster(lambda v: v.active_count),
            ),
            (
                "conduit.cache.instances.missing",
                "{instance}",
                "Registered instances whose heartbeat expired",
                self._cluster(lambda v: len(v.missing_instances)),
            ),
            (
                "conduit.cache.instance.missing",
                "s",
                "Seconds since the heartbeat of a "
                "registered instance expired (until cleanup removes it)",
                self._missing,
            ),
            (
                "conduit.cache.malformed_entries",
                "{entry}",
                "Malformed entries skipped in one Redis key at the last read (at most 20 keys)",
                self._malformed,
            ),
            (
                "conduit.cache.redis.up",
                "1",
                "1 when the last aggregation reached Redis",
                self._scalar(lambda v: int(v.redis_up)),
            ),
            (
                "conduit.cache.aggregation.latency",
                "s",
                "Duration of the last aggregation",
                self._scalar(lambda v: v.aggregation_latency),
            ),
            (
                "conduit.cache.redis.memory",
                "By",
                "used_memory of the whole Redis server",
                self._cluster(lambda v: v.redis_memory_bytes),
            ),
            (
                "conduit.cache.last_successful_aggregation.timestamp",
                "s",
                "Unix time of the last successful aggregation",
                self._scalar(lambda v: v.last_successful_aggregation),
            ),
            (
                "conduit.cache.health.status",
                "1",
                "0 Healthy, 1 Degraded, 2 Unhealthy",
                self._scalar(lambda v: int(evaluate(v, aggregator.settings).status)),
            ),
            (
                "conduit.cache.exporter.data_age",
                "s",
                "Seconds from the Redis read these series reflect to their collection (a "
                f"scrape's own data age is its {DATA_AGE_HEADER} header)",
                self._scalar(lambda v: _age(v, time.time())),
            ),
        ]
        for name, unit, description, callback in gauges:
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )
        meter.create_observable_counter(
            "conduit.cache.aggregation.errors",
            callbacks=[self._scalar(lambda v: self.aggregator.errors_total)],
            unit="{error}",
            description="Malformed entries skipped by aggregation",
        )
        meter.create_observable_counter(
            "conduit.cache.instances.flush_errors",
            callbacks=[self._flush_errors],
            unit="{error}",
            description="Failed flushes of every instance by error kind, carried through "
            "Redis by the instance's next successful write",
        )
        meter.create_observable_counter(
            "conduit.cache.data_losses",
            callbacks=[self._data_losses],
            unit="{loss}",
            description="Times Redis was found to have lost part of a region's statistics "
            "that no live instance could rebuild (what ended instances had added, or live "
            "gauges of departed ones)",
        )

        # this process's own series, after the cluster's
        self._own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._own)
        PlatformCollector(registry=self._own)
        GCCollector(registry=self._own)
        Info("conduit_cache_exporter_build", "The exporter's version", registry=self._own).info(
            {"version": __version__}
        )
        self._render_failures = Counter(
            "conduit_cache_exporter_render_failures",
            "Background refreshes the renderer (serve's render process) failed; each was "
            "rendered in-process instead",
            registry=self._own,
        )
        self.registry.register(_Series(self))
        self.registry.register(self._own)

    def _view(self) -> ClusterView:
        view = self._pinned
        if view is None:
            return self.aggregator.view()
        self._give_way()
        return view

    def _fresh(self) -> ClusterView | None:
        """The view while it reflects this replica's last Redis read; None while that
        read failed: a replica cut off from Redis publishes no cluster series (only its
        own: ``redis_up`` 0, data age, health), so that its last good values never mask
        the replicas that can read Redis (docs/metrics.md, "Replicas")."""
        view = self._view()
        return view if view.redis_up else None

    def _regions(self) -> dict[str, Statistics]:
        view = self._fresh()
        return {} if view is None else view.regions

    def _drift(self, options: CallbackOptions) -> Iterable[Observation]:
        view = self._fresh()
        drift = {} if view is None else view.drift
        return [Observation(d, {"region": r}) for r, d in drift.items()]

    def _flush_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        errors = dict.fromkeys(FLUSH_ERROR_KINDS, 0) | self._view().instance_flush_errors
        return [Observation(n, {"kind": kind}) for kind, n in sorted(errors.items())]

    def _data_losses(self, options: CallbackOptions) -> Iterable[Observation]:
        losses = self._view().losses_published
        return [Observation(n, {"region": r}) for r, n in sorted(losses.items())]

    def _instance_ratios(self, options: CallbackOptions) -> Iterable[Observation]:
        """Live instances' hit ratios, the ``max_instance_series`` farthest from their
        region's live hit ratio (selected by the aggregator's per-instance pass)."""
        view = self._fresh()
        return [
            Observation(rate, {"region": region, "instance_id": instance_id})
            for region, instance_id, rate in (() if view is None else view.instance_series)
        ]

    def _missing(self, options: CallbackOptions) -> Iterable[Observation]:
        """Missing instances (at most ``max_instance_series``, sorted by id) and the
        seconds since their heartbeat expired."""
        view = self._fresh()
        if view is None:
            return []
        timeout = self.aggregator.settings.instance_timeout
        ids = view.missing_instances[: self.aggregator.settings.max_instance_series]
        return [Observation(view.missing_for(i, timeout), {"instance_id": i}) for i in ids]

    def _malformed(self, options: CallbackOptions) -> Iterable[Observation]:
        """The keys with malformed entries at the last read (every report names its key
        first, ``<key>: <what is wrong>``), at most :data:`MAX_MALFORMED_KEYS`."""
        view = self._fresh()
        keys: dict[str, int] = {}
        for error in () if view is None else view.data_errors:
            key = error.split(": ", 1)[0]
            if key in keys or len(keys) < MAX_MALFORMED_KEYS:
                keys[key] = keys.get(key, 0) + 1
        return [Observation(n, {"key": key}) for key, n in keys.items()]

    def _cluster(
        self, value: Callable[[ClusterView], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A scalar read from Redis: published only while the last read succeeded."""
        return self._scalar(lambda v: value(v) if v.redis_up else None)

    def _scalar(
        self, value: Callable[[ClusterView], float | None]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            result = value(self._view())
            return [] if result is None else [Observation(result)]

        return callback

    # -- collection ---------------------------------------------------------------------

    def _otel_families(self) -> list[Metric]:
        """The OpenTelemetry series of the pinned view (of the aggregator's when none is)."""
        with self._collecting:
            outer = self._pinned
            if outer is None:
                self._pinned = self.aggregator.view()
            try:
                return list(self._otel.collect())
            finally:
                self._pinned = outer

    def collect(self, view: ClusterView) -> list[Metric]:
        """Every series of :attr:`registry`, the cluster's from ``view``."""
        return self._collect_pinned(self.registry, view)

    def _collect_pinned(self, registry: CollectorRegistry, view: ClusterView) -> list[Metric]:
        return self._pinned_to(view, lambda: list(registry.collect()))

    def _pinned_to(self, view: ClusterView, collect: Callable[[], _T]) -> _T:
        """``collect()`` with every callback reading ``view``."""
        with self._collecting:
            self._pinned = view
            try:
                return collect()
            finally:
                self._pinned = None

    def read(self, reader: InMemoryMetricReader) -> MetricsData | None:
        """What ``reader`` (one of ``readers``) collects of the aggregator's view: the
        OpenTelemetry series that /metrics publishes, all from one view."""
        return self._pinned_to(self.aggregator.view(), reader.get_metrics_data)

    def register_own(self, collector: Any) -> None:
        """Publish ``collector``'s series (prometheus_client) among this process's own."""
        self._own.register(collector)

    def render(
        self, view: ClusterView, own: list[Metric], variants: dict[Variant, Encoder]
    ) -> dict[Variant, bytes]:
        """``variants`` of the OpenTelemetry series of ``view`` followed by ``own`` (the
        serving process's own series): what a :data:`Renderer` returns."""
        families = self._collect_pinned(self._otel, view)
        rendering = _Rendering(families + own, view, 0.0, self.collect)
        return {(t, gz): rendering.body(t, encoder, gz) for (t, gz), encoder in variants.items()}

    def own_series(self) -> list[Metric]:
        """This process's own series: process, platform, GC, build info, render failures."""
        return list(self._own.collect())

    def _rendered_elsewhere(
        self, view: ClusterView, started: float, variants: dict[Variant, Encoder]
    ) -> _Rendering | None:
        """``variants`` of ``view`` rendered by :attr:`renderer`; None when it cannot now."""
        assert self.renderer is not None
        bodies = self.renderer(view, self.aggregator.errors_total, self.own_series(), variants)
        if bodies is None:
            return None
        rendering = _Rendering(None, view, started, self.collect)
        for variant, body in bodies.items():
            rendering.add(variant, body)
        return rendering

    def _refresh(
        self,
        variants: dict[Variant, Encoder],
        *,
        read_now: bool = False,
        unless: ClusterView | None = None,
    ) -> _Rendering | None:
        """Read the view (from Redis when ``read_now``), collect it and render ``variants``;
        None when the view read is ``unless`` (another reader is refreshing it)."""
        start, wall = time.perf_counter(), time.time()
        view = self.aggregator.view(max_age=0 if read_now else None)
        if view is unless:
            return None
        rendering = None
        if self.renderer is not None and variants:
            try:
                rendering = self._rendered_elsewhere(view, wall, variants)
            except Exception as exc:  # render here this time
                self._render_failures.inc()
                self._render_errors.error(
                    "conduit-otel-cache: rendering /metrics in the render "
                    "process failed, rendering in-process: %s",
                    exc,
                )
        if rendering is None:
            rendering = _Rendering(self.collect(view), view, wall, self.collect)
            for (content_type, gzipped), encoder in variants.items():
                rendering.body(content_type, encoder, gzipped, self._give_way)
            if variants:
                rendering.seal()  # keep the bytes only (fewer objects for the garbage collector)
        rendering.duration = time.perf_counter() - start
        rendering.published = time.monotonic()
        self.refresh_seconds = rendering.duration
        self.refresh_seconds_max = max(self.refresh_seconds_max, rendering.duration)
        self.refreshes += 1
        return rendering

    def _render_now(self) -> _Rendering:
        rendering = self._refresh({})
        assert rendering is not None
        return rendering

    # -- background rendering -----------------------------------------------------------

    def start(self) -> None:
        """Start the background rendering (the first scrape also starts it)."""
        with self._lock:
            if self._thread is None and self.prerender and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name="conduit-metrics-render"
                )
                self._thread.start()

    def _want(self, variant: Variant, encoder: Encoder) -> None:
        """Note that a scrape asked for ``variant``: render it in the background from now on."""
        now = time.monotonic()
        with self._lock:
            seen = self._wanted.get(variant)
            self._wanted[variant] = (encoder, now)
        if self._thread is None:
            self.start()
        if seen is None or now - seen[1] > self.keep_warm:
            self._wake.set()

    def _give_way(self) -> None:
        """In the background refresh: wait (a little) while scrapes are being answered."""
        if self._in_flight and self._patience > 0 and threading.current_thread() is self._thread:
            start = time.perf_counter()
            self._quiet.wait(min(_GIVE_WAY, self._patience))
            self._patience -= time.perf_counter() - start

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._quiet.clear()

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._quiet.set()

    def _warm(self) -> dict[Variant, Encoder]:
        """The variants asked for within ``keep_warm``."""
        now = time.monotonic()
        with self._lock:
            return {v: e for v, (e, at) in self._wanted.items() if now - at <= self.keep_warm}

    def _due(self, rendering: _Rendering) -> float:
        """Unix time of the next refresh: just before the data reaches
        ``aggregation_cache_ttl`` age (while Redis fails, one ``aggregation_cache_ttl``
        after the last attempt)."""
        data_time = rendering.data_time
        if data_time is None or not rendering.view.redis_up:
            data_time = rendering.started
        return data_time + self.ttl - min(_EARLY, self.ttl / 10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:
                self._errors.error("conduit-otel-cache: rendering /metrics failed: %s", exc)
                self._stop.wait(self.ttl)

    def _step(self) -> None:
        variants = self._warm()
        if not variants:  # nobody scrapes: idle until a scrape asks again
            self._wake.wait()
            self._wake.clear()
            return
        current = self._current
        delay = 0.0 if current is None else self._due(current) - time.time()
        if delay > 0:
            self._wake.wait(delay)
            self._wake.clear()
            return
        with self._refreshing:
            if self._current is not current:
                return  # a scrape refreshed meanwhile
            unless = None if current is None else current.view
            self._patience = _PATIENCE
            with quietly():
                rendering = self._refresh(variants, read_now=True, unless=unless)
            if rendering is None:
                self._stop.wait(_RETRY)  # another reader is refreshing the view
                return
            self._current = rendering

    def _rendering(self) -> _Rendering:
        """The rendering a scrape answers from: the current one, or a new one when there
        is none yet or the background thread has not refreshed it in time (it was idle).
        While another refresh runs (a slow Redis), the current one (its age tells)."""
        current = self._current
        if current is not None and not self._outdated(current):
            return current
        if not self._refreshing.acquire(blocking=current is None):
            assert current is not None
            return current
        try:
            current = self._current
            if current is None or self._outdated(current):
                current = self._current = self._render_now()
            return current
        finally:
            self._refreshing.release()

    def _outdated(self, rendering: _Rendering) -> bool:
        late = time.monotonic() - rendering.published
        return late > self.ttl + max(1.0, 2 * rendering.duration)

    # -- HTTP ---------------------------------------------------------------------------

    def wsgi_app(self) -> Callable[..., Any]:
        """The WSGI app that answers ``GET /metrics`` (and HEAD) with this exporter's series:
        text or OpenMetrics by ``Accept``, gzip by ``Accept-Encoding``, filtered by
        ``name[]``, as prometheus_client negotiates them."""

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            return self._answer(environ, start_response)

        return app

    def ready_reply(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes, Callable[[], None]] | None:
        """The reply to ``GET /metrics`` (or HEAD) when the current rendering already holds
        the format asked for: status, headers, body and what to call once it is sent. No
        rendering and no I/O, so an event loop may answer with it; None for any other
        request (the WSGI app answers those)."""
        if path.rstrip("/") != "/metrics" or method not in ("GET", "HEAD") or not self.prerender:
            return None
        if "name[]" in parse_qs(query):
            return None
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        gzipped = gzip_accepted(headers.get("accept-encoding", ""))
        current = self._current
        if current is None or self._outdated(current):
            return None
        body = current.rendered(content_type, gzipped)
        if body is None:
            return None
        self._want((content_type, gzipped), encoder)
        self._enter()  # until the reply is sent: a refresh gives way meanwhile
        reply = b"" if method == "HEAD" else body
        return 200, self._headers(current, content_type, gzipped, len(body)), reply, self._leave

    def _headers(
        self, rendering: _Rendering, content_type: str, gzipped: bool, length: int
    ) -> list[tuple[str, str]]:
        headers = [("Vary", "Accept, Accept-Encoding")]
        age = _age(rendering.view, time.time())
        if age is not None:
            headers.append((DATA_AGE_HEADER, f"{age:.3f}"))
        headers += [("Content-Type", content_type), ("Content-Length", str(length))]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        return headers

    def _answer(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", "OPTIONS, GET, HEAD")])
            return []
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS, GET, HEAD")])
            return []
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
        gzipped = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        filtered = "name[]" in parse_qs(environ.get("QUERY_STRING") or "")
        if not self.prerender:
            rendering = self._render_now()
        else:
            if not filtered:
                self._want((content_type, gzipped), encoder)
            rendering = self._rendering()
        if filtered:  # rare: prometheus_client renders it from this rendering's series
            headers = [("Vary", "Accept, Accept-Encoding")]
            age = _age(rendering.view, time.time())
            if age is not None:
                headers.append((DATA_AGE_HEADER, f"{age:.3f}"))
            return self._filtered(rendering, environ, start_response, headers)
        body = rendering.body(content_type, encoder, gzipped)
        headers = self._headers(rendering, content_type, gzipped, len(body))
        self._enter()  # until the server closes the reply: a refresh gives way meanwhile
        try:
            start_response("200 OK", headers)
        except BaseException:
            self._leave()
            raise
        return _Reply([] if method == "HEAD" else [body], self._leave)

    @staticmethod
    def _filtered(
        rendering: _Rendering,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        extra: list[tuple[str, str]],
    ) -> list[bytes]:
        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *extra], exc_info)

        head = environ.get("REQUEST_METHOD") == "HEAD"
        body: list[bytes] = make_wsgi_app(rendering.registry())(
            {**environ, "REQUEST_METHOD": "GET"}, respond
        )
        return [] if head else body

    def shutdown(self) -> None:
        """Stop the background rendering and the meter provider."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self.meter_provider.shutdown()


class _Series:
    """The collector of the OpenTelemetry series on :attr:`Exposition.registry`."""

    def __init__(self, exporter: Exposition) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        return self._exporter._otel_families()


class _Reply:
    """A WSGI reply that calls ``done()`` when the server closes it (after sending it)."""

    def __init__(self, parts: list[bytes], done: Callable[[], None]) -> None:
        self._parts = parts
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def close(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()


class _Fixed:
    """A collector that returns families collected before (calling ``pause()`` after each)."""

    def __init__(self, families: list[Metric], pause: Callable[[], None] | None = None) -> None:
        self._families = families
        self._pause = pause

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family
            if self._pause is not None:
                self._pause()


class _Rendering:
    """One collection of every series, and its expositions (rendered once, when first
    asked for); never changes once published, so a scrape reads one view."""

    def __init__(
        self,
        families: list[Metric] | None,
        view: ClusterView,
        started: float,
        collect: Callable[[ClusterView], list[Metric]],
    ) -> None:
        self.view = view
        self._collect = collect  # collects ``view`` again once sealed
        self.started = started  # Unix time the refresh began
        self.data_time = _data_time(view)
        self.duration = 0.0
        self.published = time.monotonic()
        self._families: list[Metric] | None = families
        self._bodies: dict[Variant, bytes] = {}
        self._lock = threading.Lock()

    def seal(self) -> None:
        """Drop the collected series: a format asked for later collects the view again."""
        self._families = None

    def _series(self) -> list[Metric]:
        families = self._families
        return families if families is not None else self._collect(self.view)

    def add(self, variant: Variant, body: bytes) -> None:
        """Keep ``body``, rendered elsewhere, as the exposition ``variant``."""
        self._bodies[variant] = body

    def rendered(self, content_type: str, gzipped: bool) -> bytes | None:
        """The exposition as ``content_type``, gzipped or not, if rendered already."""
        return self._bodies.get((content_type, gzipped))

    def body(
        self,
        content_type: str,
        encoder: Encoder,
        gzipped: bool,
        pause: Callable[[], None] | None = None,
    ) -> bytes:
        """The exposition as ``content_type`` (as ``encoder`` writes it), gzipped or not;
        ``pause()`` runs after each family while rendering."""
        found = self._bodies.get((content_type, gzipped))
        if found is not None:
            return found
        with self._lock:
            plain = self._bodies.get((content_type, False))
            if plain is None:
                plain = self._bodies[(content_type, False)] = encoder(_Fixed(self._series(), pause))
            found = self._bodies.get((content_type, gzipped))
            if found is None:
                found = self._bodies[(content_type, True)] = gzip.compress(plain, 6)
            return found

    def registry(self) -> CollectorRegistry:
        """A registry of these series that knows their names (for ``restricted_registry``)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_Fixed(self._series()))
        return registry


def series_limit(settings: Settings) -> int:
    """Series per instrument a reader keeps: every one there is (series are bounded here,
    by regions and ``max_instance_series``, never folded by the SDK)."""
    return max(2000, settings.max_instance_series + 1)


def _data_time(view: ClusterView) -> float | None:
    """Unix time of the Redis read ``view`` reflects (when its last good aggregation began)."""
    if view.last_successful_aggregation is None:
        return None
    return view.last_successful_aggregation - view.aggregation_latency


def _age(view: ClusterView, now: float) -> float | None:
    data_time = _data_time(view)
    return None if data_time is None else max(0.0, now - data_time)

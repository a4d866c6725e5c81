"""``/metrics`` as finished bytes per format, kept warm off the request path.

A :class:`Rendering` is one view's families and their expositions (text or OpenMetrics,
gzipped or not, as prometheus_client's encoders write them), rendered once when first
asked for and never changed after: concurrent scrapes of it see one consistent view.

:class:`Renderings` keeps the current one. Once a format has been asked for, a background
thread reads the view and renders it every ``aggregation_cache_ttl`` (for ``keep_warm``
seconds after the last scrape that asked), so that no scrape waits for the Redis read or
the rendering. The data a scrape sees is at most ``aggregation_cache_ttl`` plus one
refresh (Redis read and rendering) old. With ``aggregation_cache_ttl`` 0 (or
``prerender=False``) every scrape collects and renders on demand. A ``renderer``
(``serve``'s :class:`~conduit_otel_cache.serve.render_process.RenderProcess`) renders a
background refresh in another process; when it cannot, or fails, the refresh renders here.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric

from ..aggregate import ClusterView
from ..background import quietly
from ..ratelimit import RateLimitedLog
from .series import data_time

log = logging.getLogger(__name__)

#: seconds a format stays rendered in the background after the last scrape that asked for it
KEEP_WARM = 300.0
_RETRY = 0.005  # seconds before asking again when another reader is refreshing the view
_EARLY = 0.01  # seconds a refresh starts before the data reaches its TTL (timer slack)
#: A background refresh gives way to scrapes in flight (between metric families, for at
#: most this many seconds each time) and runs quietly (background.py), so that a scrape
#: that arrives during a refresh waits for the interpreter lock for fractions of a
#: millisecond, not 5 ms a time.
_GIVE_WAY = 0.02
_PATIENCE = 0.25  # seconds one refresh gives way in all (it must end: the data age bound)

Encoder = Callable[[Any], bytes]
Variant = tuple[str, bool]  # (content type, gzipped)
#: ``(view, {variant: encoder}) -> {variant: bytes}`` of every series of ``view``, rendered
#: elsewhere; None when it cannot now (then the refresh renders here)
Renderer = Callable[[ClusterView, dict[Variant, Encoder]], dict[Variant, bytes] | None]


def encode(families: list[Metric], variants: dict[Variant, Encoder]) -> dict[Variant, bytes]:
    """``variants`` of ``families``: each format encoded once, and gzipped from that."""
    plain: dict[str, bytes] = {}
    bodies: dict[Variant, bytes] = {}
    for (content_type, gzipped), encoder in variants.items():
        if content_type not in plain:
            plain[content_type] = encoder(_Fixed(families))
        body = plain[content_type]
        bodies[(content_type, gzipped)] = gzip.compress(body, 6) if gzipped else body
    return bodies


class Rendering:
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
        self.data_time = data_time(view)
        self.duration = 0.0
        self.published = time.monotonic()
        self._families: list[Metric] | None = families
        self._bodies: dict[Variant, bytes] = {}
        self._lock = threading.Lock()

    def seal(self) -> None:
        """Drop the collected series: a format asked for later collects the view again."""
        self._families = None

    def series(self) -> list[Metric]:
        """Every family of this rendering."""
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
                plain = self._bodies[(content_type, False)] = encoder(_Fixed(self.series(), pause))
            found = self._bodies.get((content_type, gzipped))
            if found is None:
                found = self._bodies[(content_type, True)] = gzip.compress(plain, 6)
            return found

    def registry(self) -> CollectorRegistry:
        """A registry of these series that knows their names (for ``restricted_registry``)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_Fixed(self.series()))
        return registry


class Renderings:
    """The current :class:`Rendering` of the view that ``read(max_age)`` returns, with
    every series ``collect(view)`` gives, refreshed in the background while scrapes ask."""

    def __init__(
        self,
        read: Callable[[float | None], ClusterView],
        collect: Callable[[ClusterView], list[Metric]],
        *,
        ttl: float,
        prerender: bool = True,
        keep_warm: float = KEEP_WARM,
        renderer: Renderer | None = None,
        stale: Callable[[ClusterView], bool] = lambda view: False,
    ) -> None:
        self.read = read
        self.collect = collect
        #: whether a view is too old to publish the cluster's series from (series.stale)
        self.stale = stale
        self.ttl = ttl
        #: render in the background and serve finished bytes (needs a TTL above 0)
        self.prerender = prerender and ttl > 0
        self.keep_warm = keep_warm
        self.renderer = renderer
        #: duration in seconds of the last refresh (view read, collection, rendering)
        self.refresh_seconds = 0.0
        self.refresh_seconds_max = 0.0
        self.refreshes = 0
        #: background refreshes the renderer failed (each was rendered here instead)
        self.render_failures = Counter(
            "conduit_cache_exporter_render_failures",
            "Background refreshes the renderer (serve's render process) failed; each was "
            "rendered in-process instead",
            registry=None,
        )
        self.current: Rendering | None = None
        self._refreshing = threading.Lock()  # one refresh at a time
        self._lock = threading.Lock()
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

    # -- what a scrape asks --------------------------------------------------------------

    def rendering(self) -> Rendering:
        """The rendering a scrape answers from: the current one, or a new one when there
        is none yet or the background thread has not refreshed it in time (it was idle).
        While another refresh runs (a slow Redis), the current one (its age tells). Without
        ``prerender``, a new one each time."""
        if not self.prerender:
            return self._render_now()
        current = self.current
        if current is not None and not self.outdated(current):
            return current
        if not self._refreshing.acquire(blocking=current is None):
            assert current is not None
            if self.stale(current.view):  # the refresh has not ended for too long: collected
                return Rendering(None, current.view, time.time(), self.collect)  # anew, now
            return current
        try:
            current = self.current
            if current is None or self.outdated(current):
                current = self.current = self._render_now()
            return current
        finally:
            self._refreshing.release()

    def outdated(self, rendering: Rendering) -> bool:
        """Whether ``rendering`` missed its refresh (the background thread was idle)."""
        late = time.monotonic() - rendering.published
        return late > self.ttl + max(1.0, 2 * rendering.duration)

    def want(self, variant: Variant, encoder: Encoder) -> None:
        """Note that a scrape asked for ``variant``: render it in the background from now on."""
        now = time.monotonic()
        with self._lock:
            seen = self._wanted.get(variant)
            self._wanted[variant] = (encoder, now)
        if self._thread is None:
            self.start()
        if seen is None or now - seen[1] > self.keep_warm:
            self._wake.set()

    def enter(self) -> None:
        """A reply is being sent: a background refresh gives way until :meth:`leave`."""
        with self._lock:
            self._in_flight += 1
            self._quiet.clear()

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._quiet.set()

    # -- refreshing ----------------------------------------------------------------------

    def _refresh(
        self,
        variants: dict[Variant, Encoder],
        *,
        read_now: bool = False,
        unless: ClusterView | None = None,
    ) -> Rendering | None:
        """Read the view (from Redis when ``read_now``), collect it and render ``variants``;
        None when the view read is ``unless`` (another reader is refreshing it)."""
        start, wall = time.perf_counter(), time.time()
        view = self.read(0 if read_now else None)
        if view is unless:
            return None
        rendering = None
        if self.renderer is not None and variants:
            try:
                rendering = self._rendered_elsewhere(view, wall, variants)
            except Exception as exc:  # render here this time
                self.render_failures.inc()
                self._render_errors.error(
                    "conduit-otel-cache: rendering /metrics in the render "
                    "process failed, rendering in-process: %s",
                    exc,
                )
        if rendering is None:
            rendering = Rendering(self.collect(view), view, wall, self.collect)
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

    def _rendered_elsewhere(
        self, view: ClusterView, started: float, variants: dict[Variant, Encoder]
    ) -> Rendering | None:
        """``variants`` of ``view`` rendered by :attr:`renderer`; None when it cannot now."""
        assert self.renderer is not None
        bodies = self.renderer(view, variants)
        if bodies is None:
            return None
        rendering = Rendering(None, view, started, self.collect)
        for variant, body in bodies.items():
            rendering.add(variant, body)
        return rendering

    def _render_now(self) -> Rendering:
        rendering = self._refresh({})
        assert rendering is not None
        return rendering

    def start(self) -> None:
        """Start the background rendering (the first scrape also starts it)."""
        with self._lock:
            if self._thread is None and self.prerender and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name="conduit-metrics-render"
                )
                self._thread.start()

    def _give_way(self) -> None:
        """In the background refresh: wait (a little) while scrapes are being answered."""
        if self._in_flight and self._patience > 0 and threading.current_thread() is self._thread:
            start = time.perf_counter()
            self._quiet.wait(min(_GIVE_WAY, self._patience))
            self._patience -= time.perf_counter() - start

    def _warm(self) -> dict[Variant, Encoder]:
        """The variants asked for within ``keep_warm``."""
        now = time.monotonic()
        with self._lock:
            return {v: e for v, (e, at) in self._wanted.items() if now - at <= self.keep_warm}

    def _due(self, rendering: Rendering) -> float:
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
        current = self.current
        delay = 0.0 if current is None else self._due(current) - time.time()
        if delay > 0:
            self._wake.wait(delay)
            self._wake.clear()
            return
        with self._refreshing:
            if self.current is not current:
                return  # a scrape refreshed meanwhile
            unless = None if current is None else current.view
            self._patience = _PATIENCE
            with quietly():  # the first one takes a view still fresh (read at start-up)
                rendering = self._refresh(variants, read_now=current is not None, unless=unless)
            if rendering is None:
                self._stop.wait(_RETRY)  # another reader is refreshing the view
                return
            self.current = rendering

    def shutdown(self) -> None:
        """Stop the background rendering."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)


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

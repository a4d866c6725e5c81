"""The exporter service behind ``serve`` and the demo: HTTP server plus cleanup job."""

from __future__ import annotations

import gc
import logging
import threading

from .. import __version__
from ..aggregate import Aggregator, ClusterView
from ..api import make_stats_app
from ..config import Settings
from ..health import Health, evaluate
from ..model import Statistics
from ..recovery import Recoverer
from ..shards import open_store
from .exposition import Exposition
from .http import make_app, make_http_server
from .landing import landing_page
from .otlp import OtlpPush
from .render_process import RenderProcess
from .webconfig import BasicAuth, LiveWebConfig, WebConfig

log = logging.getLogger(__name__)

#: Seconds between two looks at the web configuration's files (a changed one is reloaded).
WEB_CONFIG_CHECK_INTERVAL = 5.0
#: how often ``serve`` with ``spool_dir`` (a sidecar) recovers dead incarnations' spools
SPOOL_RECOVERY_INTERVAL = 5.0
#: The probes that ``probes_without_auth`` leaves open.
PROBES = ("/-/healthy", "/-/ready")


class ExporterService:
    """Serves ``/metrics``, ``/health``, the probes ``/-/healthy`` and ``/-/ready``,
    ``/api/cache/stats/distributed`` and a landing page for the cluster of
    ``settings.redis_url``, and removes long-dead instances every ``cleanup_interval``.
    ``web_config`` (``serve --web-config-file``, or ``--certfile``) adds TLS and basic auth,
    read again when its files change (every ``WEB_CONFIG_CHECK_INTERVAL`` s) or at
    :meth:`reload_web_config`; ``probes_without_auth`` leaves ``/-/healthy`` and
    ``/-/ready`` open. With ``render_process`` (as ``serve`` runs) ``/metrics`` is rendered
    in a child process (:mod:`~conduit_otel_cache.serve.render_process`). With
    ``settings.otlp_endpoint`` the same series are pushed over OTLP/HTTP every
    ``otlp_interval`` (:mod:`~conduit_otel_cache.serve.otlp`)."""

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        web_config: WebConfig | None = None,
        probes_without_auth: bool = False,
        render_process: bool = False,
    ) -> None:
        self.settings = settings
        self.serve = serve = settings.serve
        self.store = open_store(settings.connection)
        self.aggregator = Aggregator(self.store, settings.aggregation, background=True)
        self.push = OtlpPush(serve) if serve.otlp_endpoint is not None else None
        self.exposition = Exposition(self.aggregator, serve)
        if self.push is not None:
            self.exposition.register_own(self.push.pushes)
        self._reached = threading.Event()  # Redis answered once: /-/ready
        api = make_stats_app(cluster=self.cluster_regions)  # /api/cache/stats/distributed
        landing = landing_page(__version__, serve.safe_redis_url)
        self.app = make_app(
            self.exposition.route.wsgi_app, self.health, api, ready=self.ready, landing=landing
        )
        web = web_config or WebConfig()
        auth = None
        if web.users:
            auth = BasicAuth(self.app, web.users, PROBES if probes_without_auth else ())
        self.web_config = LiveWebConfig(web, auth)
        # /metrics from finished bytes on the event loop (with basic auth: through the app)
        direct = None if web.users else self.exposition.route.ready_reply
        self.server = make_http_server(
            auth or self.app, host, port, ssl_context=web.ssl_context, direct=direct
        )
        self.port: int = self.server.server_address[1]
        self.tls = web.ssl_context is not None
        self._stop = threading.Event()
        self._reload_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._render_wanted = render_process
        self.render_process: RenderProcess | None = None

    def health(self) -> Health:
        """The health rules applied to the current cluster view."""
        return evaluate(self._view(), self.serve.health)

    def ready(self) -> bool:
        """Whether Redis was reached at least once (``/-/ready``); never waits for Redis."""
        return self._reached.is_set()

    def _view(self) -> ClusterView:
        view = self.aggregator.view()
        if view.last_successful_aggregation is not None:
            self._reached.set()
        return view

    def cluster_regions(self) -> dict[str, Statistics]:
        """Cluster statistics per region (the last good ones while Redis is unreachable);
        raises ``ConnectionError`` when Redis was never reached."""
        view = self._view()
        if not view.redis_up and view.last_successful_aggregation is None:
            raise ConnectionError(view.redis_error or "redis unreachable")
        return dict(view.regions)

    def start(self, *, freeze: bool = False) -> ExporterService:
        """Start serving in background threads. ``freeze`` (the process is this service's,
        as in ``serve``): what the process holds by then (modules, the SDK, this service)
        is frozen out of the cyclic garbage collector (``gc.freeze()``), so that a full
        collection walks only what came later: a pause of a few ms, not tens, while
        scrapes wait."""
        if self._render_wanted and self.exposition.renderings.prerender:
            self.render_process = RenderProcess(self.serve)
            self.exposition.render_elsewhere(self.render_process.render)
        if freeze:
            gc.collect()
            gc.freeze()
            self.server.collect_when_idle()
        self.aggregator.start()
        if self.push is not None:
            self.push.start(self.exposition.series)
        targets = [self.server.serve_forever, self._cleanup_loop]
        if self.serve.spool_dir is not None:  # a sidecar of the application's pod
            targets.append(self._recovery_loop)
        if self.web_config.config.source is not None:
            targets.append(self._web_config_loop)
        for target in targets:
            thread = threading.Thread(target=target, daemon=True, name=f"conduit-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def _cleanup_loop(self) -> None:
        while not self._reached.is_set() and not self._stop.is_set():  # until Redis answers
            self._view()
            self._stop.wait(1.0)
        while not self._stop.wait(self.serve.cleanup_interval):
            try:
                removed = self.store.cleanup(self.serve.retention_period)
                if removed:
                    log.info("cleanup removed %d dead instance(s)", len(removed))
            except Exception as exc:
                log.warning("cleanup failed: %s: %s", type(exc).__name__, exc)

    def _recovery_loop(self) -> None:
        """Recover the spools of dead incarnations in ``spool_dir`` (:mod:`.recovery`)."""
        recoverer = Recoverer(self.settings.write_through, self.store)
        recoverer.loop(self._stop, SPOOL_RECOVERY_INTERVAL, tuple)

    def reload_web_config(self) -> None:
        """Read the web configuration's files again now (``SIGHUP``), changed or not."""
        self._reload_now.set()

    def _web_config_loop(self) -> None:
        while True:
            forced = self._reload_now.wait(WEB_CONFIG_CHECK_INTERVAL)
            self._reload_now.clear()
            if self._stop.is_set():
                return
            try:
                self.web_config.reload(force=forced)
            except Exception as exc:  # the running configuration stays
                log.error("web configuration not reloaded: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        """Stop serving and release Redis connections."""
        self._stop.set()
        self._reload_now.set()
        self.aggregator.stop()
        if self._threads:  # shutdown() waits for serve_forever, which only start() runs
            self.server.shutdown()
        self.server.server_close()
        if self.push is not None:
            self.push.stop()
        self.exposition.shutdown()
        if self.render_process is not None:
            self.render_process.close()
        self.store.close()

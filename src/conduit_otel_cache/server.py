"""The exporter service behind ``serve`` and the demo: HTTP server plus cleanup job."""

from __future__ import annotations

import logging
import threading

from .aggregate import Aggregator
from .api import make_stats_app
from .config import Settings
from .exporter import ClusterExporter
from .health import Health, evaluate
from .http import make_app, make_http_server
from .model import Statistics
from .store import Store

log = logging.getLogger(__name__)


class ExporterService:
    """Serves ``/metrics``, ``/health`` and ``/api/cache/stats/distributed`` for the cluster
    of ``settings.redis_url`` and removes long-dead instances every ``cleanup_interval``."""

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.aggregator = Aggregator(self.store, settings, background=True)
        self.exporter = ClusterExporter(self.aggregator)
        api = make_stats_app(cluster=self.cluster_regions)  # /api/cache/stats/distributed
        self.app = make_app(self.exporter.wsgi_app(), self.health, api)
        self.server = make_http_server(self.app, host, port, certfile, keyfile)
        self.port: int = self.server.server_address[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def health(self) -> Health:
        """The health rules applied to the current cluster view."""
        return evaluate(self.aggregator.view(), self.settings)

    def cluster_regions(self) -> dict[str, Statistics]:
        """Cluster statistics per region (the last good ones while Redis is unreachable);
        raises ``ConnectionError`` when Redis was never reached."""
        view = self.aggregator.view()
        if not view.redis_up and view.last_successful_aggregation is None:
            raise ConnectionError(view.redis_error or "redis unreachable")
        return dict(view.regions)

    def start(self) -> ExporterService:
        """Start serving in background threads."""
        self.aggregator.start()
        for target in (self.server.serve_forever, self._cleanup_loop):
            thread = threading.Thread(target=target, daemon=True, name=f"conduit-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def _cleanup_loop(self) -> None:
        while not self._stop.wait(self.settings.cleanup_interval):
            try:
                removed = self.store.cleanup(self.settings.retention_period)
                if removed:
                    log.info("cleanup removed %d dead instance(s)", len(removed))
            except Exception as exc:
                log.warning("cleanup failed: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        """Stop serving and release Redis connections."""
        self._stop.set()
        self.aggregator.stop()
        if self._threads:  # shutdown() waits for serve_forever, which only start() runs
            self.server.shutdown()
        self.server.server_close()
        self.exporter.shutdown()
        self.store.close()

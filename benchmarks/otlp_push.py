"""What one OTLP push of ``serve`` costs at cluster scale, beside one ``/metrics`` rendering
of the same view in the same run.

``python -m benchmarks.otlp_push [--quick]``

An ``ExporterService`` (as ``serve`` builds it, with ``otlp_endpoint``) reads a cluster
written as in ``benchmarks.scale`` to a real redis-server; a receiver in this process takes
each OTLP/HTTP request and answers ``200`` without decoding it. Figures (median of 5): data
points per push; the collection (the series of one view, as OpenTelemetry data); the whole
push (collection, protobuf encoding, HTTP); the request size; and, as the
yardstick, collecting and rendering ``/metrics`` as text from the same view
(``generate_latest`` of the exposition's registry, what a scrape that finds no rendering
costs). All in the serving process, in CPU-bound pure Python.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client import generate_latest

from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.serve.otlp import metrics_data
from conduit_otel_cache.serve.service import ExporterService
from conduit_otel_cache.store import Store

from .common import ratio, show
from .scale import populate

REPEAT = 5


class _Discard(BaseHTTPRequestHandler):
    sizes: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.sizes.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def measure(n: int, r: int) -> list[str]:
    """One row: ``n`` instances x ``r`` regions."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with RedisServer() as redis_server:
        populate(Store.from_settings(Settings.load(redis_url=redis_server.url).connection), n, r)
        settings = Settings.load(
            redis_url=redis_server.url,
            otlp_endpoint=f"http://127.0.0.1:{receiver.server_address[1]}",
            otlp_interval=3600,
            aggregation_cache_ttl=3600,  # one view for every figure
        )
        service = ExporterService(settings, port=0)
        push = service.push
        assert push is not None
        try:
            service.aggregator.refresh_instances()
            push.start(service.exposition.series)  # the first push, then one an hour
            collect, whole, render = [], [], []
            for _ in range(REPEAT):
                start = time.perf_counter()
                data = metrics_data(
                    service.exposition.series(), push.resource, push.start_ns, time.time_ns()
                )
                collect.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert push.push()
                whole.append(time.perf_counter() - start)
                start = time.perf_counter()
                body = generate_latest(service.exposition.registry)
                render.append(time.perf_counter() - start)
            assert data is not None
            points = sum(len(m.data.data_points) for rm in data.resource_metrics
                         for sm in rm.scope_metrics for m in sm.metrics)  # fmt: skip
        finally:
            service.stop()
            receiver.shutdown()
            receiver.server_close()
    ms = [statistics.median(t) * 1000 for t in (collect, whole, render)]
    return [f"{n} x {r}", str(points), f"{ms[0]:.1f}", f"{ms[1]:.1f}",
            f"{_Discard.sizes[-1] / 1024:.0f}", f"{ms[2]:.1f}", f"{len(body) / 1024:.0f}",
            ratio(ms[1] / 1000, ms[2] / 1000)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 x 10 only")
    args = parser.parse_args()
    sizes = [(100, 10)] if args.quick else [(100, 10), (1000, 100)]
    rows = [measure(n, r) for n, r in sizes]
    show("OTLP push beside /metrics (serving process, median ms)",
                ["instances x regions", "points", "collect", "push", "request KiB",
                 "/metrics collect+render", "text KiB", "push / render"], rows)  # fmt: skip


if __name__ == "__main__":
    main()

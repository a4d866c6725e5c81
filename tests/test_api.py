"""``/api/cache/stats/local`` and ``/distributed`` over real HTTP, on a real Redis."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import wsgiref.util
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Any
from unittest.mock import ANY

import pytest
import uvicorn

from conduit_otel_cache import Settings, Statistics
from conduit_otel_cache.api import make_stats_app, make_stats_asgi_app
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.serve.http import make_http_server
from conduit_otel_cache.serve.service import ExporterService

from .conftest import MakeStats, wait_for

MiB = 1024 * 1024


def _get(url: str, method: str = "GET") -> tuple[int, Message, Any]:
    """Status, headers (case-insensitive) and JSON body of one request."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            status, headers = response.status, response.headers
    except urllib.error.HTTPError as err:
        body, status, headers = err.read(), err.code, err.headers
    return status, headers, json.loads(body) if body else None


@pytest.fixture
def serve_app() -> Iterator[Callable[[Any], str]]:
    """Serve a WSGI app over real HTTP on a free port; returns its base URL."""
    servers = []

    def serve(app: Any) -> str:
        server = make_http_server(app, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve_asgi() -> Iterator[Callable[[Any], str]]:
    """Serve an ASGI app with uvicorn over real HTTP on a free port; returns its base URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(app: Any) -> str:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started)
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(params=["wsgi", "asgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_mountable_app_serves_local_and_distributed(
    kind: str,
    make_stats: MakeStats,
    serve_app: Callable[[Any], str],
    serve_asgi: Callable[[Any], str],
) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    for _ in range(3):
        a.record_hit("ProviderResponses", 0.001)
    a.record_miss("ProviderResponses", 0.003)
    a.set_size_bytes("ProviderResponses", 2 * MiB)
    b.record_miss("ProviderResponses", 0.004)
    b.set_size_bytes("ProviderResponses", MiB)
    assert a.flush() and b.flush()
    base = serve_app(a.wsgi_app()) if kind == "wsgi" else serve_asgi(a.asgi_app())

    status, headers, local = _get(base + "/api/cache/stats/local")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert local == {"ProviderResponses": {"hit_ratio": 0.75, "total_requests": 4,
                                           "avg_response_time_ms": 1.5,
                                           "memory_size_mb": 2.0}}  # fmt: skip

    status, _, cluster = _get(base + "/api/cache/stats/distributed")
    assert status == 200
    region = cluster["ProviderResponses"]
    assert region["total_requests"] == 5 and region["hit_ratio"] == 0.6
    assert region["avg_response_time_ms"] == pytest.approx((3 * 1 + 3 + 4) / 5)
    assert region["memory_size_mb"] == 3.0  # both live instances

    assert _get(base + "/api/cache/stats")[0] == 404
    assert _get(base + "/api/cache/stats/other")[0] == 404
    status, headers, _ = _get(base + "/api/cache/stats/local", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = _get(base + "/api/cache/stats/local", method="HEAD")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 0


def test_wsgi_app_from_sources_and_a_failing_source() -> None:
    def boom() -> dict[str, Statistics]:
        raise ConnectionError("redis down")

    app = make_stats_app(
        local=lambda: {"R": Statistics(hit_count=1, size_bytes=MiB // 2)}, cluster=boom
    )
    replies: list[str] = []

    def call(path: str) -> tuple[str, Any]:
        environ: dict[str, Any] = {"PATH_INFO": path}
        wsgiref.util.setup_testing_defaults(environ)
        body = b"".join(app(environ, lambda status, headers: replies.append(status)))
        return replies[-1], json.loads(body)

    status, body = call("/api/cache/stats/local")
    assert status == "200 OK"
    assert body == {"R": {"hit_ratio": 1.0, "total_requests": 1, "avg_response_time_ms": 0.0,
                          "memory_size_mb": 0.5}}  # fmt: skip
    status, body = call("/api/cache/stats/distributed")
    assert status.startswith("503") and "redis down" in body["error"]
    app = make_stats_app(local=dict)  # no cluster source: that path is not served
    status, body = call("/api/cache/stats/distributed")
    assert status.startswith("404") and body == {"error": "not found"}
    assert call("/api/cache/stats/local") == ("200 OK", {})


def test_serve_routes_distributed_to_the_cluster_view(
    make_stats: MakeStats, redis_url: str
) -> None:
    a, b = make_stats("api-1"), make_stats("api-2")
    a.record_hit("Sessions", 0.002)
    a.record_hit("Sessions", 0.002)
    b.record_miss("Sessions", 0.008)
    b.set_size_bytes("Sessions", 3 * MiB)
    assert a.flush() and b.flush()
    service = ExporterService(Settings.load({}, redis_url=redis_url, aggregation_cache_ttl=0),
                              port=0).start()  # fmt: skip
    try:
        base = f"http://127.0.0.1:{service.port}"
        status, _, body = _get(base + "/api/cache/stats/distributed")
        assert status == 200
        assert body == {
            "Sessions": {
                "hit_ratio": pytest.approx(0.666667),
                "total_requests": 3,
                "avg_response_time_ms": 4.0,
                "memory_size_mb": 3.0,
            }
        }
        assert _get(base + "/api/cache/stats/local")[0] == 404  # serve has no local instance
        assert _get(base + "/api/cache/stats/distributed", method="DELETE")[0] == 405
        assert _get(base + "/health")[0] == 200  # the other routes still work
        assert _get(base + "/nope")[0] == 404
    finally:
        service.stop()


def test_serve_answers_503_when_redis_was_never_reached() -> None:
    with RedisServer() as server:
        url = server.url
    service = ExporterService(Settings.load({}, redis_url=url, connect_timeout=0.5,
                                            socket_timeout=0.5), port=0).start()  # fmt: skip
    try:
        status, _, body = _get(f"http://127.0.0.1:{service.port}/api/cache/stats/distributed")
        assert status == 503 and "error" in body
    finally:
        service.stop()


def test_asgi_app_from_sources_and_a_failing_source(serve_asgi: Callable[[Any], str]) -> None:
    def boom() -> dict[str, Statistics]:
        raise ConnectionError("redis down")

    base = serve_asgi(make_stats_asgi_app(
        local=lambda: {"R": Statistics(hit_count=1, size_bytes=MiB // 2)}, cluster=boom
    ))  # fmt: skip
    status, _, body = _get(base + "/api/cache/stats/local")
    assert (status, body) == (
        200,
        {
            "R": {
                "hit_ratio": 1.0,
                "total_requests": 1,
                "avg_response_time_ms": 0.0,
                "memory_size_mb": 0.5,
            }
        },
    )
    status, _, body = _get(base + "/api/cache/stats/distributed")
    assert status == 503 and "redis down" in body["error"]
    base = serve_asgi(make_stats_asgi_app(local=dict))  # no cluster source: not served
    assert _get(base + "/api/cache/stats/distributed") == (404, ANY, {"error": "not found"})
    assert _get(base + "/api/cache/stats/local")[::2] == (200, {})

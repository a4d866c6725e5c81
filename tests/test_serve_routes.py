"""`serve` routes: HEAD everywhere, the probes apart from /health, the landing page."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conduit_otel_cache import __version__
from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.serve.service import ExporterService
from tests.conftest import MakeStats, wait_for

ROUTES = ["/", "/metrics", "/health", "/health/cache_statistics", "/-/healthy", "/-/ready",
          "/api/cache/stats/distributed"]  # fmt: skip


def call(url: str, method: str = "GET") -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture
def base(make_stats: MakeStats, redis_url: str) -> Iterator[str]:
    stats = make_stats("api-1")
    stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    service = ExporterService(Settings.load(redis_url=redis_url), port=0).start()
    try:
        service.health()  # forces the first read of Redis instead of waiting for it
        assert service.ready()
        yield f"http://127.0.0.1:{service.port}"
    finally:
        service.stop()


@pytest.mark.parametrize("path", ROUTES)
def test_head_is_get_without_the_body(base: str, path: str) -> None:
    status, headers, body = call(base + path)
    assert status == 200 and body
    head_status, head_headers, head_body = call(base + path, "HEAD")
    assert (head_status, head_body) == (200, b"")
    assert head_headers["Content-Type"] == headers["Content-Type"]
    if path in ("/", "/-/healthy", "/-/ready"):  # the same bytes every time
        assert int(head_headers["Content-Length"]) == len(body)
    else:  # /metrics and the JSON carry timings, so lengths vary by a few bytes
        assert abs(int(head_headers["Content-Length"]) - len(body)) < 64


def test_methods_other_than_get_and_head_are_refused(base: str) -> None:
    for path in ROUTES:
        for method in ("POST", "DELETE", "OPTIONS"):
            status, headers, _ = call(base + path, method)
            assert status == 405 and headers["Allow"] == "GET, HEAD", (path, method)
    assert call(base + "/nope")[0] == 404
    assert call(base + "/-/nope", "HEAD")[0] == 404


def test_landing_page_names_the_exporter_version_and_masked_redis() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings.load(redis_url=url, connect_timeout=0.2, socket_timeout=0.2,
                             connect_retries=0)  # fmt: skip
    service = ExporterService(settings, port=0).start()
    try:
        status, headers, body = call(f"http://127.0.0.1:{service.port}/")
    finally:
        service.stop()
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "conduit-otel-cache exporter" in page and __version__ in page
    assert settings.safe_redis_url in page and "***" in page and "hunter2" not in page
    for href in ("metrics", "health", "-/healthy", "-/ready", "api/cache/stats/distributed"):
        assert f'href="{href}"' in page


def test_probes_apart_from_the_cluster_report() -> None:
    redis = RedisServer()  # not started yet: Redis was never reached
    settings = Settings.load(redis_url=redis.url, connect_timeout=0.2, socket_timeout=0.2,
                             aggregation_cache_ttl=0, connect_retries=0)  # fmt: skip
    service = ExporterService(settings, port=0).start()
    base = f"http://127.0.0.1:{service.port}"
    try:
        assert call(base + "/-/healthy")[::2] == (200, b"Healthy\n")  # the process serves
        assert call(base + "/-/ready")[0] == 503
        assert call(base + "/health")[0] == 503  # the cluster report: Unhealthy
        with redis:
            wait_for(lambda: call(base + "/-/ready")[0] == 200)
            assert call(base + "/-/ready")[2] == b"Ready\n"
            assert call(base + "/health")[0] == 503  # no live instance: still Unhealthy
        # Redis gone again: still ready (it was reached), still alive; /health says why
        assert call(base + "/-/ready")[0] == 200 and call(base + "/-/healthy")[0] == 200
        status, _, body = call(base + "/health")
        assert status == 503 and b"Redis unreachable" in body
    finally:
        service.stop()


def test_replies_carry_the_standard_reason_phrase(base: str) -> None:
    port = int(base.rsplit(":", 1)[1])
    lines = {}
    for path, method in (("/metrics", "GET"), ("/metrics", "POST"), ("/nowhere", "GET")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode())
            lines[method, path] = sock.makefile("rb").readline()
    assert lines == {
        ("GET", "/metrics"): b"HTTP/1.1 200 OK\r\n",
        ("POST", "/metrics"): b"HTTP/1.1 405 Method Not Allowed\r\n",
        ("GET", "/nowhere"): b"HTTP/1.1 404 Not Found\r\n",
    }

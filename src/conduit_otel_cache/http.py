"""The WSGI app: ``/metrics``, ``/health``, ``/health/cache_statistics``; and a server for it."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from .health import Health

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def make_app(
    metrics_app: Callable[..., Any],
    health: Callable[[], Health],
    api: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """A WSGI app serving ``/metrics`` with the WSGI app ``metrics_app`` and the ``health()``
    report; every path under ``/api/`` goes, unchanged, to the WSGI app ``api`` when given."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if api is not None and path.startswith("/api/"):
            mounted: Iterable[bytes] = api(environ, start_response)
            return mounted
        routes = ("/metrics", "/health", "/health/cache_statistics")
        refused = refuse(start_response, method, found=path.rstrip("/") in routes)
        if refused is not None:
            return refused
        if path.rstrip("/") == "/metrics":
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        report = health()
        payload = report.report_json() if path.rstrip("/") == "/health" else report.check_json()
        status = "200 OK" if report.http_status == 200 else "503 Service Unavailable"
        return json_reply(start_response, status, payload, method)

    return app


Refusal = tuple[str, Any, list[tuple[str, str]]]


def refusal(method: str, *, found: bool) -> Refusal | None:
    """Status, JSON and headers of a 404 for an unknown path or a 405 for methods other
    than GET and HEAD; None when the request may go on."""
    if not found:
        return "404 Not Found", {"error": "not found"}, []
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", {"error": "use GET"}, [("Allow", "GET, HEAD")]
    return None


def refuse(start_response: StartResponse, method: str, *, found: bool) -> list[bytes] | None:
    """:func:`refusal` sent as the WSGI reply; None when the request may go on."""
    refused = refusal(method, found=found)
    if refused is None:
        return None
    status, payload, headers = refused
    return json_reply(start_response, status, payload, method, headers)


def json_reply(
    start_response: StartResponse,
    status: str,
    payload: Any,
    method: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """Send ``payload`` as a JSON response (no body for HEAD)."""
    body = json.dumps(payload, indent=2).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), *(headers or [])])  # fmt: skip
    return [] if method == "HEAD" else [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Do not log every request."""


def make_http_server(
    app: Callable[..., Any],
    host: str,
    port: int,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> ThreadingWSGIServer:
    """A threading HTTP server for ``app`` (``serve_forever()`` it; port 0 picks a free one);
    HTTPS when ``certfile`` (and ``keyfile``) are given."""
    server: ThreadingWSGIServer = make_server(
        host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
    )
    if certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server

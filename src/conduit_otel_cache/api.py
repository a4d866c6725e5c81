"""Mountable WSGI and ASGI apps: ``GET /api/cache/stats/local`` and
``/api/cache/stats/distributed``.

The JSON is one object per region, in snake_case::

    {"ProviderResponses": {"hit_ratio": 0.75, "total_requests": 4,
                           "avg_response_time_ms": 1.5, "memory_size_mb": 1.0}}

``hit_ratio`` is hits over requests (0-1), ``avg_response_time_ms`` the mean response time in
milliseconds, ``memory_size_mb`` the region's ``size_bytes`` in MiB. The app routes on the
full path (``PATH_INFO``, or the ASGI scope's ``path``), so mount it at the root of a
path-dispatching server (``serve`` passes every ``/api/`` request to it unchanged).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from .model import Statistics

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]
StatsSource = Callable[[], Mapping[str, Statistics]]

LOCAL_PATH = "/api/cache/stats/local"
DISTRIBUTED_PATH = "/api/cache/stats/distributed"


def stats_json(statistics: Statistics) -> dict[str, Any]:
    """One region in the controller shape (snake_case keys)."""
    return {
        "hit_ratio": round(statistics.hit_ratio, 6),
        "total_requests": statistics.total_requests,
        "avg_response_time_ms": round(statistics.average_response_time * 1000, 4),
        "memory_size_mb": round(statistics.size_bytes / (1024 * 1024), 6),
    }


def make_stats_app(
    *, local: StatsSource | None = None, cluster: StatsSource | None = None
) -> WSGIApp:
    """A WSGI app serving ``local()`` at :data:`LOCAL_PATH` and ``cluster()`` at
    :data:`DISTRIBUTED_PATH` (a source that is None answers 404). Other paths answer 404,
    methods other than GET and HEAD 405, and a source that raises 503."""
    routes = {LOCAL_PATH: local, DISTRIBUTED_PATH: cluster}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        source = routes.get((environ.get("PATH_INFO") or "/").rstrip("/"))
        refused = refuse(start_response, method, found=source is not None)
        if refused is not None or source is None:
            return refused or []
        status, payload = _answer(source)
        return json_reply(start_response, status, payload, method)

    return app


def make_stats_asgi_app(
    *, local: StatsSource | None = None, cluster: StatsSource | None = None
) -> ASGIApp:
    """The ASGI twin of :func:`make_stats_app` (same routes, replies and JSON); the
    sources run in a worker thread, so a Redis read never blocks the event loop."""
    routes = {LOCAL_PATH: local, DISTRIBUTED_PATH: cluster}

    async def app(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to set up or serve
            return
        method = scope.get("method", "GET")
        source = routes.get((scope.get("path") or "/").rstrip("/"))
        refused = refusal(method, found=source is not None)
        if refused is not None:
            status, payload, headers = refused
        else:
            assert source is not None  # refusal() lets only a served path through
            status, payload = await asyncio.to_thread(_answer, source)
            headers = []
        body = json.dumps(payload, indent=2).encode()
        headers = [
            *headers,
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        await send(
            {
                "type": "http.response.start",
                "status": int(status.split()[0]),
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

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


def refuse(start_response: Callable[..., Any], method: str, *, found: bool) -> list[bytes] | None:
    """:func:`refusal` sent as the WSGI reply; None when the request may go on."""
    refused = refusal(method, found=found)
    if refused is None:
        return None
    status, payload, headers = refused
    return json_reply(start_response, status, payload, method, headers)


def json_reply(
    start_response: Callable[..., Any],
    status: str,
    payload: Any,
    method: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """Send ``payload`` as a JSON response (no body for HEAD)."""
    body = json.dumps(payload, indent=2).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or []),
        ],
    )
    return [] if method == "HEAD" else [body]


def _answer(source: StatsSource) -> tuple[str, Any]:
    """The status and JSON of one GET: the regions of ``source``, or 503 when it raises."""
    try:
        regions = source()
    except Exception as exc:
        return "503 Service Unavailable", {"error": f"{type(exc).__name__}: {exc}"}
    return "200 OK", {region: stats_json(s) for region, s in sorted(regions.items())}

"""A mountable WSGI app: ``GET /api/cache/stats/local`` and ``/api/cache/stats/distributed``.

The JSON is the design document's controller shape, per region, in snake_case::

    {"ProviderResponses": {"hit_rate": 75.0, "total_requests": 4,
                           "avg_response_time_ms": 1.5, "memory_size_mb": 1.0}}

``hit_rate`` is in percent (0-100), ``avg_response_time_ms`` the mean response time in
milliseconds, ``memory_size_mb`` the region's ``size_bytes`` in MiB. The app routes on the
full ``PATH_INFO``, so mount it at the root of a path-dispatching server (``serve`` passes
every ``/api/`` request to it unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .http import json_reply, refuse
from .model import Statistics

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
StatsSource = Callable[[], Mapping[str, Statistics]]

LOCAL_PATH = "/api/cache/stats/local"
DISTRIBUTED_PATH = "/api/cache/stats/distributed"


def stats_json(statistics: Statistics) -> dict[str, Any]:
    """One region in the controller shape (snake_case keys)."""
    return {
        "hit_rate": round(statistics.hit_rate, 4),
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
        path = (environ.get("PATH_INFO") or "/").rstrip("/")
        method = environ.get("REQUEST_METHOD", "GET")
        source = routes.get(path)
        refused = refuse(start_response, method, found=source is not None)
        if refused is not None or source is None:
            return refused or []
        try:
            regions = source()
        except Exception as exc:
            error = {"error": f"{type(exc).__name__}: {exc}"}
            return json_reply(start_response, "503 Service Unavailable", error, method)
        payload = {region: stats_json(s) for region, s in sorted(regions.items())}
        return json_reply(start_response, "200 OK", payload, method)

    return app

"""``GET /metrics``: the current rendering's bytes, as the scrape negotiates them.

Text or OpenMetrics by ``Accept``, gzip by ``Accept-Encoding`` (prometheus_client's
``choose_encoder`` and ``gzip_accepted``); a name filter (``?name[]=...``) is rendered on
demand by prometheus_client from the rendering's series. Every reply carries the age of
the Redis read it reflects (header ``X-Conduit-Data-Age``). :meth:`MetricsRoute.ready_reply`
answers on the event loop itself when the format asked for is rendered already.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .rendering import Rendering, Renderings
from .series import DATA_AGE_HEADER, data_age

Reply = tuple[int, list[tuple[str, str]], bytes, Callable[[], None]]


class MetricsRoute:
    """Answers ``/metrics`` (GET, HEAD, OPTIONS) from ``renderings``."""

    def __init__(self, renderings: Renderings) -> None:
        self.renderings = renderings

    def wsgi_app(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """The WSGI app of ``/metrics``."""
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
        renderings = self.renderings
        if renderings.prerender and not filtered:
            renderings.want((content_type, gzipped), encoder)
        rendering = renderings.rendering()
        if filtered:  # rare: prometheus_client renders it from this rendering's series
            return _filtered(rendering, environ, start_response, _age_header(rendering))
        body = rendering.body(content_type, encoder, gzipped)
        headers = _headers(rendering, content_type, gzipped, len(body))
        renderings.enter()  # until the server closes the reply: a refresh gives way meanwhile
        try:
            start_response("200 OK", headers)
        except BaseException:
            renderings.leave()
            raise
        return _Reply([] if method == "HEAD" else [body], renderings.leave)

    def ready_reply(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> Reply | None:
        """The reply to ``GET /metrics`` (or HEAD) when the current rendering already holds
        the format asked for: status, headers, body and what to call once it is sent. No
        rendering and no I/O, so an event loop may answer with it; None for any other
        request (the WSGI app answers those)."""
        renderings = self.renderings
        if path.rstrip("/") != "/metrics" or method not in ("GET", "HEAD"):
            return None
        if not renderings.prerender or "name[]" in parse_qs(query):
            return None
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        gzipped = gzip_accepted(headers.get("accept-encoding", ""))
        current = renderings.current
        if current is None or renderings.outdated(current):
            return None
        body = current.rendered(content_type, gzipped)
        if body is None:
            return None
        renderings.want((content_type, gzipped), encoder)
        renderings.enter()  # until the reply is sent: a refresh gives way meanwhile
        reply = b"" if method == "HEAD" else body
        return 200, _headers(current, content_type, gzipped, len(body)), reply, renderings.leave


def _age_header(rendering: Rendering) -> list[tuple[str, str]]:
    headers = [("Vary", "Accept, Accept-Encoding")]
    age = data_age(rendering.view, time.time())
    if age is not None:
        headers.append((DATA_AGE_HEADER, f"{age:.3f}"))
    return headers


def _headers(
    rendering: Rendering, content_type: str, gzipped: bool, length: int
) -> list[tuple[str, str]]:
    headers = _age_header(rendering)
    headers += [("Content-Type", content_type), ("Content-Length", str(length))]
    if gzipped:
        headers.append(("Content-Encoding", "gzip"))
    return headers


def _filtered(
    rendering: Rendering,
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

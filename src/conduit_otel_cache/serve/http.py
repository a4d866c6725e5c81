"""The ``serve`` WSGI app (landing page, ``/metrics``, ``/health``, probes) and its server.

The server is hypercorn (asyncio) with the WSGI app run by a2wsgi in a bounded thread pool:
a connection costs a coroutine, not a thread; one that has not sent its request headers
within ``header_timeout`` seconds is closed; a slow reader holds its (already rendered)
reply, never a thread. A ``direct`` function may answer a request on the event loop itself
(``/metrics`` from bytes rendered already), without a thread's hand-off.

HTTP/1.1 only: hypercorn's HTTP/2 (prior knowledge or ``Upgrade: h2c``) has none of those
deadlines, so it is never started. The connections open at once are bounded by the file
descriptors (:class:`Connections`): at the bound a new connection pushes out the oldest one
without a request in flight, so that descriptors never run out and a scraper is answered
while slow clients hold the rest; should ``accept()`` fail all the same (``EMFILE``), it is
logged at a bounded rate, the open connections are served and accepting resumes a second
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import resource
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from ..api import json_reply, refuse
from ..health import Health
from ..ratelimit import RateLimitedLog
from .landing import LANDING_HEADERS

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
#: ``(method, path, query string, headers) -> (status, headers, body, sent)`` or None when
#: the WSGI app must answer; ``sent()`` is called once the reply is sent. Never blocks.
Direct = Callable[
    [str, str, str, Mapping[str, str]],
    tuple[int, list[tuple[str, str]], bytes, Callable[[], None]] | None,
]

log = logging.getLogger(__name__)

#: Seconds a connection may take to send its request headers (and to stay idle between
#: keep-alive requests) before it is closed.
HEADER_TIMEOUT = 5.0
#: Threads that run the WSGI app; every other connection waits as a coroutine.
WORKER_THREADS = 8
#: Largest request line plus headers, in bytes (longer ones are refused with 400 or 431).
MAX_HEADER_BYTES = 16 * 1024
#: Connections waiting to be accepted.
BACKLOG = 1024
#: File descriptors kept from connections, for Redis, the render process and the log: the
#: connections open at once are at most ``RLIMIT_NOFILE`` minus these.
RESERVED_FDS = 64
#: Errors of ``accept()`` that say the process or system is out of descriptors or memory.
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Seconds between two lines about connections that could not be accepted.
ACCEPT_ERROR_LOG_EVERY = 10.0
#: With :meth:`HTTPServer.collect_when_idle`: seconds without a request in flight before the
#: cyclic garbage collector runs, and the least seconds between two such collections.
IDLE_GC_AFTER = 0.01
IDLE_GC_EVERY = 1.0

ROUTES = ("/", "/metrics", "/health", "/health/cache_statistics", "/-/healthy", "/-/ready")


def make_app(
    metrics_app: Callable[..., Any],
    health: Callable[[], Health],
    api: Callable[..., Any] | None = None,
    *,
    ready: Callable[[], bool] | None = None,
    landing: str | None = None,
) -> WSGIApp:
    """A WSGI app serving ``/metrics`` with the WSGI app ``metrics_app``, the ``health()``
    report at ``/health``, the probes ``/-/healthy`` (always 200) and ``/-/ready`` (200 when
    ``ready()``, else 503) and the HTML ``landing`` page at ``/``; every path under ``/api/``
    goes, unchanged, to the WSGI app ``api`` when given. HEAD is GET without the body."""

    def dispatch(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if header_bytes(environ) > MAX_HEADER_BYTES:  # the server takes more in one read
            return json_reply(
                start_response,
                "431 Request Header Fields Too Large",
                {"error": "request headers too large"},
                method,
            )
        if api is not None and path.startswith("/api/"):
            mounted: Iterable[bytes] = api(environ, start_response)
            return mounted
        route = path if path == "/" else path.rstrip("/")
        found = route in ROUTES and (route != "/" or landing is not None)
        refused = refuse(start_response, method, found=found)
        if refused is not None:
            return refused
        if route == "/metrics":
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        if route == "/":
            assert landing is not None
            return reply(
                start_response,
                "200 OK",
                landing.encode(),
                "text/html; charset=utf-8",
                LANDING_HEADERS,
            )
        if route == "/-/healthy":
            return reply(start_response, "200 OK", b"Healthy\n")
        if route == "/-/ready":
            if ready is None or ready():
                return reply(start_response, "200 OK", b"Ready\n")
            return reply(
                start_response, "503 Service Unavailable", b"Not ready: Redis was never reached\n"
            )
        report = health()
        payload = report.report_json() if route == "/health" else report.check_json()
        status = "200 OK" if report.http_status == 200 else "503 Service Unavailable"
        return json_reply(start_response, status, payload, method)

    return head_as_get(dispatch)


def header_bytes(environ: Environ) -> int:
    """The size of the request line and headers, about as sent."""
    size = len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", ""))
    for name, value in environ.items():
        if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            size += len(name) + len(value) + 4
    return size


def head_as_get(app: Callable[..., Iterable[bytes]]) -> WSGIApp:
    """``app`` with HEAD answered as GET without the body (same status and headers, with
    the GET's ``Content-Length``)."""

    def wrapped(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        sent: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            sent.append((status, headers))

        result = app({**environ, "REQUEST_METHOD": "GET"}, keep)
        try:
            length = sum(len(chunk) for chunk in result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = sent[-1]
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(length))]
        start_response(status, headers)
        return []

    return wrapped


def reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """Send ``body`` with its ``Content-Type`` and ``Content-Length``."""
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]


class HTTPServer:
    """hypercorn serving the WSGI ``app`` on a socket bound at construction (port 0 picks a
    free one; ``server_address`` is the bound address); HTTPS with ``ssl_context``.

    ``serve_forever()`` in a thread, ``shutdown()`` from another, then ``server_close()``.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        threads: int = WORKER_THREADS,
        direct: Direct | None = None,
    ) -> None:
        try:
            import hypercorn  # noqa: F401
            from a2wsgi import WSGIMiddleware
        except ImportError:  # pragma: no cover - the serve extra is not installed
            raise RuntimeError(
                "serve needs the 'serve' extra: pip install 'conduit-otel-cache[serve]'"
            ) from None

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self.wsgi = WSGIMiddleware(app, workers=threads)
        #: the connections open now (bounded by the file descriptors)
        self.connections = Connections(connection_limit())
        answering = self.wsgi if direct is None else _answering(direct, self.wsgi)
        self.asgi_app = self._counting(answering)
        #: full collections run by :meth:`collect_when_idle`
        self.idle_collections = 0
        self._idle_gc = False
        self._in_flight = 0
        self._collected_at = -IDLE_GC_EVERY
        self._pending: asyncio.TimerHandle | None = None
        self.config = _hypercorn_config(ssl_context, self.socket, self.connections)
        self.config.backlog = BACKLOG
        self.config.keep_alive_timeout = header_timeout  # also the time to send the headers
        self.config.ssl_handshake_timeout = header_timeout
        self.config.read_timeout = int(max(1.0, 6 * header_timeout))
        self.config.h11_max_incomplete_size = MAX_HEADER_BYTES
        self.config.graceful_timeout = 1.0
        self.config.include_server_header = False
        self.config.accesslog = None
        self.config.errorlog = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._done = threading.Event()

    def collect_when_idle(self) -> None:
        """From now on run the cyclic garbage collector (in full) once no request has been
        in flight for ``IDLE_GC_AFTER`` seconds (at most every ``IDLE_GC_EVERY``): the
        garbage of closed connections (hypercorn keeps each one's objects for
        ``keep_alive_timeout``, so they die in the oldest generation) is collected between
        scrapes, a little at a time, not in one full collection that pauses a scrape for
        tens of ms. For a process of its own (``serve``); the automatic collections stay."""
        self._idle_gc = True

    @property
    def in_flight(self) -> int:
        """HTTP requests being answered now."""
        return self._in_flight

    def _counting(self, app: Any) -> Callable[..., Any]:
        """``app``, counting the HTTP requests in flight."""

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":  # lifespan: for as long as the server runs
                return await app(scope, receive, send)  # type: ignore[no-any-return]
            self._in_flight += 1
            peer = _peer(scope.get("client"))
            self.connections.begin(peer)
            try:
                await app(scope, receive, send)
            finally:
                self._in_flight -= 1
                self.connections.end(peer)
                if not self._in_flight and self._idle_gc:
                    self._collect_soon()

        return asgi

    def _collect_soon(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(IDLE_GC_AFTER, self._collect_if_idle)

    def _collect_if_idle(self) -> None:
        self._pending = None
        now = asyncio.get_running_loop().time()
        # a request in flight tries again when it ends; so does the next one after a recent
        # collection (never at a set time, which may be when the next scrapes arrive)
        if self._in_flight or now - self._collected_at < IDLE_GC_EVERY:
            return
        gc.collect()
        self._collected_at = asyncio.get_running_loop().time()
        self.idle_collections += 1

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        try:
            asyncio.run(self._serve())
        finally:
            self._done.set()

    async def _serve(self) -> None:
        from hypercorn.asyncio import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop.set_exception_handler(_loop_errors(self.connections))
        self._started.set()
        await serve(self.asgi_app, self.config, shutdown_trigger=self._stop.wait, mode="asgi")

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` (closing open connections) and wait for it."""
        if not self._started.wait(10) or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        if not self._done.wait(self.config.graceful_timeout + 1.0):
            # what is left waits on clients (a TLS close waits for theirs): cut it
            self._loop.call_soon_threadsafe(self.connections.shut_down_all)
            self._done.wait(10)

    def server_close(self) -> None:
        """Close the listening socket and end the app's threads."""
        self.socket.close()
        self.wsgi.executor.shutdown(wait=False)


def _answering(direct: Direct, app: Any) -> Callable[..., Any]:
    """An ASGI app: what ``direct`` answers, on the event loop; the rest through ``app``."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers: dict[str, str] = {}
            size = 0
            for name, value in scope["headers"]:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]},{text}" if key in headers else text
                size += len(name) + len(value) + 4
            if size <= MAX_HEADER_BYTES:
                query = scope.get("query_string", b"").decode("latin-1")
                reply = direct(scope["method"], scope["path"], query, headers)
                if reply is not None:
                    status, fields, body, sent = reply
                    try:
                        await send(
                            {
                                "type": "http.response.start",
                                "status": status,
                                "headers": [
                                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in fields
                                ],
                            }
                        )
                        await send({"type": "http.response.body", "body": body})
                    finally:
                        sent()
                    return
        await app(scope, receive, send)

    return asgi


def _hypercorn_config(
    context: ssl.SSLContext | None, sock: socket.socket, connections: Connections
) -> Any:
    """hypercorn's Config: ``context`` (client certificates and versions as the web
    configuration asks) as its TLS context instead of one of its own making, and a copy of
    the listening ``sock`` that admits connections through ``connections``."""
    from hypercorn.config import Config, Sockets

    class ServeConfig(Config):
        @property
        def ssl_enabled(self) -> bool:
            return context is not None

        def create_ssl_context(self) -> ssl.SSLContext | None:
            return context

        def create_sockets(self) -> Sockets:
            copy = socket.dup(sock.fileno())  # hypercorn closes it
            listener = _Listener(connections, sock.family, sock.type, sock.proto, fileno=copy)
            listener.setblocking(False)
            tls = context is not None
            return Sockets([listener] if tls else [], [] if tls else [listener], [])

    return ServeConfig()


def _http11_only() -> None:
    """Keep hypercorn on HTTP/1.1: it switches a connection to HTTP/2 on the prior-knowledge
    preface (``PRI * HTTP/2.0``, over TLS too, whatever ALPN chose) or an ``Upgrade: h2c``
    request, and its HTTP/2 has none of the HTTP/1.1 deadlines (headers completed by a
    CONTINUATION frame every 2 s stay open, an idle connection 30 s). With this, the preface
    is an HTTP/1.1 request for ``*`` (``404``) followed by bytes that are not one (``400``,
    closed), and ``Upgrade: h2c`` is ignored."""
    from hypercorn.protocol.h11 import H11Protocol

    async def check_protocol(self: Any, event: Any) -> None:
        return None

    H11Protocol._check_protocol = check_protocol  # type: ignore[method-assign]


def _reason_phrases() -> None:
    """Send the standard reason phrase (``HTTP/1.1 200 OK``): hypercorn leaves it empty
    (``HTTP/1.1 200 ``), which is valid but reads as broken in ``curl -i`` and proxies' logs."""
    import h11
    from hypercorn.protocol.h11 import H11Protocol

    send = H11Protocol._send_h11_event

    async def send_with_reason(self: Any, event: Any) -> None:
        if isinstance(event, h11.Response | h11.InformationalResponse) and not event.reason:
            try:
                phrase = HTTPStatus(event.status_code).phrase.encode()
            except ValueError:  # a code without a standard phrase keeps none
                phrase = b""
            event = type(event)(status_code=event.status_code, headers=event.headers, reason=phrase)
        await send(self, event)

    H11Protocol._send_h11_event = send_with_reason  # type: ignore[method-assign]


def connection_limit() -> int:
    """How many connections may be open at once: the soft ``RLIMIT_NOFILE`` of the process
    but :data:`RESERVED_FDS` (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - RESERVED_FDS)


def _peer(client: Any) -> tuple[str, int] | None:
    return (str(client[0]), int(client[1])) if client else None


class Connections:
    """The connections accepted and still open, oldest first, with their requests in flight.

    At :attr:`limit` the oldest connection without a request in flight (one still sending
    its headers, or idle between keep-alive requests, as a slow or hostile client is; never
    one being answered) is shut down, and the next is accepted once it is closed; when every
    one is being answered, a new connection is closed at once. Used on the event loop's
    thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[tuple[str, int], socket.socket] = {}  # insertion order: oldest first
        self._closing: dict[tuple[str, int], socket.socket] = {}  # shut down, not closed yet
        self._busy: Counter[tuple[str, int] | None] = Counter()
        #: connections shut down to make room, and new ones closed at once, since start
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open) + len(self._closing)

    def full(self) -> bool:
        return len(self) >= self.limit

    def add(self, peer: tuple[str, int], conn: socket.socket) -> None:
        self._open[peer] = conn

    def evict(self) -> bool:
        """Shut down the oldest connection without a request in flight; False if none."""
        for peer, conn in self._open.items():
            if not self._busy[peer]:
                self._closing[peer] = self._open.pop(peer)
                with contextlib.suppress(OSError):  # hypercorn reads the end and closes it
                    conn.shutdown(socket.SHUT_RDWR)
                self.evicted += 1
                return True
        return False

    def shut_down_all(self) -> None:
        """Shut every open connection down (when ``serve`` stops)."""
        for conn in [*self._open.values(), *self._closing.values()]:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def closed(self, peer: tuple[str, int], conn: socket.socket) -> None:
        for table in (self._open, self._closing):
            if table.get(peer) is conn:
                del table[peer]
        self._busy.pop(peer, None)

    def begin(self, peer: tuple[str, int] | None) -> None:
        self._busy[peer] += 1

    def end(self, peer: tuple[str, int] | None) -> None:
        self._busy[peer] -= 1
        if self._busy[peer] <= 0:
            del self._busy[peer]


class _Connection(socket.socket):
    """An accepted connection that tells :class:`Connections` when it is closed."""

    _untracked: Callable[[], None] | None = None

    def close(self) -> None:
        if self._untracked is not None:
            self._untracked()
            self._untracked = None
        super().close()


class _Listener(socket.socket):
    """The listening socket hypercorn serves, admitting connections by :class:`Connections`.

    Out of descriptors, ``accept()`` fails once (asyncio stops accepting for a second) and
    then says "nothing to accept" until then: asyncio's loop over the backlog would log each
    of up to 1024 failures, every second."""

    def __init__(self, connections: Connections, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections = connections
        self._failed_at = -1.0

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            refuse = self._connections.full()
            if refuse and self._connections.evict():  # accept again once that one is closed
                raise BlockingIOError(errno.EAGAIN, "at the connection limit")
            try:
                fd, address = self._accept()  # type: ignore[attr-defined]
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRORS:
                    raise
                now = time.monotonic()
                if now - self._failed_at < 0.5:
                    raise BlockingIOError(errno.EAGAIN, "paused: out of descriptors") from None
                self._failed_at = now
                raise
            conn = _Connection(self.family, self.type, self.proto, fileno=fd)
            if refuse:  # every open connection is being answered
                self._connections.refused += 1
                conn.close()
                continue
            peer = (str(address[0]), int(address[1]))
            self._connections.add(peer, conn)
            conn._untracked = functools.partial(self._connections.closed, peer, conn)
            return conn, address


def _loop_errors(connections: Connections) -> Callable[..., None]:
    """An event-loop exception handler: a failed ``accept()`` is one line at a bounded rate
    (no traceback); a TLS error while a connection closes (hypercorn lets
    ``APPLICATION_DATA_AFTER_CLOSE_NOTIFY`` out when a client sends on after the server
    closed: one traceback per connection a client chooses) and a connection cancelled as
    ``serve`` stops are debug lines; everything else goes to asyncio's default handler."""
    limited = RateLimitedLog(log, ACCEPT_ERROR_LOG_EVERY)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS:
            limited.error(
                "cannot accept connections: %s; the %d open ones are served, "
                "accepting again in 1 s",
                exc,
                len(connections),
            )
            return
        if exc is not None and _tls_errors_only(exc):  # one client's TLS connection
            log.debug("TLS connection closed: %s", exc)  # (3.11: client_connected_cb; 3.10:
            return  # a task exception never retrieved, in an exception group)
        if isinstance(exc, asyncio.CancelledError):  # a connection cut when serve stops
            log.debug("connection cancelled: %s", context.get("message"))
            return
        loop.default_exception_handler(context)

    return handler


def _tls_errors_only(exc: BaseException) -> bool:
    """``exc`` is a TLS error, or a group of nothing else (hypercorn's task groups)."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner:
        return all(isinstance(e, BaseException) and _tls_errors_only(e) for e in inner)
    return isinstance(exc, ssl.SSLError)


_http11_only()
_reason_phrases()


def make_http_server(
    app: Callable[..., Any],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    direct: Direct | None = None,
) -> HTTPServer:
    """An :class:`HTTPServer` for ``app`` (and ``direct``); HTTPS with ``ssl_context``."""
    return HTTPServer(app, host, port, ssl_context, direct=direct)

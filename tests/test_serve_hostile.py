"""Hostile raw requests against `serve` (hypothesis): never a 500 for the client's fault,
never a crash, no stack trace per request in the log, and a well-behaved scraper keeps
getting correct /metrics throughout."""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import urllib.request
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache.serve.http import MAX_HEADER_BYTES
from tests.conftest import MakeStats
from tests.serve_process import ServeProcess

HITS = 7
ROUTES = ["/", "/metrics", "/health", "/health/cache_statistics", "/-/healthy", "/-/ready",
          "/api/cache/stats/distributed"]  # fmt: skip
TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.!~",
                min_size=1, max_size=12)  # fmt: skip
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH",
                     "CONNECT", "get", "G ET", ""]),
    TOKEN,
    st.binary(min_size=1, max_size=8).map(lambda b: b.decode("latin-1")),
)  # fmt: skip
PATHS = st.one_of(
    st.sampled_from(["/", "/metrics", "/metrics/", "/health", "/health/cache_statistics",
                     "/-/healthy", "/-/ready", "/api/cache/stats/distributed",
                     "/api/cache/stats/local", "/api/", "*", "http://x/metrics", "//metrics",
                     "/%2e%2e/%2e%2e/etc/passwd", "/metrics%00", "/\u00e9t\u00e9"]),
    st.text(max_size=30).map(lambda t: "/" + t),
    st.binary(max_size=30).map(lambda b: "/" + b.decode("latin-1")),
)  # fmt: skip
QUERIES = st.one_of(
    st.just(""),
    st.sampled_from(["?name[]=conduit_cache_hits_total", "?name[]=", "?%zz", "?a=b&&&=", "?"]),
    st.text(max_size=30).map(lambda t: "?" + t),
)
VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/0.9",
                            "HTTP/1.1x", "http/1.1", ""])  # fmt: skip
HEADERS = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(["Accept", "Accept-Encoding", "Authorization", "Connection",
                                   "Host", "Cookie", "X-Forwarded-For", "Expect"]), TOKEN,
                  st.binary(min_size=1, max_size=6).map(lambda b: b.decode("latin-1"))),
        st.one_of(st.sampled_from(["gzip", "application/openmetrics-text; version=1.0.0",
                                   "text/plain;version=0.0.4;escaping=nonsense", "close",
                                   "keep-alive", "*/*;q=x", "Basic !!!", "100-continue"]),
                  st.text(max_size=20), st.binary(max_size=20).map(lambda b: b.decode("latin-1"))),
    ),
    max_size=6,
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """One raw request (method, bytes): sometimes with a header up to and past the limit,
    sometimes with a body and its Content-Length."""
    if draw(st.booleans()):  # a well-formed request, for pipelining and keep-alive
        method, path, query, version = draw(st.sampled_from(["GET", "HEAD"])), draw(
            st.sampled_from(ROUTES)), "", "HTTP/1.1"  # fmt: skip
    else:
        method, path, query = draw(METHODS), draw(PATHS), draw(QUERIES)
        version = draw(VERSIONS)
    lines = [f"{method} {path}{query} {version}".rstrip()]
    if version != "HTTP/1.0" or draw(st.booleans()):
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in draw(HEADERS)]
    big = draw(st.sampled_from([0, 0, 0, 100, MAX_HEADER_BYTES - 200, MAX_HEADER_BYTES + 100,
                                3 * MAX_HEADER_BYTES]))  # fmt: skip
    if big:
        lines.append("X-Big: " + "a" * big)
    body = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=100)))
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return method, "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + body


class _Shared:
    """A buffered reader that successive ``HTTPResponse`` objects share (not closed by
    them), so that pipelined replies are read one after the other."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)

    def close(self) -> None:
        pass


class _Source:
    def __init__(self, fp: Any) -> None:
        self.fp = fp

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        return self.fp


def exchange(port: int, batch: list[tuple[str, bytes]], cut: int | None) -> list[int]:
    """Send ``batch`` pipelined on one connection (or only its first ``cut`` bytes, then an
    abrupt close); the statuses of the replies read."""
    data = b"".join(raw for _, raw in batch)
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        if cut is not None:
            with contextlib.suppress(OSError):
                sock.sendall(data[:cut])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return []  # closed with a reset, nothing read
        with contextlib.suppress(OSError):
            sock.sendall(data)
        source = _Source(_Shared(sock.makefile("rb")))
        statuses = []
        for method, _ in batch:
            response = http.client.HTTPResponse(source, method=method)  # type: ignore[arg-type]
            try:
                response.begin()
                response.read()
            except (http.client.HTTPException, OSError):
                break
            statuses.append(response.status)
            if response.will_close:
                break
        return statuses


def metrics_are_correct(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    hits = {
        sample.labels.get("region"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "conduit_cache_hits_total"
    }
    return hits == {"Sessions": HITS}


def test_pipelined_and_http10_requests(redis_url: str) -> None:
    with ServeProcess(redis_url) as serve:
        close = b"Connection: close\r\n"
        batch = [("GET", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                 ("HEAD", b"HEAD /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"),
                 ("GET", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"),
                 ("GET", b"GET /-/ready HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")]  # fmt: skip
        assert exchange(serve.port, batch, None) == [200, 200, 404, 200]
        # HTTP/1.0: one reply, then the server closes; more after it is the client's error
        http10 = ("GET", b"GET /-/healthy HTTP/1.0\r\n\r\n")
        assert exchange(serve.port, [http10], None) == [200]
        assert exchange(serve.port, [http10, http10], None) in ([200], [400])
        for size in (2 * MAX_HEADER_BYTES, 2**20):  # one read of the server, and many
            too_big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * size + b"\r\n\r\n"
            assert exchange(serve.port, [("GET", too_big)], None) in ([400], [431]), size


def test_hostile_requests_never_break_serve(make_stats: MakeStats, redis_url: str) -> None:
    stats = make_stats("api-1")
    for _ in range(HITS):
        stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    with ServeProcess(redis_url) as serve:
        assert metrics_are_correct(serve.port)
        scrapes: list[bool] = []
        stop = threading.Event()

        def scraper() -> None:  # a well-behaved Prometheus, all along
            while not stop.wait(0.1):
                try:
                    scrapes.append(metrics_are_correct(serve.port))
                except OSError:
                    scrapes.append(False)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        seen: set[int] = set()
        answered = []

        slow = [HealthCheck.too_slow, HealthCheck.data_too_large]

        @settings(
            max_examples=800,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=slow,
        )
        @given(batch=st.lists(requests(), min_size=1, max_size=3), data=st.data())
        def attack(batch: list[tuple[str, bytes]], data: st.DataObject) -> None:
            total = sum(len(raw) for _, raw in batch)
            cut = data.draw(st.one_of(st.none(), st.integers(0, total)), label="cut")
            statuses = exchange(serve.port, batch, cut)
            seen.update(statuses)
            answered.append(len(statuses))
            assert not [s for s in statuses if s >= 500], (batch, statuses)
            assert serve.proc.poll() is None, serve.log()

        try:
            attack()
        finally:
            stop.set()
            thread.join(10)
        assert metrics_are_correct(serve.port)
        assert scrapes and all(scrapes), f"{scrapes.count(False)} of {len(scrapes)} scrapes failed"
        assert {200, 400, 404, 405} <= seen, seen  # the attack reached every kind of answer
        assert max(answered) >= 2  # pipelined requests were answered in turn
        log = serve.log()
    assert "Traceback" not in log, log[-3000:]
    assert len(log.splitlines()) <= 5, log[-3000:]  # nothing logged per request

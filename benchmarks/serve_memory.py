"""Memory of a real `conduit-otel-cache serve` with its render process, as a container's
memory cgroup counts it: the sum of the two processes' PSS (pages shared after the fork are
counted once), and each one's RSS, sampled every 0.1 s.

``python -m benchmarks.serve_memory [--quick]``

For each N instances x R regions written to a fresh redis-server: idle after start-up and a
few scrapes, then while 4 clients scrape /metrics back to back, then while 200 slow clients
hold connections (each reading a /metrics reply 1 KB at a time, 10 times a second) beside the
4 scrapers. Prints the peak of each phase; deploy/kubernetes sizes the exporter's memory
request and limit from the largest.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.scale import populate
from conduit_otel_cache.config import Settings
from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.store import Store


def _kb(pid: int, field: str, name: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def sample(pid: int) -> dict[str, int]:
    """PSS sum and RSS of the serving process and of its render process, in KB."""
    procs = [pid, *_children(pid)]
    out = {"pss_sum": 0, "rss_main": _kb(pid, "VmRSS", "status"), "rss_child": 0}
    for p in procs:
        try:
            out["pss_sum"] += _kb(p, "Pss", "smaps_rollup")
            if p != pid:
                out["rss_child"] = _kb(p, "VmRSS", "status")
        except FileNotFoundError:
            pass
    return out


class Sampler:
    """Keeps the peak of each field while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, dict.fromkeys(sample(pid), 0), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for k, v in sample(self.pid).items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def scrapers(port: int, stop: threading.Event, n: int = 4) -> list[threading.Thread]:
    def run() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                r.read()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def slow_clients(port: int, stop: threading.Event, n: int = 200) -> list[threading.Thread]:
    def run() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.settimeout(None)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            while not stop.wait(0.1) and sock.recv(1024):
                pass

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def measure(n: int, r: int, seconds: float) -> dict[str, Any]:
    with RedisServer() as server:
        settings = Settings.load(redis_url=server.url)
        populate(Store.from_settings(settings.connection), n, r)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url", server.url,
             "--port", str(port)],
            stdout=subprocess.PIPE, text=True, env={**os.environ},
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
            result: dict[str, Any] = {"N x R": f"{n} x {r}"}
            url = f"http://127.0.0.1:{port}/metrics"
            for _ in range(3):
                with urllib.request.urlopen(url, timeout=300) as resp:
                    resp.read()
            time.sleep(2)
            result["idle"] = sample(proc.pid)
            for phase, load in (("4 scrapers", False), ("4 scrapers + 200 slow", True)):
                stop = threading.Event()
                sampler = Sampler(proc.pid)
                threads = scrapers(port, stop) + (slow_clients(port, stop) if load else [])
                time.sleep(seconds)
                stop.set()
                result[phase] = sampler.stop()
                for t in threads:
                    t.join(5)
            return result
        finally:
            proc.terminate()
            proc.wait(15)


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [(100, 10)] if quick else [(100, 10), (1000, 100)]
    for n, r in sizes:
        print(json.dumps(measure(n, r, 5.0 if quick else 20.0)), flush=True)


if __name__ == "__main__":
    main()

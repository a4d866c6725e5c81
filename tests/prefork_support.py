"""What the pre-fork server tests share: a pod's environment, server processes stopped by
the test even on failure, concurrent requests, and the cluster read by a fresh handle."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis

from conduit_otel_cache import CacheStatistics, setup

REPO = Path(__file__).resolve().parent.parent
POD = "pod-a"
FLUSH_INTERVAL = 0.5
INSTANCE_TIMEOUT = 3.0
REGION = "Pages"
#: what one request or task records in ``REGION``
HITS, MISSES = 3, 1
#: bound of every wait for flushes, reaps and server starts (polled, not slept)
DEADLINE = 30.0

T = TypeVar("T")


def pod_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a server in pod ``pod-a``: default instance ids, a short flush
    interval and instance timeout, and ``tests`` importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CONDUIT_CACHE_STATS_")
        and k not in ("INSTANCE_ID", "OTEL_METRICS_EXPORTER")
    }
    env.update(
        HOSTNAME=POD,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
        CONDUIT_CACHE_STATS_REDIS_URL=redis_url,
        CONDUIT_CACHE_STATS_FLUSH_INTERVAL=str(FLUSH_INTERVAL),
        CONDUIT_CACHE_STATS_INSTANCE_TIMEOUT=str(INSTANCE_TIMEOUT),
        **extra,
    )
    return env


def instance_id(pid: int) -> str:
    """The default instance id of process ``pid`` in the pod."""
    return f"{POD}-{pid}"


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


class Server:
    """A server started in its own session; :meth:`close` kills whatever is left of it
    (the master and its workers), so that a failing test stops it too."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log: Path, stdin: int | None = None
    ) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            list(argv), cwd=REPO, env=env, stdin=stdin, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._tree: set[int] = {self.proc.pid}

    def workers(self) -> set[int]:
        """The pids of the master's live child processes (its workers)."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        pids = {c.pid for c in children if _running(c)}
        self._tree |= pids
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        """Graceful stop: ``sig`` to the master, then wait until every process is gone."""
        self.workers()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        eventually(lambda: {p for p in self._tree if psutil.pid_exists(p) and _alive(p)}, set())
        return code

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.workers()
        for pid in sorted(self._tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _alive(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def get(url: str, timeout: float = 10.0) -> str:
    req = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def wait_ready(url: str, server: Server, timeout: float = DEADLINE) -> None:
    """Poll ``url`` until the server answers (fails at once if the server died)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.output()}")
        try:
            get(url.rstrip("/") + "/ready", timeout=2)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {timeout}s:\n{server.output()}") from exc
            time.sleep(0.05)


def drive(url: str, count: int, concurrency: int = 6) -> list[int]:
    """``count`` requests, ``concurrency`` at a time; the pid that served each one."""
    with ThreadPoolExecutor(concurrency) as pool:
        return [int(body) for body in pool.map(lambda _: get(url), range(count))]


def drive_until_all_served(
    url: str, server: Server, workers: int, batch: int = 30, limit: int = 900
) -> list[int]:
    """Requests in batches until every one of ``workers`` live workers has served one."""
    served: list[int] = []
    while len(served) < limit:
        served += drive(url, batch)
        live = server.workers()
        if len(live) == workers and live <= set(served):
            return served
    raise AssertionError(f"{workers} workers did not all serve in {limit} requests")


@dataclasses.dataclass(frozen=True)
class State:
    """What the cluster reports of region ``Pages``."""

    hits: int
    misses: int
    instance_count: int
    active_count: int
    live: frozenset[str]


class ClusterReader:
    """The cluster read with a fresh handle (which records nothing and never registers)."""

    def __init__(
        self, redis_url: str, instance_timeout: float = INSTANCE_TIMEOUT, name: str = "test-reader"
    ) -> None:
        self.redis_url = redis_url
        self.stats: CacheStatistics = setup(  # type: ignore[assignment]
            redis_url=redis_url, instance_id=name, set_global=False,
            flush_interval=None, aggregation_cache_ttl=0, instance_timeout=instance_timeout,
        )  # fmt: skip
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)

    def state(self) -> State:
        region = self.stats.cluster_statistics(REGION)
        view = self.stats.cluster_view()  # reads (and reaps expired instances)
        assert self.stats.aggregator is not None
        live, _ = self.stats.aggregator.instances()
        return State(
            region.hit_count, region.miss_count, region.instance_count, view.active_count,
            frozenset(live),
        )  # fmt: skip

    def expect(self, hits: int, misses: int, live: Callable[[], Iterable[str]]) -> State:
        """Wait (bounded) until the totals are exactly ``hits``/``misses`` and both live
        gauges and the live instances are exactly ``live()`` (recomputed at every poll)."""

        def now() -> tuple[State, State]:
            ids = frozenset(live())
            want = State(hits, misses, len(ids), len(ids), ids)
            return self.state(), want

        return eventually_match(now)

    def instance_keys(self) -> set[str]:
        """Instance ids that still have keys of their own in Redis."""
        ids = set()
        for key in self.client.scan_iter("conduit:*"):
            for marker in (":stats:", ":instance:"):
                if marker in key:
                    rest = key.split(marker, 1)[1]
                    ids.add(rest.split(":", 1)[0])
        ids.discard("aggregated")
        return ids

    def key_count(self) -> int:
        return sum(1 for _ in self.client.scan_iter("conduit:*"))

    def close(self) -> None:
        self.stats.shutdown()
        self.client.close()


def eventually(probe: Callable[[], T], expected: T, timeout: float = DEADLINE) -> T:
    """Poll ``probe()`` until it returns ``expected``; fail with the last value after
    ``timeout``."""
    return eventually_match(lambda: (probe(), expected), timeout)


def eventually_match(probe: Callable[[], tuple[T, Any]], timeout: float = DEADLINE) -> T:
    """Poll ``probe()`` (``(actual, expected)``) until both are equal, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        actual, expected = probe()
        if actual == expected:
            return actual
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s: {actual!r} != expected {expected!r}")
        time.sleep(0.1)


def steady(probe: Callable[[], T], expected: T, duration: float) -> None:
    """``probe()`` returns ``expected`` at every poll for ``duration`` seconds."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        actual = probe()
        assert actual == expected, f"{actual!r} != {expected!r}"
        time.sleep(0.2)


def assert_clean_exit(server: Server) -> None:
    """Every worker's final flush and departure finished within ``shutdown_timeout``,
    and nothing raised."""
    out = server.output()
    assert "shutdown_timeout" not in out, out
    assert "Traceback" not in out, out
    assert "NO MERCY" not in out, out  # uWSGI: a worker that did not exit in time


def served_and_alive(server: Server, served: list[int]) -> set[str]:
    """Instance ids of the live workers that served one of ``served``."""
    return {instance_id(pid) for pid in server.workers() & set(served)}


def serve_every_worker(
    url: str, server: Server, reader: ClusterReader, workers: int
) -> tuple[int, State]:
    """Requests until each of ``workers`` has served one; the cluster then counts every
    request, and exactly the workers are live (never the master). Returns the number of
    requests served and that state."""
    wait_ready(url, server)
    served = drive_until_all_served(url, server, workers)
    n = len(served)
    during = reader.expect(HITS * n, MISSES * n, lambda: served_and_alive(server, served))
    assert during.active_count == workers  # every worker, never the master
    assert instance_id(server.proc.pid) not in during.live
    assert reader.instance_keys() == during.live
    return n, during

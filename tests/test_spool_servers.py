"""Real servers with ``spool_dir``: a gunicorn worker and a Celery prefork child SIGKILLed
mid-traffic lose nothing. The victim records its events, then kills itself (so what it
recorded is known); a long ``flush_interval`` leaves them unflushed, and a long
``instance_timeout`` shows that the victim leaves the live gauges by recovery, not by
reaping. Its replacement recovers the spool at its start."""

from __future__ import annotations

import os
import re
import sys
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conduit_otel_cache.embedded import free_port

from .prefork_support import (
    HITS,
    MISSES,
    POD,
    ClusterReader,
    Server,
    assert_clean_exit,
    drive,
    drive_until_all_served,
    eventually,
    get,
    instance_id,
    pod_env,
    wait_ready,
)
from .test_prefork_celery import celery_client, run_tasks, urls

WORKERS = 3
#: longer than the test waits for the recovery: what the victim recorded was not flushed
FLUSH_INTERVAL = "5"
#: far longer: the victim leaves the live gauges by recovery, not by reaping
INSTANCE_TIMEOUT = 600.0

pytestmark = pytest.mark.slow


def spool_env(redis_url: str, spool: Path, **extra: str) -> dict[str, str]:
    env = pod_env(redis_url, CONDUIT_CACHE_STATS_SPOOL_DIR=str(spool), **extra)
    env["CONDUIT_CACHE_STATS_FLUSH_INTERVAL"] = FLUSH_INTERVAL
    env["CONDUIT_CACHE_STATS_INSTANCE_TIMEOUT"] = str(INSTANCE_TIMEOUT)
    return env


@pytest.fixture
def reader(redis_url: str) -> Iterator[ClusterReader]:
    r = ClusterReader(redis_url, instance_timeout=INSTANCE_TIMEOUT)
    yield r
    r.close()


def recovered(directory: Path, before: set[str], reader: ClusterReader, victim: int) -> None:
    """Within one ``flush_interval``, one of the spools ``before`` the kill (the victim's:
    the others' owners live) was recovered and removed, and the victim deregistered."""
    eventually(lambda: len(before & spools(directory)), len(before) - 1,
               timeout=float(FLUSH_INTERVAL))  # fmt: skip
    assert instance_id(victim) not in reader.instance_keys()


def spools(directory: Path) -> set[str]:
    return {n for n in os.listdir(directory) if n.endswith(".spool")}


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_gunicorn_worker_sigkilled_mid_traffic_loses_nothing(
    redis_url: str, reader: ClusterReader, tmp_path: Path, preload: bool
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(WORKERS),
            "-k", "sync", *(["--preload"] if preload else []),
            "tests.prefork_app:application"]  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    with Server(argv, spool_env(redis_url, spool), tmp_path / "gunicorn.log") as server:
        wait_ready(url, server)
        served = drive_until_all_served(url, server, WORKERS)
        before, spooled = server.workers(), spools(spool)
        processes = WORKERS + preload  # with --preload the master is an incarnation too
        assert len(spooled) == processes
        traffic: list[int] = []
        stop = threading.Event()

        def keep_driving() -> None:
            while not stop.is_set():
                traffic.extend(drive(url, 12, concurrency=2))

        driver = threading.Thread(target=keep_driving)
        driver.start()
        try:
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                get(url + "die")  # recorded, then SIGKILLed: no response
            eventually(lambda: len(before - server.workers()), 1)
            victim = next(iter(before - server.workers()))
            eventually(lambda: len(server.workers()), WORKERS)  # the replacement started
            # within one flush_interval of the replacement starting, its recovery (not a
            # flush, not a reap) wrote the victim's events and deregistered it
            recovered(spool, spooled, reader, victim)
        finally:
            stop.set()
            driver.join()
        n = len(served) + len(traffic) + 1  # + the victim's last request
        eventually(lambda: len(spools(spool)), processes)
        assert server.stop() == 0
        assert_clean_exit(server)
        after = reader.expect(HITS * n, MISSES * n, set)
        assert after.live == frozenset()
        assert spools(spool) == set()  # clean exits removed theirs
        assert reader.instance_keys() == set()


def test_celery_prefork_child_sigkilled_mid_task_loses_nothing(
    redis_url: str, reader: ClusterReader, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    broker, backend = urls(redis_url)
    argv = [sys.executable, "-m", "celery", "-A", "tests.prefork_tasks", "worker",
            "--pool", "prefork", "-c", "3", "--loglevel", "WARNING", "--without-gossip",
            "--without-mingle", "--without-heartbeat", "-n", f"w1@{POD}"]  # fmt: skip
    env = spool_env(redis_url, spool, PREFORK_BROKER_URL=broker, PREFORK_BACKEND_URL=backend)
    pending: list[Any] = []
    with celery_client("spool-test-client", redis_url) as client:
        try:
            with Server(argv, env, tmp_path / "celery.log") as server:
                served = run_tasks(client, server, 30)
                eventually(lambda: len(server.workers()), 3)
                before, spooled = server.workers(), spools(spool)
                assert len(spooled) == 4  # the master's and its children's
                pending += [client.send_task("prefork.record") for _ in range(30)]
                client.send_task("prefork.die")  # mid-traffic: the others keep running
                served += [int(r.get(timeout=60)) for r in pending]
                eventually(lambda: len(before - server.workers()), 1)
                victim = next(iter(before - server.workers()))
                eventually(lambda: len(server.workers()), 3)  # the replacement started
                recovered(spool, spooled, reader, victim)
                served += run_tasks(client, server, 30)
                n = len(served) + 1  # + the task whose process was killed
                eventually(lambda: len(spools(spool)), 4)
                assert server.stop() == 0
                out = server.output()
                assert "shutdown_timeout" not in out, out
                # the one traceback is Celery's report of the killed task
                lost = r"Task handler raised error: WorkerLostError.*?exceptions.WorkerLostError"
                assert re.sub(lost, "", out, flags=re.S).count("Traceback") == 0, out
                after = reader.expect(HITS * n, MISSES * n, set)
                assert after.live == frozenset()
                assert spools(spool) == set()
                assert reader.instance_keys() == set()
        finally:
            pending.clear()  # the results go before the client does (celery_client)

"""Real gunicorn in a pod (``HOSTNAME=pod-a``), ``setup()`` at import of the app, default
instance ids: cluster totals equal the events recorded, exactly, while it serves and after
it stopped; the live gauges follow the live workers (never the master)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from conduit_otel_cache.embedded import free_port

from .prefork_app import HITS, MISSES
from .prefork_support import (
    ClusterReader,
    Server,
    assert_clean_exit,
    drive,
    drive_until_all_served,
    eventually,
    instance_id,
    pod_env,
    serve_every_worker,
    served_and_alive,
    wait_ready,
)

WORKERS = 3

pytestmark = pytest.mark.slow


def gunicorn(redis_url: str, log: Path, *options: str) -> tuple[Server, str]:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(WORKERS),
            "--graceful-timeout", "15", *options, "tests.prefork_app:application"]  # fmt: skip
    return Server(argv, pod_env(redis_url), log), f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize(
    "options",
    [
        ("-k", "sync"),
        ("-k", "sync", "--preload"),
        ("-k", "gthread", "--threads", "2"),
        ("-k", "gthread", "--threads", "2", "--preload"),
    ],
    ids=["sync", "sync-preload", "gthread", "gthread-preload"],
)
def test_gunicorn_totals_and_live_workers(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path, options: tuple[str, ...]
) -> None:
    server, url = gunicorn(redis_url, tmp_path / "gunicorn.log", *options)
    with server:
        n, _ = serve_every_worker(url, server, cluster_reader, WORKERS)
        assert server.stop() == 0
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()  # departed workers leave no keys


def test_gunicorn_max_requests_recycles_workers(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path
) -> None:
    """Workers exit after 10 requests and are replaced: every departed worker's counts stay,
    the gauges follow the live ones, and no departed worker leaves keys behind."""
    server, url = gunicorn(
        redis_url, tmp_path / "gunicorn.log", "--preload", "--max-requests", "10",
        "--max-requests-jitter", "0",
    )  # fmt: skip
    with server:
        wait_ready(url, server)
        served = drive(url, 150)
        n = len(served)
        assert len(set(served)) >= 150 // 10  # recycled many times
        during = cluster_reader.expect(
            HITS * n, MISSES * n, lambda: served_and_alive(server, served)
        )
        eventually(cluster_reader.instance_keys, set(during.live))
        keys_during = cluster_reader.key_count()
        assert server.stop() == 0
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()
        assert cluster_reader.key_count() <= keys_during


def test_gunicorn_worker_sigkilled(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-run keeps what it flushed and leaves the live gauges after
    ``instance_timeout``, reaped by a reader; its replacement and the others carry on."""
    server, url = gunicorn(redis_url, tmp_path / "gunicorn.log", "--preload")
    with server:
        wait_ready(url, server)
        served = drive_until_all_served(url, server, WORKERS)
        n = len(served)
        cluster_reader.expect(HITS * n, MISSES * n, lambda: served_and_alive(server, served))
        victim = sorted(set(served))[0]
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: victim in server.workers(), False)
        # until its heartbeat is instance_timeout old the victim still counts as live
        assert instance_id(victim) in cluster_reader.state().live
        served += drive(url, 60)
        n = len(served)
        state = cluster_reader.expect(
            HITS * n, MISSES * n, lambda: served_and_alive(server, served)
        )
        assert instance_id(victim) not in state.live
        assert server.stop() == 0
        assert_clean_exit(server)
        after = cluster_reader.expect(HITS * n, MISSES * n, set)
        assert after.live == frozenset()
        assert cluster_reader.instance_keys() <= {instance_id(victim)}  # kept until cleanup

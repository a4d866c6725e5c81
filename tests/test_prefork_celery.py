"""A real Celery prefork worker (``-c 3``, Redis as broker) in a pod, ``setup()`` in the
tasks module: exact totals and live pool processes, while it runs, after
``max-tasks-per-child`` recycling and after a warm shutdown (SIGTERM)."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from .prefork_support import (
    HITS,
    MISSES,
    POD,
    ClusterReader,
    Server,
    assert_clean_exit,
    eventually,
    instance_id,
    pod_env,
    served_and_alive,
)

PROCESSES = 3

pytestmark = pytest.mark.slow


def urls(redis_url: str) -> tuple[str, str]:
    base = redis_url.rsplit("/", 1)[0]
    return f"{base}/1", f"{base}/2"


@contextlib.contextmanager
def celery_client(name: str, redis_url: str) -> Iterator[Celery]:
    """A Celery client with the Redis result backend, and no automatic garbage collection
    while it is used. A result's ``__del__`` unsubscribes on the result consumer's PubSub,
    whose lock redis-py does not re-enter: a collection of reference cycles that lands
    inside a PubSub command hangs there for ever (seen with redis-py 6.0.0, the floor). The
    cycles go at the end, outside any command, while their Redis still runs."""
    broker, backend = urls(redis_url)
    app = Celery(name, broker=broker, backend=backend)
    # a result collected after its Redis is gone must not retry (20 times per result)
    app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 0}}
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield app
    finally:
        gc.collect()
        if enabled:
            gc.enable()
        app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[Celery]:
    with celery_client("prefork-test-client", redis_url) as app:
        yield app


def worker(redis_url: str, log: Path, *options: str) -> Server:
    broker, backend = urls(redis_url)
    argv = [sys.executable, "-m", "celery", "-A", "tests.prefork_tasks", "worker",
            "--pool", "prefork", "-c", str(PROCESSES), "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"w1@{POD}",
            *options]  # fmt: skip
    env = pod_env(redis_url, PREFORK_BROKER_URL=broker, PREFORK_BACKEND_URL=backend)
    return Server(argv, env, log)


def run_tasks(client: Celery, server: Server, count: int) -> list[int]:
    results = [client.send_task("prefork.record") for _ in range(count)]
    pids = []
    for result in results:
        if server.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{server.output()}")
        pids.append(int(result.get(timeout=60)))
    return pids


def test_celery_prefork_totals_and_live_processes(
    redis_url: str, cluster_reader: ClusterReader, client: Celery, tmp_path: Path
) -> None:
    with worker(redis_url, tmp_path / "celery.log") as server:
        served: list[int] = []
        while (len(served) < 600 and not server.workers() <= set(served)) or not served:
            served += run_tasks(client, server, 30)
        assert len(server.workers()) == PROCESSES
        n = len(served)
        during = cluster_reader.expect(
            HITS * n, MISSES * n, lambda: served_and_alive(server, served)
        )
        assert during.active_count == PROCESSES  # the pool, never the main process
        assert instance_id(server.proc.pid) not in during.live
        assert cluster_reader.instance_keys() == during.live
        server.stop()
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()


def test_celery_max_tasks_per_child(
    redis_url: str, cluster_reader: ClusterReader, client: Celery, tmp_path: Path
) -> None:
    """Pool processes exit after 5 tasks (billiard's exit finalizers, then ``os._exit``)
    and are forked again: their counts stay, their live gauges and keys go."""
    with worker(redis_url, tmp_path / "celery.log", "--max-tasks-per-child", "5") as server:
        served = run_tasks(client, server, 90)
        n = len(served)
        assert len(set(served)) >= 90 // 5 // 2  # recycled
        during = cluster_reader.expect(
            HITS * n, MISSES * n, lambda: served_and_alive(server, served)
        )
        eventually(cluster_reader.instance_keys, set(during.live))
        server.stop()
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()

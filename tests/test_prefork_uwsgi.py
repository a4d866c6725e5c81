"""Real uWSGI (the ``pyuwsgi`` wheel) in a pod: ``--master --processes 3`` with the app
loaded in the master before the fork (the uWSGI default, which runs no ``os.fork`` hook in
the workers), with ``--lazy-apps``, with ``max-requests`` and with the fork hooks on."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conduit_otel_cache.embedded import free_port

from .prefork_app import HITS, MISSES
from .prefork_support import (
    INSTANCE_TIMEOUT,
    ClusterReader,
    Server,
    assert_clean_exit,
    bin_path,
    drive,
    drive_until_all_served,
    eventually,
    pod_env,
    serve_every_worker,
    served_and_alive,
    steady,
    wait_ready,
)

WORKERS = 3
#: what README advises for uWSGI with the app loaded in the master
FORK_HOOKS = ("--py-call-uwsgi-fork-hooks",)

pytestmark = pytest.mark.slow


def uwsgi(redis_url: str, log: Path, *options: str) -> tuple[Server, str]:
    port = free_port()
    argv = [bin_path("uwsgi"), "--http-socket", f"127.0.0.1:{port}", "--master",
            "--processes", str(WORKERS), "--module", "tests.prefork_app:application",
            "--need-app", "--die-on-term", "--worker-reload-mercy", "15", *options]  # fmt: skip
    return Server(argv, pod_env(redis_url), log), f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize(
    "options",
    [(), ("--lazy-apps",), ("--py-call-uwsgi-fork-hooks",)],
    ids=["forked", "lazy-apps", "fork-hooks"],
)
def test_uwsgi_totals_and_live_workers(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path, options: tuple[str, ...]
) -> None:
    server, url = uwsgi(redis_url, tmp_path / "uwsgi.log", *options)
    with server:
        n, during = serve_every_worker(url, server, cluster_reader, WORKERS)
        # idle workers keep beating: still live for twice the timeout
        steady(lambda: cluster_reader.state(), during, 2 * INSTANCE_TIMEOUT)
        assert server.stop() == 0, server.output()
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()


@pytest.mark.parametrize("options", [(), FORK_HOOKS], ids=["forked", "fork-hooks"])
def test_uwsgi_max_requests_recycles_workers(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path, options: tuple[str, ...]
) -> None:
    """Workers exit after 20 requests (``min-worker-lifetime`` 0: at once) and are forked
    again from the master: departed workers' counts stay, no keys are left behind, and
    every respawned worker serves (none hangs after its fork)."""
    recycle = ("--max-requests", "20", "--min-worker-lifetime", "0")
    server, url = uwsgi(redis_url, tmp_path / "uwsgi.log", *recycle, *options)
    with server:
        wait_ready(url, server)
        served = drive(url, 120)
        n = len(served)
        assert len(set(served)) > WORKERS  # recycled
        during = cluster_reader.expect(
            HITS * n, MISSES * n, lambda: served_and_alive(server, served)
        )
        eventually(cluster_reader.instance_keys, set(during.live))
        # uWSGI itself leaves a worker respawned during its shutdown waiting for the mercy
        # timeout: stop once every respawn is done
        eventually(lambda: len(server.workers()), WORKERS)
        served += drive_until_all_served(url, server, WORKERS)
        n = len(served)
        cluster_reader.expect(HITS * n, MISSES * n, lambda: served_and_alive(server, served))
        eventually(lambda: len(server.workers()), WORKERS)
        assert server.stop() == 0, server.output()
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)
        assert cluster_reader.instance_keys() == set()


def test_uwsgi_sigint_stops_cleanly(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path
) -> None:
    """SIGINT (uWSGI's own "kill") also ends with the final flush and departures."""
    server, url = uwsgi(redis_url, tmp_path / "uwsgi.log")
    with server:
        wait_ready(url, server)
        served = drive(url, 40)
        n = len(served)
        assert server.stop(signal.SIGINT) == 0, server.output()
        assert_clean_exit(server)
        cluster_reader.expect(HITS * n, MISSES * n, set)

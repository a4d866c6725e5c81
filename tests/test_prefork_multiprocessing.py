"""``multiprocessing.Pool`` in a pod with the fork and the spawn start methods, ``setup()``
at import: exact totals and live workers while the pool runs and after close/join or
terminate/join."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .prefork_support import (
    HITS,
    MISSES,
    ClusterReader,
    Server,
    assert_clean_exit,
    eventually,
    instance_id,
    pod_env,
)

TASKS = 90

pytestmark = pytest.mark.slow


def report(server: Server) -> Any:
    def line() -> str:
        if server.proc.poll() is not None:
            raise AssertionError(f"exited with {server.proc.returncode}:\n{server.output()}")
        lines = [x for x in server.output().splitlines() if x.startswith("{")]
        return lines[0] if lines else ""

    eventually(lambda: bool(line()), True)
    return json.loads(line())


# "terminate": SIGTERM to the workers, as ``with Pool()`` does on exit. It hung under load
# (1 run in 8) where the signal found a worker leaving, inside ``threading._shutdown``
# (``tests/test_lifecycle.py`` puts it there every time)
@pytest.mark.parametrize("end", ["close", "terminate"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_totals_and_live_workers(
    redis_url: str, cluster_reader: ClusterReader, tmp_path: Path, method: str, end: str
) -> None:
    argv = [sys.executable, "-m", "tests.prefork_pool", method, str(TASKS)]
    log = tmp_path / "pool.log"
    with Server(argv, pod_env(redis_url), log, stdin=subprocess.PIPE) as server:
        ran = report(server)
        pids, workers = ran["pids"], set(ran["workers"])
        assert len(pids) == TASKS and set(pids) == workers and len(workers) == 3
        live = {instance_id(pid) for pid in workers}
        during = cluster_reader.expect(HITS * TASKS, MISSES * TASKS, lambda: live)
        assert instance_id(server.proc.pid) not in during.live  # the parent records nothing
        assert cluster_reader.instance_keys() == live
        assert server.proc.stdin is not None
        server.proc.stdin.write(f"{end}\n".encode())
        server.proc.stdin.flush()
        assert server.proc.wait(30) == 0
        assert server.output().rstrip().endswith("stopped")
        assert_clean_exit(server)
        cluster_reader.expect(HITS * TASKS, MISSES * TASKS, set)
        assert cluster_reader.instance_keys() == set()  # every worker departed at exit

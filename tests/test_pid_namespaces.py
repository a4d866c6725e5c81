"""Two containers with one host name (host networking) whose applications run as PID 1
(issue 22 row 10): real processes in their own PID namespaces (``unshare``). By default they
get distinct ids; given one explicit id, they are told apart by token, never write as one
incarnation, and the totals are exact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

HERE = Path(__file__).parent
HITS = 100


def start(url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare not found: install util-linux")
    root = os.environ.get("PYTHONPATH", "")
    return subprocess.Popen(
        [unshare, "--pid", "--fork", "--mount-proc", *(() if os.geteuid() == 0 else ("-Ur",)),
         sys.executable, str(HERE / "namespace_worker.py"), url, str(HITS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": root, **env},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True])
def test_pid_1_of_two_containers_with_one_host_name(
    redis_url: str, r: redis.Redis, explicit: bool
) -> None:
    env = {"HOSTNAME": "node-7"} | ({"INSTANCE_ID": "app"} if explicit else {})
    workers = [start(redis_url, env) for _ in range(2)]
    try:
        ids = []
        for w in workers:
            assert w.stdout is not None
            pid, instance_id = w.stdout.readline().split()
            assert pid == "1"  # PID 1 of its own namespace, as in a container
            ids.append(instance_id)
        if not explicit:
            assert ids[0] != ids[1]
            assert all(i.startswith("node-7-ns") and i.endswith("-1") for i in ids), ids
        for _ in range(3):  # both write on, in turn
            for w in workers:
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write("more\n")
                w.stdin.flush()
                word, ok, _ = w.stdout.readline().split()
                assert (word, ok) == ("flushed", "True")
        final = []
        for w in workers:
            w.stdin.write("more\n")  # type: ignore[union-attr]
            w.stdin.flush()  # type: ignore[union-attr]
            final.append(w.stdout.readline().split()[2])  # type: ignore[union-attr]
        assert final[0] != final[1]  # never one incarnation
        hits = int(r.hget("conduit:cache:stats:aggregated:A", "hit_count") or 0)
        assert hits == 2 * 5 * HITS
        assert int(r.hget("conduit:cache:stats:aggregated:A", "instance_count") or 0) == 2
    finally:
        for w in workers:
            if w.stdin is not None:
                w.stdin.close()
        for w in workers:
            w.wait(30)
    assert int(r.hget("conduit:cache:stats:aggregated:A", "instance_count") or 0) == 0

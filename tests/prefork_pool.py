"""A ``multiprocessing.Pool`` in a pod, ``setup()`` at import of this module (in the parent
and, with spawn, in every worker). ``python -m tests.prefork_pool METHOD TASKS``: runs
TASKS tasks on 3 workers (each records ``HITS`` hits and ``MISSES`` misses), prints one JSON
line with the pids that ran them and the pool's workers, waits for a line on stdin, then
ends the pool as the line says (``close``: close and join, graceful; ``terminate``: SIGTERM
to every worker, as ``with Pool()`` does on exit) and prints ``stopped``."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

from conduit_otel_cache import setup

from .prefork_support import HITS, MISSES, REGION

stats = setup()


def record(_: int) -> int:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    time.sleep(0.01)  # long enough for the tasks to spread over the pool
    return os.getpid()


def main() -> None:
    method, tasks = sys.argv[1], int(sys.argv[2])
    pool = multiprocessing.get_context(method).Pool(3)
    pids = pool.map(record, range(tasks), chunksize=1)
    workers = [p.pid for p in multiprocessing.active_children()]
    print(json.dumps({"pids": pids, "workers": workers}), flush=True)
    if sys.stdin.readline().strip() == "terminate":
        pool.terminate()
    else:
        pool.close()
    pool.join()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()

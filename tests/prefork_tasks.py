"""The Celery app of the pre-fork tests: ``setup()`` at import, configured by the worker's
environment as in a pod; the broker and result backend are ``PREFORK_BROKER_URL`` and
``PREFORK_BACKEND_URL``. Task ``prefork.record`` records ``HITS`` hits and ``MISSES``
misses in ``REGION`` and returns the pid of the pool process that ran it; ``prefork.die``
records as much, then SIGKILLs its pool process."""

from __future__ import annotations

import os
import signal
import time

from celery import Celery

from conduit_otel_cache import setup

from .prefork_support import HITS, MISSES, REGION

app = Celery("prefork_tasks", broker=os.environ["PREFORK_BROKER_URL"],
             backend=os.environ["PREFORK_BACKEND_URL"])  # fmt: skip
app.conf.worker_prefetch_multiplier = 1
stats = setup()


@app.task(name="prefork.record")
def record() -> int:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    time.sleep(0.005)  # long enough for the tasks to spread over the pool
    return os.getpid()


@app.task(name="prefork.die")
def die() -> None:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    os.kill(os.getpid(), signal.SIGKILL)

"""A work horse per job (RQ): what each job costs, from the fork to the horse reaped.

``python -m benchmarks.work_horse [--quick]``

Each job forks a child that records one hit and one miss and ends with ``os._exit(0)``,
as RQ's work horse does; the child's final flush (one write) and deregistration run at its
``os._exit``. Three rows in the same run: no library (the fork alone), the tasks imported in
the worker (each horse is a fork of a process that called ``setup()``), and ``setup()`` in
each horse (the tasks imported by the horse, minus the import itself).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from conduit_otel_cache import setup
from conduit_otel_cache.embedded import RedisServer

from .common import Target, arguments, judged, plain_client, show


def _per_job(job: Callable[[], None], jobs: int) -> list[float]:
    times = []
    for _ in range(jobs):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                job()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - start)
    return times


def run(quick: bool = False) -> list[Target]:
    jobs = 20 if quick else 200
    rows = []
    with RedisServer() as server:
        bare = _per_job(lambda: None, jobs)
        stats = setup(redis_url=server.url, instance_id="bench-worker", set_global=False)

        def record() -> None:
            stats.record_hit("Jobs", 0.001)
            stats.record_miss("Jobs", 0.002)

        preloaded = _per_job(record, jobs)

        def setup_in_horse() -> None:
            own = setup(redis_url=server.url, set_global=False)
            own.record_hit("Jobs", 0.001)
            own.record_miss("Jobs", 0.002)

        own_setup = _per_job(setup_in_horse, jobs)
        stats.shutdown()
        totals = stats.cluster_totals("Jobs")
        keys = len(plain_client(server.url).keys("conduit:*"))
    for name, times in (
        ("fork + os._exit, no library", bare),
        ("horse of a worker that called setup()", preloaded),
        ("setup() in each horse", own_setup),
    ):
        median = statistics.median(times)
        rows.append(
            [name, f"{median * 1000:.2f}", f"{(median - statistics.median(bare)) * 1000:.2f}"]
        )
    show(
        f"Work horse per job: ms per job ({jobs} jobs each)",
        ["variant", "median", "library adds"],
        rows,
    )
    exact = totals.hit_count == 2 * jobs and totals.miss_count == 2 * jobs
    return judged(
        "Work horse targets",
        [Target("every horse's events in the totals, keys bounded", exact and keys < 20,
                f"{totals.hit_count} hits of {2 * jobs}, {keys} keys after {2 * jobs} horses")],
        quick,
    )  # fmt: skip


if __name__ == "__main__":
    run(quick=arguments(__doc__ or "").quick)

"""The spool (``spool_dir``): recovery time of dead incarnations, and spool size per
instance per region. The hot path with and without a spool is in ``hot_path``.

``python -m benchmarks.spool [--quick]``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from conduit_otel_cache import setup
from conduit_otel_cache.config import DEFAULT_BUCKETS, Settings
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.recorder import Recorder
from conduit_otel_cache.recovery import Recoverer
from conduit_otel_cache.spool import Spool
from conduit_otel_cache.store import Store

from .common import Target, arguments, show, show_targets

REGIONS = 5
HITS = 1000
#: an application process: flushes once, records as much again, waits to be SIGKILLed
APP = """
import sys
from conduit_otel_cache import setup
stats = setup(redis_url=sys.argv[1], spool_dir=sys.argv[2], flush_interval=None,
              set_global=False)
for r in range(REGIONS):
    for i in range(HITS):
        stats.record_hit(f"region-{r}", 0.001)
stats.flush()
for r in range(REGIONS):
    for i in range(HITS):
        stats.record_miss(f"region-{r}", 0.002)
print("ready", flush=True)
sys.stdin.read()
""".replace("REGIONS", str(REGIONS)).replace("HITS", str(HITS))


def kill_incarnations(url: str, spool_dir: str, count: int, batch: int = 20) -> None:
    """``count`` real processes that flushed once, recorded more, and were SIGKILLed
    (all alive until then: none of them recovers another)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs: list[subprocess.Popen[str]] = []
    while len(procs) < count:
        started = [
            subprocess.Popen(
                [sys.executable, "-c", APP, url, spool_dir],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(min(batch, count - len(procs)))
        ]
        for proc in started:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        procs += started
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def spool_sizes() -> list[list[object]]:
    """Bytes on disk of one instance's spool with 1, 10 and 100 regions (one thread)."""
    rows: list[list[object]] = []
    width = Recorder(DEFAULT_BUCKETS).width
    for regions in (1, 10, 100):
        with tempfile.TemporaryDirectory() as d:
            spool = Spool(d, width, {"token": "size", "bounds": list(DEFAULT_BUCKETS)})
            for r in range(regions):
                spool.record(f"region-{r}")[0] += 1
            disk = os.stat(spool.path).st_blocks * 512
            rows.append([regions, f"{disk:,}", f"{spool.record_size:,}",
                         f"{disk / regions:,.0f}"])  # fmt: skip
            spool.abandon()
    return rows


def run(quick: bool = False) -> list[Target]:
    dead = 10 if quick else 100
    print(f"\n## Spool: recovery of {dead} dead incarnations, spool size", flush=True)
    targets: list[Target] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as d:
        kill_incarnations(server.url, d, dead)
        settings = Settings.load(redis_url=server.url, spool_dir=d)
        store = Store.from_settings(settings.connection)
        recoverer = Recoverer(settings.write_through, store)
        start = time.perf_counter()
        done = recoverer.run()
        seconds = time.perf_counter() - start
        left = len(os.listdir(d))
        reader = setup(redis_url=server.url, set_global=False, flush_interval=None,
                       aggregation_cache_ttl=0, instance_id="bench-reader")  # fmt: skip
        totals = reader.cluster_totals("region-0")
        reader.shutdown()
        store.close()
    exact = totals.hit_count == dead * HITS and totals.miss_count == dead * HITS
    show(
        f"Recovery of {dead} SIGKILLed incarnations ({REGIONS} regions each, half their "
        "events never flushed)",
        ["figure", "value"],
        [
            ["recovered (written and deregistered)", f"{done.written} of {dead}"],
            ["one recovery pass", f"{seconds * 1e3:,.0f} ms"],
            ["per dead incarnation", f"{seconds / dead * 1e3:,.2f} ms"],
            ["spools left", left],
            ["region-0 totals: hits, misses (expected each)",
             f"{totals.hit_count:,}, {totals.miss_count:,} ({dead * HITS:,})"],
        ],
    )  # fmt: skip
    show(
        "Spool size of one instance (one thread; a record per thread and region)",
        ["regions", "bytes on disk", "bytes per record", "bytes on disk per region"],
        spool_sizes(),
    )
    targets.append(
        Target(
            f"{dead} dead incarnations recovered exactly, no spool left",
            exact and done.written == dead and left == 0,
            f"{seconds * 1e3:,.0f} ms for {dead}",
        )
    )
    show_targets("Spool targets", targets)
    return targets


def main() -> None:
    args = arguments(__doc__ or "")
    run(quick=args.quick)


if __name__ == "__main__":
    main()

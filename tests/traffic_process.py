"""An application instance that records traffic continuously, for the Prometheus end-to-end
test. Usage: traffic_process.py URL ID HITS MISSES [SESSION_HITS SESSION_MISSES] (events per
region per step; the optional pair for the second region, Sessions).

Every 0.1 s it records HITS hits and MISSES misses (each miss followed by a set), one eviction
and a new size in each of two regions; the background flush (flush_interval=1) writes it
through. When a line arrives on stdin it stops recording, flushes, prints ``done`` and the
totals it recorded as JSON, keeps heart-beating until stdin closes, then shuts down cleanly
and prints ``stopped``. With ``TRAFFIC_TICKS=<file>`` in the environment it appends
``<unix time> <hits so far>`` to that file after every step (the true rate at any moment)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from conduit_otel_cache import setup

REGIONS = ("ProviderResponses", "Sessions")

url, instance_id, hits, misses = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
per_region = {"ProviderResponses": (hits, misses), "Sessions": (hits, misses)}
if len(sys.argv) > 5:
    per_region["Sessions"] = (int(sys.argv[5]), int(sys.argv[6]))
stats = setup(redis_url=url, instance_id=instance_id, flush_interval=1, set_global=False)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
totals = {r: {"hits": 0, "misses": 0, "sets": 0, "evictions": 0} for r in REGIONS}
ticks = open(os.environ["TRAFFIC_TICKS"], "a") if "TRAFFIC_TICKS" in os.environ else None  # noqa: SIM115
print("recording", flush=True)
step = 0
while not stop.wait(0.1):
    step += 1
    for region in REGIONS:
        hits, misses = per_region[region]
        for i in range(hits):
            stats.record_hit(region, 0.0004 * (1 + (i + step) % 8))
        for _ in range(misses):
            stats.record_miss(region, 0.02)
            stats.record_set(region)
        stats.record_eviction(region)
        stats.set_size_bytes(region, 1000 * step)
        counts = totals[region]
        counts["hits"] += hits
        counts["misses"] += misses
        counts["sets"] += misses
        counts["evictions"] += 1
    if ticks is not None:
        ticks.write(f"{time.time()} {sum(t['hits'] for t in totals.values())}\n")
        ticks.flush()
assert stats.flush()
print("done", json.dumps(totals), flush=True)
sys.stdin.read()
stats.shutdown()
print("stopped", flush=True)

"""An application instance under Redis memory pressure, in its own process: records hits in
REGIONS regions with a background flush every 0.2 s for SECONDS, prints what it recorded;
then, for each "flush" line on stdin, flushes N times and prints how many succeeded; shuts
down at end of input. Usage: eviction_worker.py URL ID REGIONS SECONDS"""

import json
import random
import sys
import time

from conduit_otel_cache import setup

url, instance_id, regions, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stats = setup(redis_url=url, instance_id=instance_id, flush_interval=0.2, set_global=False)
recorded: dict[str, int] = {}
stop = time.monotonic() + seconds
while time.monotonic() < stop:
    for _ in range(50):
        region = f"R{random.randrange(regions)}"
        stats.record_hit(region, 0.001)
        recorded[region] = recorded.get(region, 0) + 1
    time.sleep(0.005)
print("recorded", json.dumps(recorded), flush=True)
for line in sys.stdin:
    n = int(line.split()[1])
    print("flushed", sum(stats.flush() for _ in range(n)), stats.flush_errors, flush=True)
stats.shutdown()
print("stopped", flush=True)

"""An application instance with a spool: record HITS hits and flush, then HITS more without
a flush, print "ready" and wait to be killed (or, with "exit", shut down cleanly).
Usage: spool_process.py URL SPOOL_DIR REGION HITS [exit]"""

import sys

from conduit_otel_cache import setup

url, spool_dir, region, hits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stats = setup(redis_url=url, spool_dir=spool_dir, flush_interval=None, set_global=False)
for i in range(hits):
    stats.record_hit(region, 0.001 * (i % 5))
    stats.record_miss("other")
assert stats.flush()
for _ in range(hits):
    stats.record_hit(region, 0.02)
    stats.record_set(region)
print("ready", flush=True)
if sys.argv[5:] == ["exit"]:
    stats.shutdown()
else:
    sys.stdin.read()

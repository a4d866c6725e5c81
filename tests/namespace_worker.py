"""An application in its own PID namespace (PID 1 there): default identity unless
``INSTANCE_ID`` is set; records HITS hits, flushes, prints its instance id, records and
flushes again at each line on stdin, shuts down at end of input.
Usage: namespace_worker.py URL HITS"""

import os
import sys

from conduit_otel_cache import setup

url, hits = sys.argv[1], int(sys.argv[2])
stats = setup(redis_url=url, flush_interval=None, set_global=False)
for _ in range(hits):
    stats.record_hit("A", 0.001)
assert stats.flush()
print(os.getpid(), stats.exporter.identity.instance_id, flush=True)
for _line in sys.stdin:
    for _ in range(hits):
        stats.record_hit("A", 0.001)
    print("flushed", stats.flush(), stats.exporter.identity.instance_id, flush=True)
stats.shutdown()

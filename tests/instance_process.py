"""An application instance in its own process: record known counts, flush, wait for stdin
to close, then shut down (or be killed). Usage: instance_process.py URL ID HITS MISSES"""

import sys

from conduit_otel_cache import setup

url, instance_id, hits, misses = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stats = setup(redis_url=url, instance_id=instance_id, flush_interval=None)
for i in range(hits):
    stats.record_hit("ProviderResponses", 0.001 * (i % 5))
for _ in range(misses):
    stats.record_miss("ProviderResponses", 0.02)
    stats.record_set("ProviderResponses")
stats.set_size_bytes("ProviderResponses", 1000 * (hits + misses))
assert stats.flush()
print("flushed", flush=True)
sys.stdin.read()
stats.shutdown()
print("stopped", flush=True)

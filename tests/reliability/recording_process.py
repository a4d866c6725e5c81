"""An instance that records continuously until stdin says "stop", then flushes until it
succeeds and prints its totals as JSON. Usage: recording_process.py URL ID"""

import json
import logging
import sys
import threading
import time

from conduit_otel_cache import setup

logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
url, instance_id = sys.argv[1], sys.argv[2]
stats = setup(redis_url=url, instance_id=instance_id, flush_interval=0.1, instance_timeout=5,
              socket_timeout=0.5, connect_timeout=0.5)  # fmt: skip
stop = threading.Event()
counts = {"hits": 0, "misses": 0, "max_record_seconds": 0.0}


def record() -> None:
    i = 0
    while not stop.is_set():
        i += 1
        start = time.perf_counter()
        if i % 4:
            stats.record_hit("ProviderResponses", 0.001)
            counts["hits"] += 1
        else:
            stats.record_miss("ProviderResponses", 0.01)
            counts["misses"] += 1
        counts["max_record_seconds"] = max(counts["max_record_seconds"],
                                           time.perf_counter() - start)  # fmt: skip
        if i % 100 == 0:
            time.sleep(0.001)


thread = threading.Thread(target=record)
thread.start()
print("recording", flush=True)
sys.stdin.readline()
stop.set()
thread.join()
while not stats.flush():
    time.sleep(0.05)
counts["flush_errors"] = stats.flush_errors
print(json.dumps(counts), flush=True)
sys.stdin.readline()
stats.shutdown()

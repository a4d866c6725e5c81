"""A process that ends while its final flush waits for Redis (writes paused), and a SIGTERM
whose handler raises lands in that wait: how billiard's pool processes end (Celery's
``--max-tasks-per-child``): one that leaves tells its pool, which SIGTERMs it; its handler
raises ``SystemExit`` while the process ends by ``os._exit``. ``python -m
tests.exit_apps.raising_handler HOW HITS``; HOW ``os-exit`` (status 3) or ``atexit`` (the main
module ends)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import redis

from conduit_otel_cache import setup

from ..prefork_support import REGION

how, hits = sys.argv[1], int(sys.argv[2])
stats = setup()
client = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])
handled = threading.Event()


def billiards_handler(signum: int, frame: Any) -> None:
    """``billiard.common._shutdown_cleanup``."""
    handled.set()
    signal.signal(signum, signal.SIG_DFL)
    sys.exit(-(256 - signum))


def signal_inside_the_final_flush() -> None:
    while client.info("clients")["blocked_clients"] < 1:  # the final flush waits for Redis
        time.sleep(0.01)
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
    handled.wait(10)
    client.execute_command("CLIENT", "UNPAUSE")


signal.signal(signal.SIGTERM, billiards_handler)
for _ in range(hits):
    stats.record_hit(REGION, 0.001)
client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
threading.Thread(target=signal_inside_the_final_flush, daemon=True).start()
print("ready", flush=True)
if how == "os-exit":
    os._exit(3)

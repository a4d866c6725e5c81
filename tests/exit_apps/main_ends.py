"""A script that ends by reaching the end of its main module (``python -m
tests.exit_apps.main_ends``), flushed by ``atexit`` alone: it records one hit, and its own
``atexit`` handler (run before the library's) records one miss, calls ``stats.flush()`` and
prints what it returned. Python 3.12.0 and 3.12.1 start no thread in ``atexit`` handlers."""

from __future__ import annotations

import atexit

from conduit_otel_cache import setup

from ..prefork_support import REGION

stats = setup()


@atexit.register  # after setup(): runs before the library's final flush
def last_words() -> None:
    stats.record_miss(REGION, 0.002)
    print(f"flushed {stats.flush()}", flush=True)


stats.record_hit(REGION, 0.001)
print("ready", flush=True)

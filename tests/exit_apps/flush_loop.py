"""A service whose main thread flushes in a loop (``python -m tests.exit_apps.flush_loop
MODE EVENTS``), so that a SIGTERM lands on the main thread inside ``stats.flush()``, while
another thread records EVENTS hits and then prints ``recorded``. MODE ``own-handler``: the
application's own SIGTERM handler calls ``stats.shutdown()`` and ``sys.exit(0)``;
``default``: SIGTERM keeps its default disposition (the library's stand-in)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from conduit_otel_cache import setup

from ..prefork_support import REGION

mode, events = sys.argv[1], int(sys.argv[2])
stats = setup()


def own_handler(signum: int, frame: Any) -> None:
    stats.shutdown()
    sys.exit(0)


def record() -> None:
    for _ in range(events):
        stats.record_hit(REGION, 0.001)
    print("recorded", flush=True)


if mode == "own-handler":
    signal.signal(signal.SIGTERM, own_handler)
print("ready", flush=True)
threading.Thread(target=record, daemon=True).start()
while True:
    stats.flush()

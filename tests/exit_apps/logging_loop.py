"""A service whose main thread logs in a loop (``python -m tests.exit_apps.logging_loop
MODE``), so that a SIGTERM lands on it inside a ``logging`` handler, holding the handler's
lock, while the final flush logs too: Redis is stopped after ``ready``, so the final flush
fails and says so. MODE ``own-handler``: the application's own SIGTERM handler calls
``stats.shutdown()`` and ``sys.exit(0)``; ``leaked-lock``: as ``own-handler``, with the
handler's lock left held by the main thread, as a signal that lands between its acquire and
its ``try`` leaves it; ``leaked-lock-outside``: as ``leaked-lock``, the main thread busy
outside ``logging`` (the signal lands there); ``default``: the library's stand-in;
``own-lock``: as ``default``, but the lock is a logging library's own, held by the main
thread outside ``logging`` (out of the library's sight); ``held-lock``: that lock held by
the main thread for ever."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from conduit_otel_cache import setup

from ..prefork_support import REGION

mode = sys.argv[1]
LOCK = threading.Lock()


class LockingHandler(logging.Handler):
    """A handler of a logging library with a lock of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        with LOCK:
            pass


logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
log = logging.getLogger("app")
if mode in ("own-lock", "held-lock"):
    logging.getLogger().addHandler(LockingHandler())
stats = setup()
stats.record_hit(REGION, 0.001)
assert stats.flush()
stats.record_hit(REGION, 0.001)  # what the final flush tries to write


def own_handler(signum: int, frame: Any) -> None:
    stats.shutdown()
    sys.exit(0)


if mode in ("own-handler", "leaked-lock", "leaked-lock-outside"):
    signal.signal(signal.SIGTERM, own_handler)
if mode.startswith("leaked-lock"):
    logging.getLogger().handlers[0].acquire()
print("ready", flush=True)
if mode == "held-lock":
    LOCK.acquire()
while True:
    if mode == "own-lock":
        with LOCK:
            sum(range(10_000))
    elif mode in ("held-lock", "leaked-lock-outside"):
        sum(range(10_000))
    else:
        log.info("served %s", "a request")

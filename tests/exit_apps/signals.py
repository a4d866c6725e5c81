"""How ``setup()`` treats SIGTERM (``python -m tests.exit_apps.signals CASE``): records one
hit, prints what it sees as JSON and ``ready``, then waits for signals."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from conduit_otel_cache import setup

case = sys.argv[1]
calls: list[int] = []


def app_handler(signum: int, frame: Any) -> None:
    calls.append(signum)
    print(f"app handler {len(calls)}", flush=True)
    if len(calls) == 2:
        sys.exit(3)


if case == "handler-before":
    signal.signal(signal.SIGTERM, app_handler)
if case == "off-main-thread":
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(setup()))
    worker.start()
    worker.join()
    stats = box[0]
else:
    stats = setup(handle_signals=case != "opt-out")
if case == "handler-after":
    signal.signal(signal.SIGTERM, app_handler)
stats.record_hit("Pages", 0.001)
print(
    json.dumps(
        {
            "getsignal_is_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "getsignal_is_app": signal.getsignal(signal.SIGTERM) is app_handler,
            "pid": os.getpid(),
        }
    ),
    flush=True,
)
print("ready", flush=True)
while True:
    signal.pause()

"""SIGTERM whose handler runs while the main thread is in ``threading._shutdown`` holding
the lock that a non-daemon thread takes to start (Python 3.10 to 3.12): how a
``multiprocessing`` pool worker ends when ``Pool.terminate()`` signals it as it leaves (it
hung there, 1 run in 8 under load). A line tracer raises the signal at that line, so it lands
there every time. ``python -m tests.exit_apps.sigterm_in_thread_shutdown``; prints
``no such line`` where ``threading._shutdown`` has none (Python 3.13)."""

from __future__ import annotations

import inspect
import signal
import sys
import threading
from types import FrameType
from typing import Any

from conduit_otel_cache import setup

from ..prefork_support import REGION

shutdown = threading._shutdown  # type: ignore[attr-defined]
lines, first = inspect.getsourcelines(shutdown)
inside = [first + i for i, text in enumerate(lines) if "locks = list(_shutdown_locks)" in text]
if not inside:
    print("no such line", flush=True)
    sys.exit(0)

stats = setup()
stats.record_hit(REGION, 0.001)


def in_shutdown(frame: FrameType, event: str, arg: Any) -> Any:
    if event == "line" and frame.f_lineno == inside[0]:
        signal.raise_signal(signal.SIGTERM)  # its handler runs at the next instruction
    return in_shutdown


def tracer(frame: FrameType, event: str, arg: Any) -> Any:
    return in_shutdown if frame.f_code is shutdown.__code__ else None


print("ready", flush=True)
sys.settrace(tracer)

"""SIGINT and SIGTERM for the commands (``serve``, ``stats --watch``, ``demo`` and its
workers): a wait that either signal ends.

``threading.Event.set()`` in a signal handler deadlocks when the signal lands while the
main thread holds the event's own lock (entering or leaving ``Event.wait``): the process
then never stops, and an orchestrator kills it after its grace period. The handler here
takes no lock: it sets a flag and wakes the wait through a socket pair."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
from types import FrameType


class StopSignals:
    """Install handlers for SIGINT and SIGTERM (on the main thread); :meth:`wait` returns
    True once either came."""

    def __init__(self) -> None:
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        #: the signal that came, if one did
        self.received: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        with contextlib.suppress(OSError):  # full: a wake is pending anyway
            self._wake.send(b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """True once a stop signal came, at once; else False after ``timeout`` seconds
        (``None``: waits until one comes)."""
        if self.received is None:
            select.select([self._woken], [], [], timeout)
        return self.received is not None

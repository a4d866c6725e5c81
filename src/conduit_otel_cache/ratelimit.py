"""Error logging at a bounded rate: one line, then at most one per interval with a count."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs the first failure, then at most one line per ``interval`` with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log, self._interval = logger, interval
        self._last = -interval
        self._suppressed = 0

    def error(self, msg: str, *args: object) -> None:
        """Log ``msg`` unless one was logged less than ``interval`` ago."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} similar errors suppressed)" if self._suppressed else ""
        self._log.error(msg + more, *args)
        self._last, self._suppressed = now, 0

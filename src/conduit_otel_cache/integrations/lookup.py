"""``TimedLookup``: time a lookup in any cache and record whether it hit."""

from __future__ import annotations

from time import perf_counter
from types import TracebackType

from .recording import Recording


class TimedLookup:
    """Context manager recording one lookup of ``region`` with its response time.

    ``with stats.timed_lookup("Users") as lookup:`` then call ``lookup.hit()`` or
    ``lookup.miss()`` in the block. The response time runs from entering the block to that
    call (the last call wins). The outcome is recorded when the block exits normally; if it
    raises, nothing is counted and the exception propagates. A block that calls neither
    records nothing.
    """

    __slots__ = ("_elapsed", "_hit", "_region", "_start", "_stats")

    def __init__(self, stats: Recording, region: str) -> None:
        self._stats, self._region = stats, region
        self._start = perf_counter()
        self._hit: bool | None = None
        self._elapsed = 0.0

    def __enter__(self) -> TimedLookup:
        self._hit = None
        self._start = perf_counter()
        return self

    def hit(self) -> None:
        """The lookup found the value."""
        self._elapsed = perf_counter() - self._start
        self._hit = True

    def miss(self) -> None:
        """The lookup did not find the value."""
        self._elapsed = perf_counter() - self._start
        self._hit = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or self._hit is None:
            return
        if self._hit:
            self._stats.record_hit(self._region, self._elapsed)
        else:
            self._stats.record_miss(self._region, self._elapsed)

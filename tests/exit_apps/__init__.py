"""Applications stopped the way an orchestrator stops them (tests/test_process_end.py):
each records ``HITS`` hits and ``MISSES`` misses in ``REGION`` per request or task, with
``setup()`` at import and default settings, and (the task queues) pushes one entry per
finished task to the ground-truth list ``TRUTH`` in the broker's Redis."""

from __future__ import annotations

from typing import Any

from ..prefork_support import HITS, MISSES, REGION

TRUTH = "exit-test:done"


def record_events(stats: Any) -> None:
    """What one request or task records: ``HITS`` hits and ``MISSES`` misses in ``REGION``."""
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)

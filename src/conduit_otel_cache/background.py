"""Background work beside threads that answer requests: ``serve``'s refresh and
per-instance pass, and an application's flush.

CPython hands the interpreter lock to a waiting thread every ``sys.getswitchinterval()``
(5 ms by default), so a scrape that arrives while a background thread computes waits that
long at every step of its I/O; and the objects such work creates set off full collections
of the cyclic garbage collector, which hold the lock for tens of milliseconds. While any
caller is inside :func:`quietly`, threads switch at least every :data:`PROMPT` seconds and
the collector waits (what the work leaves is freed by reference counting; ``serve`` runs
the collector between requests, see ``http.py``; an application's own allocations set it
off as before, once the flush is over). The last caller to leave restores both: a change
the application makes to either while a flush runs (``gc.disable()``, for one) is undone when
the flush ends, since the interpreter cannot tell it from ours.

The kernel's scheduler makes a thread woken on the core that background work computes on
wait for that work's slice, about 3 ms, whatever the switch interval: the work hands its
core over between its steps (:func:`let_others_run`, at most every :data:`STEP`).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: seconds between thread switches while background work runs
PROMPT = 0.0001

_lock = threading.Lock()
_inside = 0
_saved_interval = 0.0
_saved_gc = True


@contextmanager
def quietly() -> Iterator[None]:
    """Prompt thread switches and no automatic garbage collection while inside."""
    global _inside, _saved_interval, _saved_gc
    with _lock:
        if _inside == 0:
            _saved_interval, _saved_gc = sys.getswitchinterval(), gc.isenabled()
            sys.setswitchinterval(min(_saved_interval, PROMPT))
            gc.disable()
        _inside += 1
    let_others_run(0)  # a thread already waiting for the interpreter lock waits no longer
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                sys.setswitchinterval(_saved_interval)
                if _saved_gc:
                    gc.enable()


def let_others_run(unless_within: float | None = None) -> None:
    """Between steps of background work: hand the interpreter lock and this core to a
    thread that waits for either, unless the last hand-over was ``unless_within`` seconds
    (default :data:`STEP`) ago: steps too short to pay a system call each. A thread woken
    on the core a flush computes on (its sleep over, its socket readable) otherwise waits
    for the scheduler's slice, about 3 ms, even with another core idle; so does a thread
    that began waiting for the lock before :func:`quietly` shortened the switch interval."""
    global _last_yield
    now = time.perf_counter()
    if now - _last_yield >= (STEP if unless_within is None else unless_within):
        _last_yield = now
        _sched_yield()


#: the longest stretch of a flush without a hand-over (:func:`let_others_run`), seconds
STEP = 0.0002
_last_yield = 0.0


_sched_yield = getattr(os, "sched_yield", lambda: None)


def _restore_in_child() -> None:
    """A child forked while another thread was inside :func:`quietly` (a pre-fork server's
    master mid-flush) has no such thread: it starts with the interpreter as it was."""
    global _lock, _inside
    _lock = threading.Lock()
    if _inside:
        sys.setswitchinterval(_saved_interval)
        if _saved_gc:
            gc.enable()
    _inside = 0


os.register_at_fork(after_in_child=_restore_in_child)

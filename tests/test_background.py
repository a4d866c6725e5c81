"""quietly(): prompt thread switches and no automatic garbage collection while background
work runs, restored by the last of overlapping callers."""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest

from conduit_otel_cache.background import PROMPT, quietly

from .conftest import MakeStats


def test_overlapping_background_work_restores_the_interpreter_once_all_left() -> None:
    before = sys.getswitchinterval()
    assert gc.isenabled() and before > PROMPT
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with quietly():
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=other)
    with quietly():
        assert sys.getswitchinterval() == pytest.approx(PROMPT) and not gc.isenabled()
        thread.start()
        assert entered.wait(30)
    # the other caller is still inside: nothing is restored yet
    assert sys.getswitchinterval() == pytest.approx(PROMPT) and not gc.isenabled()
    leave.set()
    thread.join(30)
    assert sys.getswitchinterval() == before and gc.isenabled()


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        with quietly():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_child_forked_while_another_thread_is_inside_starts_restored() -> None:
    before = sys.getswitchinterval()
    entered, leave = threading.Event(), threading.Event()

    def flushing() -> None:  # as a pre-fork master's flush thread, inside at the fork
        with quietly():
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=flushing)
    thread.start()
    try:
        assert entered.wait(30) and not gc.isenabled()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the thread inside quietly() did not come along
            os.write(write, f"{gc.isenabled()} {sys.getswitchinterval()}".encode())
            os._exit(0)
        os.close(write)
        enabled, interval = os.read(read, 100).decode().split()
        os.close(read)
        os.waitpid(pid, 0)
        assert enabled == "True" and float(interval) == before
    finally:
        leave.set()
        thread.join(30)
    assert gc.isenabled() and sys.getswitchinterval() == before


def test_a_flush_hands_the_core_over_between_its_steps(
    make_stats: MakeStats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush lets the application's threads run as it starts, between the observations
    the SDK takes in, while it encodes the entries and before it waits for Redis: the
    stretches where a thread woken on its core would otherwise wait a scheduler slice."""
    import itertools
    import types

    from conduit_otel_cache import background

    stats = make_stats("yields")
    regions = [f"r{i}" for i in range(100)]
    for region in regions:
        stats.record_hit(region, 0.001)
    callers: list[str] = []
    # every hand-over is due (a clock that moves a second per reading), and recorded
    clock = itertools.count()
    monkeypatch.setattr(background, "_last_yield", -1.0)
    monkeypatch.setattr(background, "time", types.SimpleNamespace(perf_counter=clock.__next__))
    monkeypatch.setattr(
        background, "_sched_yield", lambda: callers.append(sys._getframe(2).f_code.co_name)
    )
    assert stats.flush()
    assert {"quietly", "callback", "export", "points_to_fields", "_entries", "_send"} <= set(
        callers
    )
    assert callers.count("callback") == 6 * len(regions)  # each observation of each instrument
    assert callers.count("_entries") == len(regions)
    assert stats.cluster_statistics("r0").hit_count == 1

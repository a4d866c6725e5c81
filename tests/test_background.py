"""quietly(): prompt thread switches and no automatic garbage collection while background
work runs, restored by the last of overlapping callers."""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from conduit_otel_cache.background import PROMPT, quietly


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

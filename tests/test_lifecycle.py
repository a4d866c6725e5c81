"""How ``setup()`` treats SIGTERM, in real processes with the default settings: the default
disposition gets a final flush and still ends the process by SIGTERM; a handler of the
application, installed before or after ``setup()``, is never replaced nor swallowed; the
opt-out and a ``setup()`` off the main thread install nothing; and a signal that interrupts
a flush, or the main thread's logging while the final flush logs, neither deadlocks nor waits
out ``shutdown_timeout``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conduit_otel_cache.embedded import RedisServer

from .prefork_support import REPO, ClusterReader, State, pod_env

SHUTDOWN_TIMEOUT = 5.0  # the default


@pytest.fixture
def reader(redis_url: str) -> Iterator[ClusterReader]:
    reader = ClusterReader(redis_url, instance_timeout=60.0)
    yield reader
    reader.close()


def env(redis_url: str) -> dict[str, str]:
    environ = pod_env(redis_url)
    environ.pop("CONDUIT_CACHE_STATS_FLUSH_INTERVAL")  # the default: 10 s
    environ.pop("CONDUIT_CACHE_STATS_INSTANCE_TIMEOUT")
    return environ


STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """A process a failed test leaves running (one that never ends: a flush loop whose
    exit was lost) is killed, so that it cannot take the CPU from the tests after it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(redis_url: str, module: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", f"tests.exit_apps.{module}", *args], cwd=REPO,
        env=env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    STARTED.append(proc)
    assert proc.stdout is not None
    lines = []
    while (line := proc.stdout.readline().strip()) != "ready":
        assert line, proc.communicate(timeout=10)
        lines.append(line)
    return proc, lines


def pages(reader: ClusterReader) -> State:
    return reader.state()


@pytest.mark.parametrize(
    ("case", "flushed", "code", "app_calls"),
    [
        ("default", True, -signal.SIGTERM, 0),
        ("handler-before", True, 3, 2),
        ("handler-after", True, 3, 2),
        ("opt-out", False, -signal.SIGTERM, 0),
        ("off-main-thread", False, -signal.SIGTERM, 0),
    ],
)
def test_sigterm(
    case: str, flushed: bool, code: int, app_calls: int, redis_url: str, reader: ClusterReader
) -> None:
    proc, lines = start(redis_url, "signals", case)
    seen = json.loads(lines[-1])
    assert seen["getsignal_is_default"] == (app_calls == 0)  # the stand-in reads as SIG_DFL
    assert seen["getsignal_is_app"] == (app_calls > 0)  # the application's handler stays
    for _ in range(max(app_calls, 1)):
        proc.send_signal(signal.SIGTERM)
        if app_calls:  # the application's handler ran, and the process goes on until it exits
            assert proc.stdout is not None and proc.stdout.readline().startswith("app handler")
    _, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 5)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    hits = 1 if flushed else 0  # opted out: the default disposition ends it, unflushed
    assert pages(reader) == State(hits, 0, 0, 0, frozenset())


def test_the_end_of_the_main_module(redis_url: str, reader: ClusterReader) -> None:
    """``atexit`` flushes and deregisters, and a ``flush()`` in an application's ``atexit``
    handler writes, also where the interpreter starts no thread there (3.12.0, 3.12.1)."""
    proc, _ = start(redis_url, "main_ends")
    out, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 5)
    assert (proc.returncode, out.strip()) == (0, "flushed True"), err
    assert "Traceback" not in err and "failed" not in err, err
    assert pages(reader) == State(1, 1, 0, 0, frozenset())  # every event, and departed


NO_THREADS_AT_EXIT = (3, 12, 0) <= sys.version_info[:3] < (3, 12, 2)


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("os-exit", 3),
        pytest.param(
            "atexit",
            0,
            marks=pytest.mark.xfail(
                NO_THREADS_AT_EXIT,
                strict=True,
                reason="README: the final flush runs on the exiting thread there",
            ),
        ),
    ],
)
def test_a_handler_that_raises_inside_the_final_flush_does_not_cut_it_short(
    how: str, code: int, redis_url: str, reader: ClusterReader
) -> None:
    """billiard's pool processes (Celery) end by ``os._exit`` after telling their pool, which
    SIGTERMs them; billiard's handler raises ``SystemExit``. Landing while the final flush
    waits for Redis, it cut the flush short (the process ended with the events unwritten and
    live, or waited out ``shutdown_timeout``); the flush now ends first, then the process
    ends as it would have."""
    proc, _ = start(redis_url, "raising_handler", how, "7")
    _, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
    assert proc.returncode == code, err
    assert "shutdown_timeout" not in err, err
    assert pages(reader) == State(7, 0, 0, 0, frozenset())  # every event, and departed


def test_sigterm_inside_the_interpreters_thread_shutdown(
    redis_url: str, reader: ClusterReader
) -> None:
    """The handler runs while the main thread holds ``threading``'s lock for starting
    non-daemon threads (a ``Pool.terminate()`` worker): the final flush still runs, and the
    process ends by the signal (it hung: the flush's thread waited for that lock)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.exit_apps.sigterm_in_thread_shutdown"], cwd=REPO,
        env=env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    STARTED.append(proc)
    out, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
    if out.strip() == "no such line":
        pytest.skip("threading._shutdown takes no such lock on this Python (3.13+)")
    assert proc.returncode == -signal.SIGTERM, err
    assert pages(reader) == State(1, 0, 0, 0, frozenset())  # flushed, and departed


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["own-handler", "default"])
def test_sigterm_interrupting_a_flush(mode: str, redis_url: str) -> None:
    """A main thread that flushes in a loop, so the signal lands inside ``flush()``: the
    process ends well within ``shutdown_timeout`` (a deadlock on the interrupted flush's
    locks would wait all of it, with no final flush), exact (an SDK collection stopped half
    way by the handler's ``SystemExit`` would count the next one twice), and deregistered."""
    events = 500
    for attempt in range(6):
        # each attempt starts from an empty Redis (below), read by a reader of its own: one
        # that ran across the deletion would carry the earlier counts over it (continuity.py)
        reader = ClusterReader(redis_url, name=f"test-reader-{attempt}")
        try:
            proc, _ = start(redis_url, "flush_loop", mode, str(events))
            assert proc.stdout is not None and proc.stdout.readline().strip() == "recorded"
            time.sleep(0.01 * attempt)  # the flush loop goes on; vary where the signal lands
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 5)
            took = time.monotonic() - sent
            assert proc.returncode == (0 if mode == "own-handler" else -signal.SIGTERM), err
            assert "shutdown_timeout" not in err and "Traceback" not in err, err
            assert took < SHUTDOWN_TIMEOUT / 2, f"stopped after {took:.2f}s"
            assert reader.state() == State(events, 0, 0, 0, frozenset()), attempt
            reader.client.delete(*reader.client.keys("conduit:*"))
        finally:
            reader.close()


@pytest.mark.parametrize("mode", ["own-handler", "default", "leaked-lock", "leaked-lock-outside"])
def test_sigterm_while_the_main_thread_logs_and_the_final_flush_logs_too(mode: str) -> None:
    """The signal lands inside a ``logging`` handler (its lock held), and the final flush
    fails (Redis is stopped) and logs: the main thread goes on to release the lock, and the
    process ends at once by the signal (without: it hung until killed in 1 to 3 of 4). A
    handler's lock that the main thread left held (``leaked-lock``: an application's handler
    that ends the process between a lock's acquire and its ``try``, as Python 3.12 ran it
    once in CI) is released at exit (without: the exit waited all of ``shutdown_timeout``),
    also where the signal lands outside ``logging`` (``leaked-lock-outside``: the handler's
    ``shutdown()`` waited all of it for a close that logs, as once in CI on Python 3.12)."""
    for attempt in range(5):  # where the signal lands varies: it hung in 1 to 3 of 4
        with RedisServer() as server:
            proc, _ = start(server.url, "logging_loop", mode)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"attempt {attempt}: the process did not end")
        took = time.monotonic() - sent
        assert proc.returncode == (0 if mode != "default" else -signal.SIGTERM), err
        assert "Traceback" not in err, err
        assert took < SHUTDOWN_TIMEOUT / 2, f"attempt {attempt}: stopped after {took:.2f}s"


@pytest.mark.parametrize("mode", ["own-lock", "held-lock"])
def test_sigterm_while_the_main_thread_holds_a_lock_the_final_flush_needs(mode: str) -> None:
    """A lock out of the library's sight (a logging library's own): the main thread waits
    for the final flush at most the handles' ``shutdown_timeout`` and 2 s, then goes on and
    releases it; the flush then ends the process by the signal (it hung until killed), or,
    where the main thread takes the lock again first (it took 10.6 s on Python 3.12) or never
    releases it, the deadline 2 s later does (without it: hung until killed)."""
    with RedisServer() as server:
        proc, _ = start(server.url, "logging_loop", mode)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end")
    took = time.monotonic() - sent
    assert proc.returncode == -signal.SIGTERM, err
    # the deadline: shutdown_timeout + 4 s (9.3-9.5 s on a quiet machine), with room for load
    assert took < SHUTDOWN_TIMEOUT + 2 + 2 + 3, f"stopped after {took:.2f}s"

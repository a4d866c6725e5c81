"""The whole life of a process that records, in one module: start, fork, the final flush
with deregistration, signals and the server hooks.

A handle's pipeline (:mod:`.pipeline`; "handle" below) is registered here at start-up and
forgotten at its shutdown. Every way a Python process ends runs the same final flush
(``shutdown_all``), bounded by each handle's ``shutdown_timeout``:

==============================================  ==============================================
how the process ends                            what runs
==============================================  ==============================================
``sys.exit()``, end of the main module,         ``atexit``
SIGINT (``KeyboardInterrupt``)                  (on the exiting thread where the interpreter
                                                starts no thread there: 3.12.0, 3.12.1)
``os._exit()``: ``multiprocessing`` and         ``os._exit`` is wrapped: the final flush runs
Celery's pool workers, RQ's work horse, any     first, then the process ends with the status
``os.fork()`` child                             it was given
SIGTERM with the default disposition            a stand-in for the default: the final flush
(Kubernetes, Docker, systemd), also after a     (in a thread, so that a signal that interrupts
server restores the default and re-raises       a flush cannot deadlock it), then the default
the signal it caught (uvicorn)                  restored and the signal raised again: the
                                                process ends by SIGTERM, as it would have
SIGTERM with a handler of the application or    that handler, untouched (never replaced,
server (gunicorn, Celery, Dramatiq, RQ, ...)    never swallowed); the process then ends one
                                                of the ways above
SIGKILL, the OOM killer                         nothing can run: the events recorded since
                                                the last flush are lost (at most one
                                                ``flush_interval``)
==============================================  ==============================================

``signal.signal`` and ``signal.getsignal`` are wrapped so that the stand-in *is* the default
for everyone else: setting ``SIG_DFL`` for SIGTERM installs it, and it reads back as
``SIG_DFL``. Handlers installed from C (uWSGI) are never touched. Nothing of this is
installed with ``handle_signals=False``, or when ``setup()`` runs outside the main thread
of the main interpreter.

A process forked after ``setup()`` (``os.register_at_fork``; uWSGI forks without it, so its
``post_fork_hook`` is chained) becomes a new instance with fresh tallies. No write may be
half done at the fork: the locks a write takes are held across it.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from functools import partial
from types import CodeType, FrameType
from typing import Any, NoReturn, Protocol, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Handle(Protocol):
    """What the lifecycle needs of a handle."""

    @property
    def shutdown_timeout(self) -> float: ...

    def _flush_in_place(self) -> bool: ...

    def shutdown(self) -> None: ...

    def _write_locks(self) -> list[Any]: ...

    def _after_fork(self) -> None: ...

    def _stop_threads(self) -> None: ...


_handles: weakref.WeakSet[Any] = weakref.WeakSet()

# -- where a signal handler may interrupt this thread ------------------------------------
# The write path takes locks a final flush needs (the recorder's, the SDK's collection);
# so does the ``logging`` module (a handler's lock, the module's: reentrant, so only a
# final flush in another thread, one that logs, waits for them); the exit path is a final
# flush under way. The main thread runs ``flush()`` itself in a thread (see
# ``CacheStatistics.flush``), so these are all it can hold.

_write_path: set[CodeType] = set()
_exit_path: set[CodeType] = set()


def write_path(function: F) -> F:
    """Mark ``function`` as part of the write path; returns it unchanged, so the hot path
    pays nothing."""
    _write_path.add(function.__code__)
    return function


def exit_path(function: F) -> F:
    """Mark ``function`` as a final flush (a signal during it waits for it to end)."""
    _exit_path.add(function.__code__)
    return function


def inside_write_path(frame: FrameType | None) -> bool:
    """True when ``frame`` (an interrupted frame, or a caller's) runs inside the write path:
    a final flush started now would wait for locks that only this thread can release."""
    return _on_stack(_write_path, frame)


def inside_logging(frame: FrameType | None) -> bool:
    """True when ``frame`` runs inside the ``logging`` module, or this thread holds one of
    its locks (see :func:`_at_exit`): a final flush started now in another thread would wait
    for this thread to release them, if it logs."""
    return _on_stack(set(), frame, logging.__file__) or any(map(_owned, _logging_locks()))


def _logging_locks() -> list[Any]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    locks = [getattr(logging, "_lock", None)]
    return locks + [h.lock for logger in loggers for h in getattr(logger, "handlers", ())]


def _owned(lock: Any) -> bool:
    """Held by this thread (an ``RLock``'s; ``threading.Condition`` relies on it too)."""
    owned = getattr(lock, "_is_owned", None)
    return owned is not None and bool(owned())


def _on_stack(codes: set[CodeType], frame: FrameType | None, module: str = "") -> bool:
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_filename == module:
            return True
        frame = frame.f_back
    return False


# -- start and end ----------------------------------------------------------------------


def start_thread(target: Callable[[], object], name: str) -> threading.Thread | None:
    """A daemon thread running ``target``, started; None when the interpreter starts no
    thread any more: Python 3.12.0 and 3.12.1 refuse in ``atexit`` handlers ("can't create
    new thread at interpreter shutdown"), and the caller then runs ``target`` itself."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        return None
    return thread


def whereabouts(thread: threading.Thread | None) -> str:
    """Where ``thread`` runs now (its innermost calls, no values): what a final flush that
    outran ``shutdown_timeout`` waited for."""
    frame = sys._current_frames().get(thread.ident or 0) if thread is not None else None
    if frame is None:
        return "not running"
    calls = traceback.extract_stack(frame, limit=3)
    return " < ".join(
        f"{'/'.join(c.filename.split(os.sep)[-2:])}:{c.lineno} {c.name}" for c in reversed(calls)
    )


def register(handle: Handle, *, handle_signals: bool, flush_interval: float | None) -> None:
    """Called by ``setup()``: the handle is flushed and deregistered however the process
    ends, and becomes a new instance in a forked child."""
    _install_once()
    _handles.add(handle)
    if handle_signals:
        _take_sigterm()
    _uwsgi_at_setup(handle, flush_interval)


def forget(handle: Handle) -> None:
    """The handle has shut down."""
    _handles.discard(handle)


@exit_path
def shutdown_all() -> None:
    """The final flush and deregistration of every open handle."""
    for handle in list(_handles):
        try:
            handle.shutdown()
        except Exception as exc:  # one handle's failure must not cost the others theirs
            log.warning("conduit-otel-cache: shutdown failed: %s: %s", type(exc).__name__, exc)
    end_if_signalled()


def end_if_signalled() -> None:
    """Called where a final flush ends: a SIGTERM that arrived during it (on this, the main
    thread) ends the process now, as its default disposition would have."""
    if _deferred is None or threading.current_thread() is not threading.main_thread():
        return
    if not _on_stack(_exit_path, sys._getframe(1).f_back):  # the outermost final flush
        _end_by(_deferred)


_real_exit = os._exit
_installed = False


def _install_once() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(_at_exit)
    os.register_at_fork(
        before=_before_fork, after_in_parent=_release_fork_locks, after_in_child=_after_fork
    )
    os._exit = _exit_after_final_flush


def _at_exit() -> None:
    """``atexit``: the final flush of every handle, after releasing the locks of ``logging``
    that this thread still holds. Its frames are gone by now, so such a lock was left held
    by an exception that a signal handler raised between its acquire and its ``try`` (the
    application's handler calling ``sys.exit``; Python runs handlers there), and the final
    flush, which logs from another thread, would wait for it until ``shutdown_timeout``."""
    for lock in _logging_locks():
        while _owned(lock):
            lock.release()
    shutdown_all()


def _exit_after_final_flush(status: int) -> NoReturn:
    """``os._exit`` (pre-fork pools and work horses end their processes with it, past
    ``atexit``): the final flush first, then the process ends with ``status``, also when a
    signal handler raised meanwhile (billiard's, at the SIGTERM its pool sends)."""
    try:
        if _handles:
            shutdown_all()
    finally:
        _real_exit(status)


# -- fork ---------------------------------------------------------------------------------

_held_at_fork: list[Any] = []


def _before_fork() -> None:
    # No write may be half done when the process forks: a child would inherit its locks
    # taken and hang at its first flush. Taken in the order an export takes them.
    for handle in list(_handles):
        for lock in handle._write_locks():
            lock.acquire()
            _held_at_fork.append(lock)


def _release_fork_locks() -> None:
    while _held_at_fork:
        _held_at_fork.pop().release()


def _after_fork() -> None:
    """In a forked child: each handle becomes a new instance."""
    global _ending, _flushed, _deferred
    _release_fork_locks()
    _ending, _flushed, _deferred = None, False, None
    for handle in list(_handles):
        handle._after_fork()


# -- SIGTERM ------------------------------------------------------------------------------

_real_signal = signal.signal
_real_getsignal = signal.getsignal
#: the final flush started by SIGTERM, and the signal
_ending: threading.Thread | None = None
_ending_signal: int = signal.SIGTERM
#: the final flush is over: done, or given up at its deadline (``_deadline``)
_flushed = False
#: a SIGTERM that arrived while this thread ran a final flush
_deferred: int | None = None
#: how long the final flush's thread waits for the main thread to end the process
_END_WAIT = 2.0


def _take_sigterm() -> None:
    """Stand in for SIGTERM's default disposition (now and whenever it is set again)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if _real_getsignal(signal.SIGTERM) == signal.SIG_DFL:
            _real_signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main interpreter
        return
    signal.signal = _signal
    signal.getsignal = _getsignal


def _signal(signalnum: Any, handler: Any) -> Any:
    """``signal.signal``: setting SIGTERM's default installs the stand-in."""
    if signalnum == signal.SIGTERM and _is_default(handler):
        handler = _on_sigterm
    previous = _real_signal(signalnum, handler)
    return signal.SIG_DFL if previous is _on_sigterm else previous


def _getsignal(signalnum: Any) -> Any:
    """``signal.getsignal``: the stand-in reads as ``SIG_DFL``."""
    handler = _real_getsignal(signalnum)
    return signal.SIG_DFL if handler is _on_sigterm else handler


def _is_default(handler: Any) -> bool:
    return isinstance(handler, int) and handler == signal.SIG_DFL


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM with the default disposition: the final flush, then the process ends by the
    signal as it would have. The main thread waits here for the flush (so the application
    makes no progress the flush would miss), unless the signal interrupted it inside the
    write path or ``logging``: it then goes on, to release the locks the flush needs, until
    the flush is done and the signal comes again; or inside a final flush already (``os._exit``,
    ``atexit``, ``shutdown()``): that one goes on and ends the process when done. A second
    signal waits for the flush. The wait is bounded by the handles' ``shutdown_timeout``s: a
    lock this thread holds that the flush takes too, of a logging library of its own, would
    hold it for ever; the thread then goes on, as from inside the write path. The process ends
    by the signal at the latest ``_END_WAIT`` later (``_deadline``), flushed or not."""
    global _ending, _ending_signal, _deferred
    if not _handles or _flushed:
        _end_by(signum)
    if _on_stack(_exit_path, frame):
        _deferred = signum
        return
    if _ending is not None:
        return
    _ending_signal = signum
    # not a daemon, unless the main thread is in ``threading._shutdown`` (the end of the
    # program or of a ``multiprocessing`` child: a pool worker that ``Pool.terminate()``
    # signals as it leaves), which may hold the lock a non-daemon thread takes to start (up to
    # Python 3.12): that thread would never start; this thread waits for it below
    daemon = _on_stack(_THREADING_SHUTDOWN, frame)
    _ending = threading.Thread(target=_final_flush, name="conduit-sigterm", daemon=daemon)
    try:
        _ending.start()
    except RuntimeError:  # in an ``atexit`` handler of Python 3.12.0 or 3.12.1 (no thread)
        _ending = None
        if not inside_write_path(frame):
            shutdown_all()
        _end_by(signum)
    bound = sum(handle.shutdown_timeout for handle in list(_handles)) + _END_WAIT
    start_thread(partial(_deadline, bound + _END_WAIT), "conduit-sigterm-deadline")
    if not inside_write_path(frame) and not inside_logging(frame):
        _ending.join(bound)
        if not _ending.is_alive():
            _end_by(signum)


_THREADING_SHUTDOWN = {f.__code__ for f in [getattr(threading, "_shutdown", None)] if f}


def _deadline(after: float) -> None:
    """The process ends by the signal ``after`` seconds after it, flushed or not: the final
    flush may wait for a lock that the main thread, going on, takes again and again (an
    unfair lock of the application's or of a logging library's) until killed."""
    global _flushed
    time.sleep(after)
    if _ending is None or not _ending.is_alive():
        return
    _flushed = True  # given up: the handler, run again, ends the process
    _signal_again()


def _final_flush() -> None:
    global _flushed
    shutdown_all()
    _flushed = True
    _signal_again()


def _signal_again() -> NoReturn:
    """The main thread ends the process as soon as it runs Python code again (it waits for
    the final flush, or runs the handler again); in case it runs none (stuck in C code), end
    as the signal would."""
    os.kill(os.getpid(), _ending_signal)
    time.sleep(_END_WAIT)
    _real_exit(128 + _ending_signal)


def _end_by(signum: int) -> NoReturn:
    """End the process by ``signum`` with its default disposition."""
    _real_signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    _real_exit(128 + signum)  # not reached: the default disposition ends the process


# -- uWSGI --------------------------------------------------------------------------------
# uWSGI loads the app in the master and forks its workers with the C ``fork()``, so no
# ``os.register_at_fork`` hook runs in them (unless ``--py-call-uwsgi-fork-hooks``), and the
# OpenTelemetry reader's thread is not restarted either: ``uwsgi.post_fork_hook`` is chained
# to the fork handling (and the ``threading`` module's own), and every worker flushes on a
# uWSGI timer (a uWSGI signal, run by each worker's own loop, with or without Python
# threads). Python's ``atexit`` runs when a uWSGI worker exits (graceful stop,
# ``max-requests``).

#: uWSGI options under which uWSGI itself runs the interpreter's fork hooks
_FORK_HOOK_OPTIONS = frozenset({"py-call-uwsgi-fork-hooks", "py-call-osafterfork"})
#: uWSGI options that start Python threads
_THREAD_OPTIONS = frozenset({"enable-threads", "threads"})


class _UwsgiHooks:
    """The uWSGI hooks of this process (installed once, in the master)."""

    def __init__(self) -> None:
        self.handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self.signal: int | None = None
        self.post_fork_installed = False


_uwsgi_hooks = _UwsgiHooks()


def _uwsgi_at_setup(handle: Handle, flush_interval: float | None) -> None:
    """Under a uWSGI master that will fork the workers without the interpreter's fork
    hooks: no thread of ours in the master, the fork handling in each worker, and a flush
    of every worker every ``flush_interval`` (at least 1 s: uWSGI timers count seconds)."""
    uwsgi: Any = sys.modules.get("uwsgi")
    if uwsgi is None or not isinstance(getattr(uwsgi, "opt", None), dict):
        return
    options = _option_names(uwsgi.opt)
    if uwsgi.worker_id() != 0:  # lazy-apps: set up in the worker itself, after the fork
        _warn_if_no_threads(uwsgi, options)
        return
    if options & _FORK_HOOK_OPTIONS:
        return
    # A worker forked while a master thread holds the GIL waits for it for ever (seen as
    # workers respawned by max-requests that never serve): the master runs none.
    handle._stop_threads()
    hooks = _uwsgi_hooks
    hooks.handles.add(handle)
    if not hooks.post_fork_installed:
        previous = getattr(uwsgi, "post_fork_hook", None)

        def post_fork() -> None:
            _threads_after_fork()
            _after_fork()
            if callable(previous):
                previous()

        uwsgi.post_fork_hook = post_fork
        hooks.post_fork_installed = True
    if flush_interval is not None and hooks.signal is None:
        hooks.signal = _uwsgi_flush_timer(uwsgi, max(1, round(flush_interval)))


def _threads_after_fork() -> None:
    """What ``os.fork()`` runs in the child for the ``threading`` module: the parent's other
    threads do not exist here, so mark them stopped (else joining one, as the OTel
    reader's shutdown does at exit, waits for ever)."""
    reinit = getattr(threading, "_after_fork", None)
    if callable(reinit):
        reinit()


def _uwsgi_flush_timer(uwsgi: Any, seconds: int) -> int | None:
    """A uWSGI signal raised every ``seconds`` in every worker, flushing the handles."""
    signum = next((n for n in range(255, -1, -1) if not uwsgi.signal_registered(n)), None)
    if signum is None:
        log.warning("conduit-otel-cache: no free uWSGI signal; workers flush only at exit")
        return None
    try:
        uwsgi.register_signal(signum, "workers", _uwsgi_flush)
        uwsgi.add_timer(signum, seconds)
    except Exception as exc:  # no master process: uWSGI signals need one
        log.warning(
            "conduit-otel-cache: cannot flush uWSGI workers on a timer (%s: %s); run uWSGI "
            "with --master, or with --py-call-uwsgi-fork-hooks or --lazy-apps",
            type(exc).__name__,
            exc,
        )
        return None
    return signum


def _uwsgi_flush(signum: int) -> None:
    for handle in list(_uwsgi_hooks.handles):
        try:
            handle._flush_in_place()  # no thread of its own: uWSGI handles signals in C
        except Exception as exc:  # never into uWSGI's loop
            log.warning("conduit-otel-cache: timed flush failed: %s: %s", type(exc).__name__, exc)


def _option_names(opt: dict[Any, Any]) -> set[str]:
    return {k.decode() if isinstance(k, bytes) else str(k) for k in opt}


def _warn_if_no_threads(uwsgi: Any, options: set[str]) -> None:
    """Older uWSGI runs no Python thread unless ``enable-threads`` (2.0.30 runs them by
    default): the flush thread of an app loaded in the worker would not run."""
    version = getattr(uwsgi, "version", b"")
    text = version.decode() if isinstance(version, bytes) else str(version)
    if options & _THREAD_OPTIONS or _version(text) >= (2, 0, 30):
        return
    log.warning(
        "conduit-otel-cache: uWSGI %s runs without --enable-threads, so statistics are "
        "flushed only at worker exit; start uWSGI with --enable-threads",
        text or "(unknown)",
    )


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)

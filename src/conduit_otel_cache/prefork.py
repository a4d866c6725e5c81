"""What pre-fork servers need beyond ``os.register_at_fork``.

- ``multiprocessing`` and Celery's pool (``billiard``) end forked workers with
  ``os._exit()``, not through ``atexit``: :func:`flush_at_worker_exit`.
- uWSGI loads the app in the master and forks its workers with the C ``fork()``, so no
  ``os.register_at_fork`` hook runs in them (unless ``--py-call-uwsgi-fork-hooks``), and
  the OpenTelemetry reader's thread is not restarted either: :func:`at_setup` chains
  ``uwsgi.post_fork_hook`` to the fork handling (and the ``threading`` module's own) and
  flushes every worker on a uWSGI timer (a uWSGI signal, run by each worker's own loop,
  with or without Python threads).
  Python's ``atexit`` runs when a uWSGI worker exits (graceful stop, ``max-requests``).
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: uWSGI options under which uWSGI itself runs the interpreter's fork hooks
_FORK_HOOK_OPTIONS = frozenset({"py-call-uwsgi-fork-hooks", "py-call-osafterfork"})
#: uWSGI options that start Python threads
_THREAD_OPTIONS = frozenset({"enable-threads", "threads"})


class Flushable(Protocol):
    """What the uWSGI timer needs of a handle."""

    def flush(self) -> bool: ...


class _UwsgiHooks:
    """The uWSGI hooks of this process (installed once, in the master)."""

    def __init__(self) -> None:
        self.handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self.signal: int | None = None
        self.post_fork_installed = False


_uwsgi_hooks = _UwsgiHooks()


class _Anchor:
    """What ``register_after_fork`` holds weakly (it lives as long as this module)."""


_anchor = _Anchor()


def flush_at_worker_exit(shutdown: Callable[[], None]) -> None:
    """In a forked worker: run ``shutdown`` when the worker exits. Pre-fork pools end their
    workers with ``os._exit()``, not through ``atexit``: ``multiprocessing`` after its exit
    finalizers (which it clears when the process starts, after the fork hooks),
    Celery's pool (``billiard``) right after the ``worker_process_shutdown`` signal, which
    it sends in the pool process."""
    for name in ("multiprocessing.util", "billiard.util"):
        util: Any = sys.modules.get(name)
        if util is None or not hasattr(util, "Finalize"):
            continue
        util.Finalize(None, shutdown, exitpriority=100)
        # a Process started by fork clears the finalizers after the fork hooks ran, then
        # runs its after-fork callbacks: register the finalizer again from there
        if hasattr(util, "register_after_fork"):
            util.register_after_fork(
                _anchor, lambda _, util=util: util.Finalize(None, shutdown, exitpriority=100)
            )
    celery_signals: Any = sys.modules.get("celery.signals")
    if celery_signals is not None and hasattr(celery_signals, "worker_process_shutdown"):

        def on_exit(*args: object, **kwargs: object) -> None:
            shutdown()

        celery_signals.worker_process_shutdown.connect(on_exit, weak=False)


def at_setup(
    handle: Flushable, flush_interval: float | None, after_fork: Callable[[], None]
) -> None:
    """Called by ``setup()``: under a uWSGI master that will fork the workers without the
    interpreter's fork hooks, run ``after_fork`` in each worker and flush ``handle`` in
    every worker every ``flush_interval`` (at least 1 s, uWSGI timers count seconds)."""
    uwsgi: Any = sys.modules.get("uwsgi")
    if uwsgi is None or not isinstance(getattr(uwsgi, "opt", None), dict):
        return
    options = _option_names(uwsgi.opt)
    if uwsgi.worker_id() != 0:  # lazy-apps: set up in the worker itself, after the fork
        _warn_if_no_threads(uwsgi, options)
        return
    if options & _FORK_HOOK_OPTIONS:
        return
    _stop_threads(handle)
    hooks = _uwsgi_hooks
    hooks.handles.add(handle)
    if not hooks.post_fork_installed:
        previous = getattr(uwsgi, "post_fork_hook", None)

        def post_fork() -> None:
            _threads_after_fork()
            after_fork()
            if callable(previous):
                previous()

        uwsgi.post_fork_hook = post_fork
        hooks.post_fork_installed = True
    if flush_interval is not None and hooks.signal is None:
        hooks.signal = _flush_timer(uwsgi, max(1, round(flush_interval)))


def _stop_threads(handle: object) -> None:
    """Stop the handle's flush and heartbeat threads in a uWSGI master that forks without
    the fork hooks: a worker forked while such a thread holds the GIL waits for it for
    ever (seen in tests as workers respawned by ``max-requests`` that never serve). The
    workers flush on the timer; a master serves nothing. (The OTel reader's thread has no
    public stop but its shutdown, which would close the exporter of the workers too.)"""
    reader = getattr(handle, "_reader", None)
    for owner, name in ((reader, "_shutdown_event"), (handle, "_stop_beats")):
        event = getattr(owner, name, None)
        if isinstance(event, threading.Event):
            event.set()
    thread = getattr(reader, "_daemon_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        thread.join(1.0)


def _threads_after_fork() -> None:
    """What ``os.fork()`` runs in the child for the ``threading`` module: the parent's other
    threads do not exist here, so mark them stopped (else joining one, as the OTel
    reader's shutdown does at exit, waits for ever)."""
    reinit = getattr(threading, "_after_fork", None)
    if callable(reinit):
        reinit()


def _flush_timer(uwsgi: Any, seconds: int) -> int | None:
    """A uWSGI signal raised every ``seconds`` in every worker, flushing the handles."""
    signum = next((n for n in range(255, -1, -1) if not uwsgi.signal_registered(n)), None)
    if signum is None:
        log.warning("conduit-otel-cache: no free uWSGI signal; workers flush only at exit")
        return None
    try:
        uwsgi.register_signal(signum, "workers", _flush_handles)
        uwsgi.add_timer(signum, seconds)
    except Exception as exc:  # no master process: uWSGI signals need one
        log.warning(
            "conduit-otel-cache: cannot flush uWSGI workers on a timer (%s: %s); run uWSGI "
            "with --master, or with --py-call-uwsgi-fork-hooks or --lazy-apps",
            type(exc).__name__, exc,
        )  # fmt: skip
        return None
    return signum


def _flush_handles(signum: int) -> None:
    for handle in list(_uwsgi_hooks.handles):
        try:
            handle.flush()
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
        "flushed only at worker exit; start uWSGI with --enable-threads", text or "(unknown)",
    )  # fmt: skip


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)

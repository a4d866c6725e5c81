"""The pipeline of a handle: its ``MeterProvider``, the write-through's OTel reader and
exporter, flushes, heartbeat, spool and recovery, and its life across fork and shutdown.
With ``enabled=false`` a :class:`NullPipeline`: no provider, no thread, no Redis."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider as APIMeterProvider
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from . import lifecycle
from .autoconfig import shared_write_through
from .background import quietly
from .config import PipelineSettings
from .instruments import SCOPE, register_cache_instruments, register_self_instruments, views
from .ratelimit import RateLimitedLog
from .recorder import Recorder
from .recovery import Recoverer
from .sdk_hook import collection_lock, reader_locks, stop_reader_thread
from .spool import Spool
from .store import explain
from .writethrough import RedisMetricExporter

log = logging.getLogger(__name__)


def _beat_until(exporter: RedisMetricExporter, every: float, stop: threading.Event) -> None:
    # a module function: the thread holds the exporter, not the pipeline
    while not stop.wait(every):
        exporter.heartbeat()


def _serve(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    # a module function: between flushes the thread holds its queue, not the pipeline
    while (job := jobs.get()) is not None:
        job()
        job = None


def _to_the_end(collect: Callable[..., None], *, promptly: bool) -> Callable[..., None]:
    """``collect`` without the SDK's timeout: a collection the SDK cuts short leaves the
    measurements it took in its aggregation, which adds them to the next collection's (an
    observable counter then reports its cumulative count twice). The timeout never stopped a
    callback that hangs (the SDK checks it between callbacks), and a flush's caller waits a
    bounded time anyway (:meth:`Pipeline.flush`).

    ``promptly``: run :func:`~.background.quietly` too; a flush of the conduit instruments
    alone (the SDK's collection and the write) is milliseconds of pure Python, during which
    the application's threads would otherwise wait up to ``sys.getswitchinterval()`` for
    the interpreter lock at each step, and full collections that its short-lived objects set
    off would stop them all."""

    @functools.wraps(collect)
    def collect_to_the_end(timeout_millis: float = math.inf, **kwargs: Any) -> None:
        if not promptly:
            return collect(timeout_millis=math.inf, **kwargs)
        with quietly():
            return collect(timeout_millis=math.inf, **kwargs)

    return collect_to_the_end


class Pipeline:
    """From the recorder's tallies to Redis: the OTel provider collects them, the
    write-through exports them every ``flush_interval`` (and on :meth:`flush`).

    Without ``settings.write_through`` (mode ``local``) only the provider: nothing is
    written. ``flushed`` is called after each flush, ``forked`` in a forked child once
    it is a new instance (with its instance id).
    """

    def __init__(
        self,
        settings: PipelineSettings,
        recorder: Recorder,
        *,
        meter_provider: MeterProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
        flushed: Callable[[], None] = lambda: None,
        forked: Callable[[str], None] = lambda instance_id: None,
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self._flushed = flushed
        self._forked = forked
        self.spool: Spool | None = None
        self.exporter: RedisMetricExporter | None = None
        self.closed = False
        self._timeout_logged = False
        self._close_started = 0.0
        self._slow = RateLimitedLog(log)  # main-thread flushes: failed, or not waited for
        self._reset_locks()
        self._reader: PeriodicExportingMetricReader | None = None
        self._reader_locks: tuple[Any, Any] = (None, None)  # held across a fork
        write = settings.write_through
        shared = (
            shared_write_through(meter_provider, write)
            if meter_provider is not None and write is not None
            else None
        )
        self._owns_exporter = shared is None
        if shared is not None:  # the conduit_redis exporter writes through already
            self._reader, self.exporter = shared
            self.exporter.samples = recorder.drain_samples
            if not hasattr(self._reader.collect, "__wrapped__"):  # not by an earlier handle
                self._reader.collect = _to_the_end(self._reader.collect, promptly=False)  # type: ignore[method-assign,misc]
        elif write is not None:
            self.exporter = RedisMetricExporter(write, samples=recorder.drain_samples)
            interval = settings.flush_interval
            self._reader = PeriodicExportingMetricReader(
                self.exporter,
                export_interval_millis=math.inf if interval is None else interval * 1000,
            )
            self._reader.collect = _to_the_end(self._reader.collect, promptly=True)  # type: ignore[method-assign,misc]
            self._reader_locks = reader_locks(self._reader)
        self.recoverer: Recoverer | None = None
        self.meter_provider: APIMeterProvider
        self.meter_provider, self._owned = self._providers(meter_provider, metric_readers, shared)
        for provider in self._owned:
            meter = provider.get_meter(SCOPE)
            if provider is self._written and self.exporter is not None:
                # the write-through's own: only what changed since its last collection (the
                # exporter keeps the rest), and its own instruments, which every collection
                # reports, so that each flush writes (the heartbeat) even with nothing new
                register_cache_instruments(meter, recorder.snapshot, changed=self.exporter.observed)
                register_self_instruments(meter, recorder, lambda: self.flush_errors)
            else:
                register_cache_instruments(meter, recorder.snapshot)
        if meter_provider is not None:
            register_cache_instruments(meter_provider.get_meter(SCOPE), recorder.snapshot)
        if meter_provider is not None or metric_readers:  # read by more than the flush
            register_self_instruments(
                self.meter_provider.get_meter(SCOPE), recorder, lambda: self.flush_errors
            )
        if self.exporter is not None and write is not None and write.spool_dir is not None:
            self.recoverer = Recoverer(write, self.exporter.store)
            self._open_spool()
        self._start_beats()
        lifecycle.register(
            self, handle_signals=settings.handle_signals, flush_interval=settings.flush_interval
        )

    @property
    def instance_id(self) -> str:
        """The instance this pipeline writes as (a forked child is a new one)."""
        return self.settings.instance_id

    @property
    def shutdown_timeout(self) -> float:
        """How long the final flush and deregistration may take."""
        return self.settings.shutdown_timeout

    @property
    def flush_errors(self) -> int:
        """Failed write-throughs so far."""
        return self.exporter.flush_errors if self.exporter is not None else 0

    def _open_spool(self) -> None:
        """This incarnation's spool (:mod:`.spool`); the recorder counts in it from now."""
        exporter = self.exporter
        write = self.settings.write_through
        assert exporter is not None and write is not None and write.spool_dir is not None
        try:
            self.spool = Spool(
                write.spool_dir, self.recorder.width, exporter.spool_identity(confirmed=False)
            )
        except OSError as exc:
            log.warning(
                "conduit-otel-cache: cannot create a spool in spool_dir %r (%s: %s); this "
                "process records without one",
                write.spool_dir,
                type(exc).__name__,
                exc,
            )
            self.spool = None
        exporter.spool = self.spool
        self.recorder.reset(self.spool)

    def _providers(
        self,
        meter_provider: MeterProvider | None,
        metric_readers: Sequence[MetricReader],
        shared: object,
    ) -> tuple[MeterProvider, list[MeterProvider]]:
        """The provider the instruments are on, and the providers this pipeline owns."""
        resource = Resource.create(
            {
                "service.name": self.settings.service_name,
                "service.instance.id": self.settings.instance_id,
            }
        )
        private: list[MetricReader] = []
        if self._reader is not None and shared is None:
            private.append(self._reader)

        def provider(readers: list[MetricReader]) -> MeterProvider:
            return MeterProvider(
                metric_readers=readers,
                resource=resource,
                views=views(),
                shutdown_on_exit=False,
            )

        # The write-through reads a provider of its own, with only the conduit.cache.*
        # instruments: an application's callback that times out cannot abort its collection
        # after the SDK took our cumulative measurements (it would add them to the next one).
        written = [provider(private)] if private else []
        self._written = written[0] if written else None
        if meter_provider is None:
            own = provider(list(metric_readers))
            if self.settings.set_global:
                metrics.set_meter_provider(own)
            return own, [own, *written]
        return meter_provider, written

    def _reset_locks(self) -> None:
        self._close_lock = threading.Lock()
        self._closing = threading.Lock()  # held while the close runs
        self._closer: threading.Thread | None = None
        self._close_done = self.closed  # a child of a parent that closed closes nothing
        self._flushes = threading.Condition()  # batches concurrent flush() calls
        self._flushing = False
        self._flush_started = -math.inf
        self._flush_result = False
        # the threads that run the main thread's flushes, started when none is idle
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._workers = 0

    def _start_beats(self) -> None:
        self._stop_beats = threading.Event()
        if self.recoverer is not None:
            spool = self.spool
            threading.Thread(
                target=self.recoverer.loop,
                args=(
                    self._stop_beats,
                    self.settings.flush_interval or 10.0,
                    lambda: (spool.path,) if spool is not None else (),
                ),
                daemon=True,
                name="conduit-spool-recovery",
            ).start()
        if self.exporter is not None and self.settings.heartbeat_interval is not None:
            threading.Thread(
                target=_beat_until,
                args=(self.exporter, self.settings.heartbeat_interval, self._stop_beats),
                daemon=True,
                name="conduit-heartbeat",
            ).start()

    # -- what the lifecycle calls -----------------------------------------------------

    def _write_locks(self) -> list[Any]:
        """The locks a write holds, in the order it takes them (held across a fork)."""
        if self.exporter is None or self.closed or not self._owns_exporter:
            return []
        export, ticker = self._reader_locks
        locks = [export, self.exporter.write_lock]
        locks += [collection_lock(provider) for provider in self._owned]  # taken alone
        locks.append(ticker)  # held alone, for an instant
        return [lock for lock in locks if lock is not None]

    def _stop_threads(self) -> None:
        """Stop the flush and heartbeat threads (a uWSGI master that forks without the fork
        hooks must run none; its workers flush on a timer)."""
        self._stop_beats.set()
        if self._reader is not None:
            stop_reader_thread(self._reader)

    def _after_fork(self) -> None:
        """In a process forked after ``setup()``: a new instance with fresh tallies, its
        own id and token, its own flush and heartbeat (the SDK restarts its reader)."""
        if self.spool is not None:
            self.spool.abandon()  # the parent's: its lock must go with the parent
            self.spool = None
        self.recorder.reset()
        self._reset_locks()
        exporter = self.exporter
        write = self.settings.write_through
        if exporter is not None and write is not None and not self.closed:
            exporter.identity.after_fork()
            instance_id = exporter.identity.instance_id
            write = dataclasses.replace(write, instance_id=instance_id)
            self.settings = dataclasses.replace(
                self.settings, instance_id=instance_id, write_through=write
            )
            exporter.after_fork(write)
            if self.recoverer is not None:
                self._open_spool()
            self._start_beats()
        self._forked(self.instance_id)

    # -- flushes ----------------------------------------------------------------------

    def flush(self) -> bool:
        """Write the recorder's tallies through to Redis now; True when it succeeded.

        Concurrent calls are batched: a call waits up to ``batch_timeout`` for a flush in
        progress, and when a flush that began after the call has finished, it carried the
        call's events, so its result is shared instead of writing again. On the main thread
        it waits at most ``batch_timeout + 4 x socket_timeout`` (False: the flush goes on in
        the background).
        """
        if threading.current_thread() is not threading.main_thread() or self.closed:
            return self._flush_in_place()
        # A signal handler may raise (SystemExit, KeyboardInterrupt) anywhere on the main
        # thread. The SDK's collection must not stop half way (a measurement taken but not
        # collected is added to the next one), nor may this thread hold the write's locks
        # when the handler shuts down: the flush runs in a worker, this thread waits for it.
        result: list[bool] = []
        # a lock, not an Event: an exception a handler raises inside ``Event.wait`` can leave
        # the event's condition unlocked ("release unlocked lock" instead of SystemExit); a
        # lock's acquire is one call that either takes it or raises
        done = threading.Lock()
        done.acquire()

        def flush() -> None:
            try:
                result.append(self._flush_in_place())
            except Exception as exc:  # the SDK's collection, not Redis: the worker lives on
                self._slow.error(
                    "conduit-otel-cache: a flush of instance %s failed (%s)",
                    self.settings.instance_id,
                    explain(exc),
                )
            finally:
                self._idle.release()  # this worker takes the next flush
                done.release()

        # The workers live as long as the handle: a finished Thread is freed by a weakref
        # callback (Python code), which may run on the main thread, and a signal handler's
        # exception (SystemExit) raised inside a callback is printed ("Exception ignored
        # in"), not raised, which would leave the process running. A new worker only when
        # none is idle (a flush blocked by an application's callback keeps its own).
        if not self._idle.acquire(blocking=False):
            worker = functools.partial(_serve, self._jobs)
            if lifecycle.start_thread(worker, "conduit-flush") is None:
                return self._flush_in_place()  # the interpreter is ending (an ``atexit``
                # handler): no signal handler can interrupt the flush any more
            self._workers += 1
        self._jobs.put(flush)
        # A flush ends within its Redis calls' timeouts; something else of the collection
        # (an observable callback of the application's on a shared provider, a finalizer the
        # collector runs in that thread) can block it for ever: the caller does not wait.
        bound = self.settings.batch_timeout + 2 * self.settings.flush_timeout
        if not done.acquire(timeout=bound):
            self._slow.error(
                "conduit-otel-cache: a flush of instance %s did not end within %.1f s "
                "(batch_timeout + 4 x socket_timeout); it goes on in the background",
                self.settings.instance_id,
                bound,
            )
            return False
        return bool(result and result[0])

    def _flush_in_place(self) -> bool:
        """:meth:`flush` on this thread (uWSGI's timer: its signals are handled in C)."""
        if self._reader is None or self.closed or self.exporter is None:
            return False
        return self._flush()

    def _flush(self) -> bool:
        assert self._reader is not None and self.exporter is not None
        requested = time.monotonic()
        wait = self.settings.batch_wait
        with self._flushes:
            deadline = requested + wait
            while self._flushing and time.monotonic() < deadline:
                self._flushes.wait(deadline - time.monotonic())
            if not self._flushing and self._flush_started >= requested:
                return self._flush_result  # a later flush already wrote these events
            self._flushing = True
            self._flush_started = time.monotonic()
        ok = False
        try:
            exports = self.exporter.exports
            self._reader.force_flush()  # collects to the end (_to_the_end)
            # no export: the SDK collected nothing (nothing recorded), so nothing to write
            ok = self.exporter.last_ok or self.exporter.exports == exports
        finally:
            with self._flushes:
                self._flushing = False
                self._flush_result = ok
                self._flushes.notify_all()
        self._flushed()
        return ok

    # -- shutdown ---------------------------------------------------------------------

    @lifecycle.exit_path
    def shutdown(self) -> None:
        """Final flush, then deregister from the heartbeat set; the whole of it bounded by
        ``shutdown_timeout``. Safe to call twice, and from a signal handler that
        interrupted a flush or ``logging`` (it then returns at once and the flush finishes
        when the interrupted code goes on: at ``sys.exit``, for example).

        The close runs in a thread of its own, so that ``shutdown_timeout`` bounds it. In
        ``atexit`` handlers of Python 3.12.0 and 3.12.1, which start no thread, it runs on
        the exiting thread instead: a hung Redis then holds the exit for its
        ``socket_timeout`` (each write gives up after it), not for ``shutdown_timeout``."""
        # a signal handler that interrupted the write path: the close waits for locks this
        # thread holds, so the interrupted code must go on first; so does a close in the
        # closer's thread that logs, for ``logging``'s
        caller = sys._getframe(1)
        interrupted = lifecycle.inside_write_path(caller)
        inline = False
        with self._close_lock:
            if self._close_done or (self.closed and not self._close_started):
                return  # done (here or in the parent before a fork), or none to wait for
            if not self.closed:
                self.closed = True
                self._close_started = time.monotonic()
                self._closing.acquire()  # released when the close is done
                self._closer = lifecycle.start_thread(self._close, "conduit-shutdown")
                if self._closer is None:
                    if interrupted:  # nothing can wait for the locks: a later call closes
                        self.closed = False
                        self._closing.release()
                        return
                    inline = True
                self._stop_beats.set()
        if inline:
            self._close()
            lifecycle.end_if_signalled()
            return
        if interrupted or lifecycle.inside_logging(caller):
            return
        self._await_close()

    def _await_close(self) -> None:
        """Wait for the close until ``shutdown_timeout`` is spent. An exception that a signal
        handler raises meanwhile is raised when the wait is over, not in it: billiard's pool
        processes (Celery) end by ``os._exit`` after telling their pool, which SIGTERMs them,
        and billiard's handler raises ``SystemExit``; it must not cut the final flush short.
        The wait is a lock's acquire, not ``Thread.join``, which such an exception leaves
        believing a live thread ended (Python 3.11)."""
        raised: BaseException | None = None
        while not self._close_done:
            budget = self._close_started + self.settings.shutdown_timeout - time.monotonic()
            try:
                if self._closing.acquire(timeout=max(0.0, budget)):
                    self._closing.release()
                break
            except BaseException as exc:  # a signal handler's
                raised = exc
        if not self._close_done and not self._timeout_logged:
            self._timeout_logged = True
            log.warning(
                "conduit-otel-cache: shutdown of instance %s took longer than "
                "shutdown_timeout=%gs; giving up (it expires after instance_timeout); "
                "it was at %s",
                self.settings.instance_id,
                self.settings.shutdown_timeout,
                lifecycle.whereabouts(self._closer),
            )
        lifecycle.end_if_signalled()
        if raised is not None:
            raise raised

    def _close(self) -> None:
        try:
            self._final_flush_and_depart()
        finally:
            self._close_done = True
            self._closing.release()

    def _final_flush_and_depart(self) -> None:
        # deregister unless the final write failed: a hung Redis costs one timeout, not three
        depart = written = False
        if self._reader is not None and self.exporter is not None:
            try:
                depart = written = self._flush()
            except Exception as exc:  # the SDK's collection, not Redis: deregister still
                log.warning(
                    "conduit-otel-cache: the final collection of instance %s failed (%s); "
                    "what its last flush wrote stands",
                    self.settings.instance_id,
                    explain(exc),
                )
                depart = self.spool is None  # else a later process writes the spool for it
        if self.exporter is not None and self._owns_exporter:
            if not depart and self.exporter.flush_count:
                log.warning(
                    "conduit-otel-cache: the final flush of instance %s failed; it leaves the "
                    "live gauges after instance_timeout=%gs",
                    self.settings.instance_id,
                    self.settings.instance_timeout,
                )
            if written and self.spool is not None:  # Redis holds all of it: nothing to
                self.spool.finish()  # recover, even if the process is killed now
            self.exporter.close(depart=depart)
            if written and self.spool is not None:  # else a later process writes it for us
                self.spool.remove()
        for provider in self._owned:  # the write-through reader is always on an owned one
            provider.shutdown()
        for _ in range(self._workers):
            self._jobs.put(None)  # the flush workers end
        lifecycle.forget(self)


class NullPipeline:
    """The pipeline of a disabled handle (``enabled=False``): no provider, no thread, no
    Redis; nothing to flush or shut down."""

    meter_provider: APIMeterProvider = NoOpMeterProvider()
    exporter = spool = recoverer = None
    closed = False
    flush_errors = 0

    def flush(self) -> bool:
        """Nothing written."""
        return False

    def shutdown(self) -> None:
        """Nothing to close."""

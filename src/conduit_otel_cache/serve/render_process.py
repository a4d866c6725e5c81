"""Rendering ``/metrics`` in a child process, so that ``serve``'s event loop never waits for it.

Collecting and encoding the cluster's series is pure Python (about 0.1 s at 1000 instances x
100 regions): in the serving process it holds the interpreter lock while scrapes are
answered. ``serve`` therefore hands each background refresh's view to a spawned child
process, at a lower CPU priority, which turns it into families with the same pure function
as in-process (:func:`~conduit_otel_cache.serve.series.families`), adds the serving
process's own process, platform and GC series (collected there, sent with the view) and
returns every format asked for, encoded and gzipped (:func:`.rendering.encode`): the
serving process keeps only the finished bytes. The child
(``python -m conduit_otel_cache.serve.render_process``, talking pickles over a socket
pair) gets no Redis URL, no ``CONDUIT_CACHE_STATS_*`` environment and reads nothing from
Redis; it ends when this process is gone. Until it is ready, and whenever it fails, the
refresh renders in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client.metrics_core import Metric

from ..aggregate import ClusterView
from ..config import ServeSettings
from .rendering import Encoder, Variant, encode
from .series import families

#: ``nice`` increment of the child: a refresh yields the CPU to the scrapes being answered
NICENESS = 10
#: seconds one rendering may take before the child is given up
TIMEOUT = 60.0
#: seconds from a child's failure to the start of its replacement
RESTART_AFTER = 60.0
_READY = "ready"


class RenderError(RuntimeError):
    """The child process failed, timed out or is gone."""


class RenderProcess:
    """A spawned child that encodes the series of a :class:`ClusterView`.

    :meth:`render` renders for
    :meth:`~conduit_otel_cache.serve.exposition.Exposition.render_elsewhere`.
    It never waits for a child to start: until one is ready it returns None, and the caller
    renders in-process. A child that fails is replaced ``restart_after`` seconds later.
    """

    def __init__(self, settings: ServeSettings, *, restart_after: float = RESTART_AFTER) -> None:
        self.restart_after = restart_after
        # the child reads no Redis and pushes nothing: it gets no URL
        self._settings = dataclasses.replace(settings, otlp_endpoint=None)
        self._lock = threading.Lock()
        #: renderings done by the child, and the child's failures
        self.renderings = 0
        self.failures = 0
        self._failed_at = -restart_after
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONDUIT_CACHE_STATS_")}
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        with contextlib.suppress(OSError):  # a lower priority from its start
            os.setpriority(os.PRIO_PROCESS, self._process.pid, NICENESS)
        self._conn = Connection(ours.detach())
        self._conn.send(self._settings)
        self._ready = False

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def render(
        self,
        view: ClusterView,
        errors_total: int,
        now: float,
        own: list[Metric],
        variants: dict[Variant, Encoder],
    ) -> dict[Variant, bytes] | None:
        """``variants`` of the families of ``view`` (``errors_total`` is the aggregator's,
        ``now`` the time of collection) followed by ``own``, rendered in the child; None
        while no child is ready. Raises :class:`RenderError` when the child fails."""
        with self._lock:
            if not self._ready and not self._started():
                return None
            try:
                # per-instance ratios are not series (instance_series holds those shown)
                view = dataclasses.replace(view, instance_hit_ratios={})
                self._conn.send((view, errors_total, now, own, variants))
                if not self._conn.poll(TIMEOUT):
                    raise RenderError(f"the render process took over {TIMEOUT:g} s")
                reply: Any = self._conn.recv()
                if isinstance(reply, str):
                    raise RenderError(f"the render process failed: {reply}")
            except (OSError, EOFError, RenderError) as exc:
                self._failed()
                if isinstance(exc, RenderError):
                    raise
                raise RenderError(f"the render process is gone: {exc!r}") from exc
        self.renderings += 1
        bodies: dict[Variant, bytes] = reply
        return bodies

    def wait_ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the child to be ready."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not (self._ready or self._started()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not self._conn.closed:
                    self._conn.poll(left)
                else:
                    restart = self._failed_at + self.restart_after - time.monotonic()
                    time.sleep(max(0.0, min(left, restart)))  # until a replacement starts
            return True

    def _started(self) -> bool:
        """Whether the child became ready (by now); starts a new one for a failed one."""
        if not self._conn.closed and self._process.poll() is not None:
            self._failed()  # the child is gone before its first rendering
        if self._failed_at + self.restart_after > time.monotonic():
            return False
        if self._conn.closed:
            self._start()
        try:
            if not self._conn.poll(0):
                return False
            self._ready = self._conn.recv() == _READY
        except (OSError, EOFError):
            self._failed()
        return self._ready

    def _failed(self) -> None:
        """Give the child up (a new one starts ``restart_after`` seconds later)."""
        self.failures += 1
        self._failed_at = time.monotonic()
        self._ready = False
        self._stop()

    def _stop(self) -> None:
        if not self._conn.closed:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        try:
            self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5.0)
        self._conn.close()

    def close(self) -> None:
        """Stop the child (it also ends by itself when this process is gone)."""
        with self._lock:
            self._stop()


def _child(conn: Connection) -> None:
    """The child process: encode every view received until the socket closes."""
    settings: ServeSettings = conn.recv()
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        view, errors_total, now, own, variants = message
        try:
            cluster = families(view, settings=settings, errors_total=errors_total, now=now)
            reply: Any = encode(cluster + own, variants)
        except Exception as exc:  # reported to the parent, which renders in-process
            reply = f"{type(exc).__name__}: {exc}"
        conn.send(reply)


if __name__ == "__main__":
    _child(Connection(int(sys.argv[1])))

"""The WSGI app of the pre-fork server tests: ``setup()`` at import, configured by the
server's environment (``CONDUIT_CACHE_STATS_*``, ``HOSTNAME``) as in a pod; every request
but ``/ready`` records ``HITS`` hits and ``MISSES`` misses in region ``Pages``; every
request answers the pid of the worker that served it. ``/die`` records as much, then the
worker SIGKILLs itself (no response)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

from conduit_otel_cache import setup

from .prefork_support import HITS, MISSES, REGION

__all__ = ["HITS", "MISSES", "REGION", "application", "stats"]

stats = setup()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/ready":
        for _ in range(HITS):
            stats.record_hit(REGION, 0.001)
        for _ in range(MISSES):
            stats.record_miss(REGION, 0.002)
    if environ.get("PATH_INFO") == "/die":
        os.kill(os.getpid(), signal.SIGKILL)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

"""What pre-fork servers need beyond ``os.register_at_fork``: a flush when a worker exits,
and a warning where a server runs no Python thread (uWSGI without ``enable-threads``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def flush_at_worker_exit(shutdown: Callable[[], None]) -> None:
    """In a forked worker: run ``shutdown`` when the worker exits. Pre-fork pools end their
    workers with ``os._exit()`` after running their own exit finalizers (``multiprocessing``
    and Celery's ``billiard``), not ``atexit``."""
    for name in ("multiprocessing.util", "billiard.util"):
        util: Any = sys.modules.get(name)
        if util is not None and hasattr(util, "Finalize"):
            util.Finalize(None, shutdown, exitpriority=100)


def warn_if_no_threads() -> None:
    """uWSGI runs no Python thread unless ``enable-threads`` is set: nothing would flush."""
    uwsgi: Any = sys.modules.get("uwsgi")
    opt = getattr(uwsgi, "opt", None)
    if not isinstance(opt, dict):
        return
    enabled = {k.decode() if isinstance(k, bytes) else k for k in opt}
    if not enabled & {"enable-threads", "lazy-apps", "threads"}:
        log.warning(
            "conduit-otel-cache: uWSGI runs without --enable-threads, so statistics are "
            "flushed only at worker exit; start uWSGI with --enable-threads"
        )

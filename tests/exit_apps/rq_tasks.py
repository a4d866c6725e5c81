"""RQ jobs: ``record`` records ``HITS`` hits and ``MISSES`` misses in ``REGION``, then pushes
its job's id to ``TRUTH``. ``setup()`` runs where this module is imported: in each work
horse (``rq worker``), or in the worker itself when it is preloaded."""

from __future__ import annotations

import os

import redis

from conduit_otel_cache import setup

from . import TRUTH, record_events

stats = setup()
_truth = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])


def record() -> int:
    record_events(stats)
    _truth.rpush(TRUTH, os.getpid())
    return os.getpid()

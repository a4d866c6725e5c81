"""RQ jobs: ``record`` records ``HITS`` hits and ``MISSES`` misses in ``REGION``, then pushes
its job's id to ``TRUTH``. ``setup()`` runs where this module is imported: in each work
horse (``rq worker``), or in the worker itself when it is preloaded."""

from __future__ import annotations

import os

import redis

from conduit_otel_cache import setup

from ..prefork_support import HITS, MISSES, REGION
from . import TRUTH

stats = setup()
_truth = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])


def record() -> int:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    _truth.rpush(TRUTH, os.getpid())
    return os.getpid()

"""Dramatiq actor ``record`` on a Redis broker (``CONDUIT_CACHE_STATS_REDIS_URL``)."""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from conduit_otel_cache import setup

from ..prefork_support import HITS, MISSES, REGION
from . import TRUTH

dramatiq.set_broker(RedisBroker(url=os.environ["CONDUIT_CACHE_STATS_REDIS_URL"]))
stats = setup()
_truth = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])


@dramatiq.actor(max_retries=0)
def record() -> None:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    _truth.rpush(TRUTH, os.getpid())

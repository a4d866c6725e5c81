"""Celery task ``exit.record`` on a Redis broker (``CONDUIT_CACHE_STATS_REDIS_URL``)."""

from __future__ import annotations

import os

import redis
from celery import Celery

from conduit_otel_cache import setup

from ..prefork_support import HITS, MISSES, REGION
from . import TRUTH

app = Celery("exit_tasks", broker=os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])
app.conf.worker_prefetch_multiplier = 1
stats = setup()
_truth = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])


@app.task(name="exit.record")
def record() -> None:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    _truth.rpush(TRUTH, os.getpid())

"""Celery task ``exit.record`` on a Redis broker (``CONDUIT_CACHE_STATS_REDIS_URL``)."""

from __future__ import annotations

import os

import redis
from celery import Celery

from conduit_otel_cache import setup

from . import TRUTH, record_events

app = Celery("exit_tasks", broker=os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])
app.conf.worker_prefetch_multiplier = 1
stats = setup()
_truth = redis.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])


@app.task(name="exit.record")
def record() -> None:
    record_events(stats)
    _truth.rpush(TRUTH, os.getpid())

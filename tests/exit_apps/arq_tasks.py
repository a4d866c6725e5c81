"""arq worker settings with one function, ``record``, on the Redis of
``CONDUIT_CACHE_STATS_REDIS_URL``."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq.connections import RedisSettings

from conduit_otel_cache import setup

from ..prefork_support import HITS, MISSES, REGION
from . import TRUTH

stats = setup()


async def record(ctx: dict[str, Any]) -> None:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    await ctx["redis"].rpush(TRUTH, os.getpid())


class WorkerSettings:
    functions: ClassVar[list[Any]] = [record]
    redis_settings = RedisSettings.from_dsn(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])

"""arq worker settings with one function, ``record``, on the Redis of
``CONDUIT_CACHE_STATS_REDIS_URL``."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from arq.connections import RedisSettings

from conduit_otel_cache import setup

from . import TRUTH, record_events

stats = setup()


async def record(ctx: dict[str, Any]) -> None:
    record_events(stats)
    await ctx["redis"].rpush(TRUTH, os.getpid())


class WorkerSettings:
    functions: ClassVar[list[Any]] = [record]
    redis_settings = RedisSettings.from_dsn(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"])

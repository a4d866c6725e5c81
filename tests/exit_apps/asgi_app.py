"""A FastAPI app as a new user writes it from README.md: ``setup()`` at import, default
settings from the environment. ``GET /`` records ``HITS`` hits and ``MISSES`` misses in
``REGION``; ``GET /item/{key}`` looks ``key`` up through the documented ``AsyncRedisCache``
(region ``Items``), stores it on a miss and answers whether it was a hit."""

from __future__ import annotations

import os

import redis.asyncio
from fastapi import FastAPI

from conduit_otel_cache import setup
from conduit_otel_cache.integrations import AsyncRedisCache

from ..prefork_support import HITS, MISSES, REGION

stats = setup()
app = FastAPI()
cache = AsyncRedisCache(
    redis.asyncio.Redis.from_url(os.environ["CONDUIT_CACHE_STATS_REDIS_URL"]), stats, "Items"
)


@app.get("/ready")
def ready() -> int:
    return os.getpid()


@app.get("/")
def record() -> int:
    for _ in range(HITS):
        stats.record_hit(REGION, 0.001)
    for _ in range(MISSES):
        stats.record_miss(REGION, 0.002)
    return os.getpid()


@app.get("/item/{key}")
async def item(key: str) -> dict[str, bool]:
    hit = await cache.get(f"exit-test:item:{key}") is not None
    stored = False if hit else await cache.set(f"exit-test:item:{key}", b"v")
    return {"hit": hit, "stored": stored}

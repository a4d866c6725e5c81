"""The docs hold: every ``redis-cli`` command in a ```bash block of docs/operations.md,
docs/runbook.md and README.md runs against a real Redis written by real instances and prints
what it should; the configuration table names every option; the key schema matches the keys
written."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conduit_otel_cache import CacheStatistics, Settings, setup
from conduit_otel_cache.embedded import RedisServer, redis_server_binary
from conduit_otel_cache.store import Store

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
INSTANCES = ("api-1", "api-2")
REGIONS = ("ProviderResponses", "Sessions")
PLACEHOLDERS = {"<instance>": INSTANCES[0], "<region>": REGIONS[0]}

FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)


def blocks(path: Path, lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``path`` in language ``lang``."""
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def redis_cli_lines(path: Path, lang: str = "bash") -> list[str]:
    """Every ``redis-cli`` command line in the ``lang`` blocks of ``path``."""
    return [
        line.strip()
        for body in blocks(path, lang)
        for line in body.splitlines()
        if line.strip().startswith("redis-cli ")
    ]


def redis_cli() -> str:
    return shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))


COMMANDS = [
    (path.name, line) for path in (OPERATIONS, README, RUNBOOK) for line in redis_cli_lines(path)
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisServer]:
    """A real Redis with two instances that flushed two regions each (default key prefix),
    and the continuity record of a region, as a `serve` replica shares what a data loss took
    (here 4 hits)."""
    with RedisServer() as server:
        handles: list[CacheStatistics] = []
        for n, instance_id in enumerate(INSTANCES, start=1):
            stats = setup(redis_url=server.url, instance_id=instance_id, set_global=False,
                          flush_interval=None, aggregation_cache_ttl=0)  # fmt: skip
            handles.append(stats)
            for region in REGIONS:
                for _ in range(n):
                    stats.record_hit(region, 0.001)
                stats.record_miss(region, 0.004)
                stats.record_set(region)
                stats.set_size_bytes(region, 1024 * n)
            assert stats.flush()
        client = redis.Redis(port=server.port, decode_responses=True)
        store = Store(client)
        epoch = client.hget(store.keys.aggregate(REGIONS[0]), "epoch") or ""
        store.share_continuity(REGIONS[0], "", {"epoch": epoch, "hit_count": "4"})
        client.close()
        yield server
        for stats in handles:
            stats.shutdown()


def _integer(text: str) -> int:
    return int(text.strip().splitlines()[0])


def check_output(name: str, args: list[str], out: str) -> None:
    """What each documented command must print (``out``: stdout, then stderr)."""
    lines = out.splitlines()
    if name == "ZRANGE":
        assert lines[::2] == list(INSTANCES) and all(float(s) > 1e9 for s in lines[1::2]), out
    elif name == "TIME":
        assert _integer(out) > 1e9, out
    elif name == "HGETALL":
        fields = dict(zip(lines[::2], lines[1::2]))
        if args[1].endswith(":continuity"):
            assert fields["hit_count"] == "4" and fields["epoch"], fields
        elif args[1].startswith("conduit:cache:stats:aggregated:"):
            assert fields["hit_count"] == "3" and fields["instance_count"] == "2", fields
        elif args[1].startswith("conduit:cache:stats:"):
            assert fields["hit_count"] == "1" and fields["miss_count"] == "1", fields
            assert fields["live"] == "1" and "last_updated" in fields, fields
        else:
            assert fields["live"] == "1" and "token" in fields, fields
    elif name == "SMEMBERS":
        assert sorted(lines) == sorted(REGIONS), out
    elif name in ("ZCARD", "SCARD"):
        assert _integer(out) == len(INSTANCES if name == "ZCARD" else REGIONS), out
    elif name == "DBSIZE":
        assert _integer(out) >= 8, out
    elif name == "TTL":
        assert 0 < _integer(out) <= Settings.statistics_ttl, out
    elif name == "INFO":
        wanted = "evicted_keys:" if args[1:] == ["stats"] else "used_memory:"
        assert wanted in out, out
    elif name == "CONFIG":
        assert lines[0] == args[2] and lines[1] in ("noeviction", "volatile-lru", "allkeys-lru",
                                                   "volatile-lfu", "allkeys-lfu",
                                                   "volatile-random", "allkeys-random",
                                                   "volatile-ttl"), out  # fmt: skip
    elif name == "--bigkeys":
        assert re.search(r"Biggest +hash found '\"conduit:cache:stats:", out), out
        assert "Sampled" in out, out
    elif name == "--scan":
        keys = set(lines)
        assert all(k.startswith("conduit:cache:stats:") for k in keys), keys
        assert {f"conduit:cache:stats:{i}:{r}" for i in INSTANCES for r in REGIONS} <= keys
        assert {f"conduit:cache:stats:aggregated:{r}" for r in REGIONS} <= keys
    elif name == "--rdb":
        assert "Transfer finished with success" in out, out
    else:
        pytest.fail(f"no check for redis-cli {name}: add one to check_output()")


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_redis_cli_command_runs(
    doc: str, command: str, cluster: RedisServer, tmp_path: Path
) -> None:
    text = command
    for placeholder, real in PLACEHOLDERS.items():
        text = text.replace(placeholder, real)
    assert "<" not in text, f"unknown placeholder in {command!r}"
    args = shlex.split(text, comments=True)[1:]
    argv = [redis_cli(), "-h", "127.0.0.1", "-p", str(cluster.port), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.strip() and "ERR" not in out and "(error)" not in out, out
    name = args[0] if args[0].startswith("--") else args[0].upper()
    check_output(name, args, out)
    if name == "--rdb":
        assert (tmp_path / args[1]).stat().st_size > 0


def test_the_runnable_blocks_hold_the_design_documents_recipes() -> None:
    ops = redis_cli_lines(OPERATIONS)
    for expected in (
        "redis-cli ZRANGE conduit:cache:instances 0 -1 WITHSCORES",
        "redis-cli HGETALL conduit:cache:stats:<instance>:<region>",
        "redis-cli HGETALL conduit:cache:stats:aggregated:<region>",
        "redis-cli ZCARD conduit:cache:instances",
        "redis-cli DBSIZE",
        "redis-cli --bigkeys",
        "redis-cli --scan --pattern 'conduit:cache:stats:*'",
        "redis-cli --rdb backup-stats.rdb",
    ):
        assert expected in ops, expected
    assert any(line.startswith("redis-cli TTL ") for line in ops)
    assert len(redis_cli_lines(README)) >= 3


def test_never_ending_and_unverified_commands_are_only_in_skipped_text_blocks() -> None:
    runnable = " ".join(line for _, line in COMMANDS)
    assert "--latency" not in runnable and "ACL" not in runnable
    text = redis_cli_lines(OPERATIONS, "text")
    assert "redis-cli --latency" in text
    acl = [line for body in blocks(OPERATIONS, "text") for line in body.splitlines()
           if line.startswith("ACL SETUSER")]  # fmt: skip
    assert acl == [
        "ACL SETUSER conduit on >PASSWORD ~conduit:* +@read +@write +@scripting +ping +info +time"
    ]
    section = OPERATIONS.read_text().split("### Least privilege", 1)[1].split("\n## ", 1)[0]
    assert "being verified" in section


def test_configuration_table_names_every_option() -> None:
    section = OPERATIONS.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\|([^|]+)\|", section, re.M))
    names = {name for cell in documented for name in re.findall(r"`([a-z_]+)`", cell)}
    assert {f.name for f in dataclasses.fields(Settings)} <= names


def test_key_schema_matches_the_keys_written(cluster: RedisServer) -> None:
    section = OPERATIONS.read_text().split("## Key schema", 1)[1].split("\n## ", 1)[0]
    patterns = [line.split()[0] for line in blocks_in(section) if line.startswith("conduit:")]
    assert len(patterns) >= 6
    regexes = {
        p: re.compile(re.escape(p).replace("<instance>", "[^:]+").replace("<region>", "[^:]+"))
        for p in patterns
    }
    client = redis.Redis(port=cluster.port, decode_responses=True)
    keys = set(client.scan_iter("conduit:*"))
    client.close()
    undocumented = {k for k in keys if not any(rx.fullmatch(k) for rx in regexes.values())}
    assert not undocumented, undocumented
    unused = [p for p, rx in regexes.items() if not any(rx.fullmatch(k) for k in keys)]
    assert not unused, unused


def blocks_in(section: str) -> list[str]:
    return [line for _, body in FENCE.findall(section) for line in body.splitlines()]


def test_noeviction_advice_a_flush_refused_for_memory_loses_nothing(
    redis_url: str, r: redis.Redis
) -> None:
    stats = setup(redis_url=redis_url, instance_id="api-1", set_global=False,
                  flush_interval=None, aggregation_cache_ttl=0)  # fmt: skip
    try:
        stats.record_hit("R")
        assert stats.flush()
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)  # every write is refused: out of memory
        stats.record_hit("R")
        assert stats.flush() is False and stats.flush_errors == 1
        health = stats.health()  # failing flushes show at once, not when heartbeats expire
        assert health.status.label == "Degraded", health.reasons
        assert any("the last flush failed (OutOfMemoryError" in x for x in health.reasons)
        r.config_set("maxmemory", 0)
        stats.record_hit("R")
        assert stats.flush()
        assert stats.health().status.label == "Healthy"
        assert r.hget("conduit:cache:stats:aggregated:R", "hit_count") == "3"  # exact
    finally:
        stats.shutdown()


def test_links_to_the_operators_guide_resolve() -> None:
    anchors = {
        re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)
    }
    links = re.findall(r"\]\(docs/operations\.md(?:#([\w-]+))?\)", README.read_text())
    links += re.findall(r"\]\(#([\w-]+)\)", OPERATIONS.read_text())
    assert len(links) >= 3
    assert all(anchor in anchors for anchor in links if anchor), (links, anchors)


RUNNABLE = re.compile(r"^<!-- runnable -->\n```(?:bash|sh)\n(.*?)^```", re.M | re.S)
DOCUMENTED_URL = "redis://localhost:6379/1"


def runnable_blocks() -> list[tuple[str, str]]:
    """``(where, body)`` of every shell block marked ``<!-- runnable -->`` in README.md and
    docs/: the test below runs each one."""
    found = []
    for path in (README, *sorted((ROOT / "docs").glob("*.md"))):
        text = path.read_text()
        for match in RUNNABLE.finditer(text):
            line = text[: match.start()].count("\n") + 2
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


@pytest.fixture
def live_cluster() -> Iterator[RedisServer]:
    """A real Redis with two live instances that flushed two regions each."""
    with RedisServer() as server:
        handles = [
            setup(redis_url=server.url, instance_id=i, set_global=False, flush_interval=None)
            for i in INSTANCES
        ]
        for stats in handles:
            for region in REGIONS:
                stats.record_hit(region, 0.001)
                stats.record_miss(region, 0.002)
            assert stats.flush()
        client = redis.Redis(port=server.port, decode_responses=True)
        store = Store(client)
        epoch = client.hget(store.keys.aggregate(REGIONS[0]), "epoch") or ""
        store.share_continuity(REGIONS[0], "", {"epoch": epoch, "hit_count": "4"})
        client.close()
        yield server
        for stats in handles:
            stats.shutdown()


RUNNABLE_BLOCKS = runnable_blocks()


@pytest.mark.parametrize(("where", "body"), RUNNABLE_BLOCKS, ids=[w for w, _ in RUNNABLE_BLOCKS])
def test_runnable_block_runs(
    where: str, body: str, live_cluster: RedisServer, tmp_path: Path
) -> None:
    """The block runs as a user would paste it (``bash -e``), against a real Redis with
    live instances: the documented URL and ``redis-cli`` point at it, ``<region>`` is a real
    region, and ``CONDUIT_CACHE_STATS_REDIS_URL`` is set as the docs tell operators to."""
    script = body.replace(DOCUMENTED_URL, live_cluster.url)
    script = script.replace("redis-cli ", f"{redis_cli()} -p {live_cluster.port} ")
    for placeholder, real in PLACEHOLDERS.items():
        script = script.replace(placeholder, real)
    assert "<" not in script, f"{where}: unknown placeholder"
    env = dict(os.environ, CONDUIT_CACHE_STATS_REDIS_URL=live_cluster.url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    assert done.stdout.strip() and "error" not in done.stderr.lower(), done.stdout + done.stderr
    if "conduit-otel-cache stats" in script:
        assert REGIONS[0] in done.stdout


def test_the_runnable_marker_is_found() -> None:
    """The marker is spelled as the test reads it: the README's CLI block and the runbook's
    commands are among the runnable blocks."""
    places = {where.split(":")[0] for where, _ in runnable_blocks()}
    assert {"README.md", "docs/runbook.md"} <= places


def test_readme_quotes_the_saved_benchmark_results() -> None:
    """README's figures have one source: the table between the markers is what
    ``benchmarks/results.py`` renders from ``benchmarks/results.json`` (``make bench``)."""
    from benchmarks import results

    assert results.readme_block(README.read_text()) == results.render(results.load())


def test_a_run_replaces_its_benchmarks_targets_and_drops_retired_ones(tmp_path: Path) -> None:
    """``--only`` keeps the other benchmarks' targets; a target saved without a benchmark
    (retired since) and a run no target comes from any more are dropped."""
    from benchmarks import results
    from benchmarks.common import Target

    path = tmp_path / "results.json"
    path.write_text(
        '{"runs": [{"machine": "m0", "command": "c0"}], "targets": '
        '[{"name": "retired", "met": false, "detail": "x", "run": 0}]}'
    )
    results.save({"hot": [Target("a", True, "1")], "flush": [Target("b", None, "2")]}, "m1", "c1",
                 path, order=["hot", "flush"])  # fmt: skip
    results.save({"flush": [Target("b", False, "3")]}, "m2", "c2", path, order=["hot", "flush"])
    data = results.load(path)
    assert [(t["name"], t["detail"], t["run"]) for t in data["targets"]] == [
        ("a", "1", 0),
        ("b", "3", 1),
    ]
    assert [r["machine"] for r in data["runs"]] == ["m1", "m2"]


def test_the_readme_module_table_names_every_module() -> None:
    """README's module table names every module of the package (``integrations/`` and
    ``lua/`` as folders) and nothing that is not there."""
    package = ROOT / "src" / "conduit_otel_cache"
    text = README.read_text()
    table = text[text.index("| module | job |") :].split("\n\n", 1)[0]
    first_cells = [row.split(" | ")[0] for row in table.splitlines()[2:]]
    named = {n for cell in first_cells for n in re.findall(r"`([\w/]+(?:\.py|/))`", cell)}
    folders = {"integrations/", "lua/"}
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    present = {m for m in modules if not m.startswith(tuple(folders)) and m != "serve/__init__.py"}
    assert named - folders == present
    assert folders <= named

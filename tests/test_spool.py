"""The spool: a SIGKILLed process loses nothing; any process with the same spool_dir writes
a dead incarnation's values once, under its own token; spools stay bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from conduit_otel_cache import ConfigError, setup
from conduit_otel_cache.config import DEFAULT_BUCKETS, Settings
from conduit_otel_cache.recorder import Recorder
from conduit_otel_cache.recovery import Recoverer
from conduit_otel_cache.spool import Spool, claim_dead
from conduit_otel_cache.store import Store

from .conftest import MakeStats, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROCESS = Path(__file__).with_name("spool_process.py")


def start(redis_url: str, spool_dir: Path, region: str, hits: int, *extra: str) -> Any:
    """A process that records ``hits`` hits and misses and flushes, then ``hits`` hits and
    sets more that it does not flush; returns it when it has recorded them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(PROCESS), redis_url, str(spool_dir), region, str(hits), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def spools(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_sigkilled_process_loses_nothing(
    make_stats: MakeStats, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    dead = start(redis_url, tmp_path, "R", 500)
    kill(dead)
    assert len(spools(tmp_path)) == 1  # its spool outlived it
    survivor = make_stats("survivor", spool_dir=str(tmp_path))
    wait_for(lambda: len(spools(tmp_path)) == 1, what="the dead process's spool recovered")
    totals = survivor.cluster_totals("R")
    assert totals.hit_count == 1000  # 500 flushed, 500 not: none lost
    assert (totals.set_count, totals.instance_count) == (500, 0)  # it left the live gauges
    assert totals.response_times.counts[5] == 500  # 0.02 s: its unflushed response times
    assert survivor.cluster_totals("other").miss_count == 500
    assert spools(tmp_path) == [os.path.basename(survivor.spool.path)]  # type: ignore[union-attr]
    assert r.zcard("conduit:cache:instances") == 0  # the dead one deregistered
    assert survivor.health().data["SpoolsRecovered"] == 1


def test_a_clean_exit_removes_its_spool_and_writes_once(
    make_stats: MakeStats, redis_url: str, tmp_path: Path
) -> None:
    start(redis_url, tmp_path, "R", 300, "exit").wait()
    assert spools(tmp_path) == []
    reader = make_stats("reader")
    assert reader.cluster_totals("R").hit_count == 600


def test_concurrent_recoverers_write_each_dead_incarnation_once(
    redis_url: str, tmp_path: Path
) -> None:
    procs = [start(redis_url, tmp_path, "R", 100 + n) for n in range(4)]
    for proc in procs:  # all alive until now: none recovered another
        kill(proc)
    settings = Settings.load(redis_url=redis_url, spool_dir=str(tmp_path))
    stores = [Store.from_settings(settings.connection) for _ in range(3)]
    recoverers = [Recoverer(settings.write_through, store) for store in stores]
    threads = [threading.Thread(target=rec.run) for rec in recoverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(rec.total.written for rec in recoverers) == 4
    assert spools(tmp_path) == []
    stats = setup(redis_url=redis_url, set_global=False, flush_interval=None,
                  aggregation_cache_ttl=0, instance_id="reader")  # fmt: skip
    try:
        assert stats.cluster_totals("R").hit_count == 2 * (100 + 101 + 102 + 103)
    finally:
        stats.shutdown()
        for store in stores:
            store.close()


def test_spools_stay_bounded_under_churn(
    make_stats: MakeStats, redis_url: str, tmp_path: Path
) -> None:
    """Processes come and go (killed, or ending cleanly); the directory holds at most the
    spools of the live ones and of those killed since the last recovery."""
    survivor = make_stats("survivor", spool_dir=str(tmp_path), flush_interval=0.2)
    expected = 0
    for n in range(8):
        proc = start(redis_url, tmp_path, "R", 50, *(["exit"] if n % 2 else []))
        if n % 2:
            proc.wait()
        else:
            kill(proc)
        expected += 100
        assert len(spools(tmp_path)) <= 2
    wait_for(lambda: len(spools(tmp_path)) == 1, what="every dead spool recovered")
    assert survivor.cluster_totals("R").hit_count == expected


def test_the_hot_path_counts_exactly_in_the_spool_across_threads(tmp_path: Path) -> None:
    rec = Recorder(DEFAULT_BUCKETS, max_samples=10)
    spool = Spool(str(tmp_path), rec.width, {"token": "t", "bounds": list(DEFAULT_BUCKETS)})
    rec.reset(spool)

    def work(n: int) -> None:
        for i in range(20_000):
            rec.record_hit("a", 0.001 * (i % 3))
            rec.record_miss(f"r{n % 2}")

    for _ in range(3):  # finished threads' records are handed on at the next collection
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = rec.snapshot()
    assert snap["a"].hit_count == 240_000 and snap["a"].response_times.count == 240_000
    assert snap["r0"].miss_count + snap["r1"].miss_count == 240_000
    assert spool.records <= 3 * 4  # at most one record per region and live thread
    assert len(rec.drain_samples()["a"]) == 10
    spool.abandon()  # as if the process died: what the file holds is the snapshot
    ((claim, why),) = list(claim_dead(str(tmp_path)))
    assert not why and claim.spool.totals["a"][0] == 240_000
    claim.release()


def test_a_forked_child_spools_apart_and_lets_the_parents_spool_go(
    make_stats: MakeStats, tmp_path: Path
) -> None:
    stats = make_stats("parent", spool_dir=str(tmp_path))
    stats.record_hit("R")
    parent_spool = stats.spool
    assert parent_spool is not None
    to_parent, from_child = os.pipe()
    to_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own spool; the parent's is not locked by it
        try:
            stats.record_hit("R")
            ok = stats.spool is not None and stats.spool.path != parent_spool.path
            os.write(from_child, b"1" if ok and len(os.listdir(tmp_path)) == 2 else b"0")
            os.read(to_child, 1)  # until the parent has looked
        finally:
            os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"1"
        # the parent holds its lock and the child its own: neither is taken for dead
        assert [c for c, _ in claim_dead(str(tmp_path))] == []
    finally:
        os.write(from_parent, b"x")
        os.waitpid(pid, 0)
        for fd in (to_parent, from_child, to_child, from_parent):
            os.close(fd)
    assert stats.snapshot()["R"].hit_count == 1


def test_spool_dir_must_be_a_writable_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spool_dir"):
        Settings.load(spool_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="spool_dir"):
        Settings.load(environ={"CONDUIT_CACHE_STATS_SPOOL_DIR": str(PROCESS)})


def test_serve_as_a_sidecar_recovers_dead_spools(
    make_stats: MakeStats, redis_url: str, tmp_path: Path
) -> None:
    from conduit_otel_cache.serve.service import ExporterService

    kill(start(redis_url, tmp_path, "R", 200))
    service = ExporterService(
        Settings.load(redis_url=redis_url, spool_dir=str(tmp_path)), port=0
    ).start()
    try:
        wait_for(lambda: spools(tmp_path) == [], what="serve recovered the spool")
    finally:
        service.stop()
    assert make_stats("reader").cluster_totals("R").hit_count == 400


def test_a_child_forked_during_a_recovery_does_not_keep_the_dead_spool_locked(
    tmp_path: Path,
) -> None:
    Spool(str(tmp_path), 6, {"token": "dead", "bounds": []}).abandon()  # its owner died
    ((claim, _),) = list(claim_dead(str(tmp_path)))
    # told dead by its lock, not its pid: that pid is alive (reused, in effect)
    assert claim.spool.identity["pid"] == os.getpid() and claim.spool.identity["start_time"]
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child forked while the parent recovers: it must not hold the lock
        try:
            os.write(from_child, b"r")  # running (past the fork hooks)
            os.read(to_child, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"r"
        claim.release()  # the recovery failed: left for a later attempt, by anyone
        ((again, _),) = list(claim_dead(str(tmp_path)))  # not locked by the live child
        again.release()
    finally:
        os.write(from_parent, b"x")
        os.waitpid(pid, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)


def test_a_spool_redis_no_longer_knows_is_dropped_and_shown_in_health(
    make_stats: MakeStats, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """Another incarnation took the dead one's id over: its values cannot be written
    exactly. Nothing is counted twice; the spool goes, and health says so."""
    kill(start(redis_url, tmp_path, "R", 100))
    (meta,) = r.keys("conduit:cache:instance:*[0-9]")
    r.hset(meta, "token", "another-incarnation")
    survivor = make_stats("survivor", spool_dir=str(tmp_path))
    wait_for(lambda: len(spools(tmp_path)) == 1, what="the dead spool dropped")
    assert survivor.cluster_totals("R").hit_count == 100  # what it had flushed, once
    health = survivor.health()
    assert any("could not be written exactly" in reason for reason in health.reasons), health
    assert health.data["SpoolsRecovered"] == 0


def test_a_spool_whose_final_flush_was_written_is_only_removed(
    redis_url: str, tmp_path: Path
) -> None:
    """Killed after its final flush, before it removed its spool: nothing to write, no
    warning, nothing counted twice."""
    rec = Recorder(DEFAULT_BUCKETS)
    spool = Spool(str(tmp_path), rec.width, {"token": "t", "instance_id": "x", "owner": "o",
                                             "confirmed": True, "bounds": []})  # fmt: skip
    rec.reset(spool)
    rec.record_hit("R")
    spool.finish()
    spool.abandon()
    settings = Settings.load(redis_url=redis_url, spool_dir=str(tmp_path))
    store = Store.from_settings(settings.connection)
    try:
        done = Recoverer(settings.write_through, store).run()
    finally:
        store.close()
    assert (done.written, done.dropped, done.failed) == (0, 0, 0)
    assert spools(tmp_path) == []

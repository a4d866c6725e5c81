"""One model-based test of the write protocol through the public API: instances start,
record in random regions (some regions only ever get a size), flush (also from many
threads at once), fork, stop, crash, restart under the same id; Redis restarts empty, loses
any key of the schema (deleted, evicted, expired); cleanup and reaping run at any time
(as after a partition or a suspension longer than ``retention_period``) and the instances
come back; a second handle writes under a live instance's id; a write's reply is lost
(through a real TCP proxy: Redis applied it, the writer timed out). After every step the
cluster counters and instance counts in Redis equal a simple model, and so do the live
gauges, or (where Redis lost a crashed instance's own record of them) the region's totals
report the loss; a loss the model predicts cannot be rebuilt is reported too (health
reads it)."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conduit_otel_cache import CacheStatistics, setup
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.store import Store
from conduit_otel_cache.writethrough import CHECK_EVERY

from .tcp_proxy import TcpProxy

IDS = st.sampled_from(["a", "b"])
REGIONS = st.sampled_from(["R1", "R2"])
SIZED = "Warm"  # a region that only ever gets a size


class Incarnation:
    """What the model knows of one process's life under one id."""

    def __init__(self, handle: CacheStatistics) -> None:
        self.handle = handle
        self.recorded: Counter[str] = Counter()
        self.written: Counter[str] = Counter()  # hits Redis holds of this incarnation
        self.regions_written: set[str] = set()  # regions it holds live (gauges)
        self.size: dict[str, int] = {}
        self.size_written: dict[str, int] = {}
        self.lost_own = False  # Redis lost one of its own keys while it was crashed

    def flushed(self) -> None:
        self.written = Counter(self.recorded)
        self.regions_written = set(self.recorded) | set(self.size)
        self.size_written = dict(self.size)


def actual_id(inc: Incarnation) -> str:
    """The id the incarnation writes as now (it moves aside from a duplicate)."""
    assert inc.handle.exporter is not None
    return inc.handle.exporter.identity.instance_id


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture(scope="module")
def proxy(server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", server.port)) as p:
        yield p


class Cluster(RuleBasedStateMachine):
    url = ""  # Redis itself (the model's reads)
    proxy: TcpProxy  # the instances' way to it

    def __init__(self) -> None:
        super().__init__()
        self.r = redis.Redis.from_url(self.url, decode_responses=True)
        self.r.flushall()
        self.store = Store(self.r)
        self.live: dict[str, Incarnation] = {}
        self.crashed: dict[str, Incarnation] = {}  # not departed, not yet replaced
        self.ended: list[Incarnation] = []  # stopped or crashed: their counters stay
        self.opened: list[CacheStatistics] = []
        self.extra: list[Incarnation] = []  # second writers under a live instance's id
        self.must_report: set[str] = set()  # regions whose totals lost what cannot come back
        self.unlisted: set[str] = set()  # crashed ids the heartbeat set lost
        # regions whose live gauges may keep a crashed instance's, once Redis lost its
        # stats hash there: exact, or the loss reported, until no live instance is left
        self.ghosts: set[str] = set()
        for instance_id in ("a", "b"):
            self.start(instance_id)

    def _handle(self, instance_id: str) -> CacheStatistics:
        handle = setup(
            redis_url=self.proxy.url(), instance_id=instance_id, set_global=False,
            flush_interval=None, aggregation_cache_ttl=0, batch_timeout=0.001,
            socket_timeout=0.5,
        )  # fmt: skip
        assert isinstance(handle, CacheStatistics)
        self.opened.append(handle)
        return handle

    @rule(instance_id=IDS)
    def start(self, instance_id: str) -> None:
        if instance_id not in self.live:  # a crashed id restarts in place (same host:pid)
            self.live[instance_id] = Incarnation(self._handle(instance_id))

    @rule(instance_id=IDS, region=REGIONS, hits=st.integers(1, 5), then_flush=st.booleans())
    def record(self, instance_id: str, region: str, hits: int, then_flush: bool) -> None:
        if instance_id in self.live:
            inc = self.live[instance_id]
            for _ in range(hits):
                inc.handle.record_hit(region, 0.001)
            inc.recorded[region] += hits
            if then_flush:
                self.flush(instance_id)

    @rule(instance_id=IDS, size=st.integers(0, 1000))
    def set_size(self, instance_id: str, size: int) -> None:
        if instance_id in self.live:
            inc = self.live[instance_id]
            inc.handle.set_size_bytes(SIZED, size)
            inc.size[SIZED] = size

    def _flushed(self, instance_id: str) -> None:
        inc = self.live[instance_id]
        if inc.recorded or inc.size:
            self.crashed.pop(instance_id, None)  # the earlier incarnation's gauges left
            self.unlisted.discard(instance_id)
        inc.flushed()
        for dup in self.extra:  # one displaced by this write moves aside at once
            assert dup.handle.flush()
            dup.flushed()

    def _live(self) -> list[Incarnation]:
        return [*self.live.values(), *self.extra]

    def _heal(self) -> None:
        """Every live incarnation writes a check of every region within CHECK_EVERY writes."""
        for _ in range(CHECK_EVERY + 1):
            for inc in self._live():
                assert inc.handle.flush()
                inc.flushed()
        for instance_id in list(self.crashed):
            if instance_id in self.live and (self.live[instance_id].recorded
                                             or self.live[instance_id].size):  # fmt: skip
                self.crashed.pop(instance_id)
                self.unlisted.discard(instance_id)

    @rule(instance_id=IDS, region=REGIONS, hits=st.integers(1, 5))
    def reply_lost(self, instance_id: str, region: str, hits: int) -> None:
        """A write reaches Redis, which applies it, and its reply is lost (the writer times
        out): the next write, even after Redis lost the region's stats hash, adds nothing
        twice."""
        inc = self.live.get(instance_id)
        if inc is None or not (inc.recorded or inc.size):
            return
        # first a write that Redis acknowledges, so that the lost one is a single script
        # call on an open connection (not a handshake, nor a refusal resent whole)
        self.flush(instance_id)
        for _ in range(hits):
            inc.handle.record_hit(region, 0.001)
        inc.recorded[region] += hits
        self.proxy.drop_replies = True
        try:
            assert not inc.handle.flush()
        finally:
            self.proxy.drop_replies = False
        self._flushed(instance_id)  # Redis holds it
        event("a write's reply lost")

    def _owners(self, instance_id: str) -> list[str]:
        """The ids whose keys an instance named ``instance_id`` has in Redis: its live
        incarnation's, and a crashed one's (under that id, or moved aside from it)."""
        owners = {cid for cid in self.crashed
                  if cid == instance_id or cid.startswith(f"{instance_id}-")}  # fmt: skip
        if instance_id in self.live:
            owners.add(actual_id(self.live[instance_id]))
        return sorted(owners)

    @rule(kind=st.sampled_from(["stats", "aggregated", "regions", "instance_regions", "meta",
                                "counts", "instances", "samples"]),
          instance_id=IDS, region=st.sampled_from(["R1", "R2", SIZED]),
          which=st.integers(0, 1))  # fmt: skip
    def redis_loses_a_key(self, kind: str, instance_id: str, region: str, which: int) -> None:
        """Redis loses one key (an operator's DEL, an eviction, an expiry), then the live
        instances write on. Also a crashed instance's own keys: where they were Redis's
        only record of its live gauges, the loss is reported (docs/write-protocol.md)."""
        owners = self._owners(instance_id)
        own = owners[which % len(owners)] if owners else None
        crashed = self.crashed.get(own) if own is not None else None
        if crashed is not None and crashed.lost_own:
            return  # one record of a crashed instance at a time (a documented limit)
        keys = {
            "aggregated": f"conduit:cache:stats:aggregated:{region}",
            "regions": "conduit:cache:regions",
            "counts": f"conduit:cache:counts:{region}",
            "instances": "conduit:cache:instances",
        }
        if own is not None:
            keys |= {
                "stats": f"conduit:cache:stats:{own}:{region}",
                "samples": f"conduit:cache:stats:{own}:{region}:response_times",
                "meta": f"conduit:cache:instance:{own}",
                "instance_regions": f"conduit:cache:instance:{own}:regions",
            }
        if kind not in keys:
            return
        if crashed is not None and kind in ("stats", "instance_regions", "meta"):
            event(f"a crashed instance's {kind} lost")
            crashed.lost_own = True
            if kind == "stats" and region in crashed.regions_written:
                self.ghosts.add(region)
        if kind in ("regions", "instances"):  # where a crashed instance is found again
            if any(c.lost_own for c in self.crashed.values()):
                return
            for c in self.crashed.values():
                c.lost_own = True
        if kind == "aggregated":
            if not self.r.exists(keys[kind]):
                return
            for ended in [*self.ended, *self.crashed.values()]:
                if ended.written[region] and any(region in i.regions_written
                                                 for i in self._live()):  # fmt: skip
                    self.must_report.add(region)
                ended.written[region] = 0  # what ended incarnations added is lost
            for crashed in self.crashed.values():
                crashed.regions_written.discard(region)
                crashed.size_written.pop(region, None)
            self.ghosts.discard(region)  # rebuilt from the live instances alone
        if kind == "instances":  # crashed ones are no longer listed (nor reaped): their
            self.unlisted |= set(self.crashed)  # gauges stay until their id writes again
        self.r.delete(keys[kind])
        self._heal()

    @precondition(lambda self: bool(self.crashed))
    @rule(kind=st.sampled_from(["stats", "instance_regions", "meta"]),
          region=st.sampled_from(["R1", "R2", SIZED]), pick=st.integers(0, 1))  # fmt: skip
    def redis_loses_a_crashed_instances_key(self, kind: str, region: str, pick: int) -> None:
        """Redis loses a key of a crashed instance: its own record of its live gauges."""
        crashed_ids = sorted(self.crashed)
        crashed_id = crashed_ids[pick % len(crashed_ids)]
        name = crashed_id.split("-", 1)[0]  # the id it was started with (before moving aside)
        owners = self._owners(name)
        self.redis_loses_a_key(kind, name, region, owners.index(crashed_id))

    @rule(reap=st.booleans())
    def cleanup_runs_while_everyone_is_away(self, reap: bool) -> None:
        """Every instance was cut off or suspended longer than retention_period (or
        instance_timeout): cleanup (or a reader's reaping) takes them all out; then the
        live ones come back and write again."""
        now = float(self.r.time()[0])
        members = self.r.zrange("conduit:cache:instances", 0, -1)
        if members:
            self.r.zadd("conduit:cache:instances", dict.fromkeys(members, now - 7200))
        if reap:
            self.store.reap(60)
        else:
            self.store.cleanup(3600)
        for crashed_id in set(self.crashed) - self.unlisted:  # listed ones are taken out
            self.crashed.pop(crashed_id).regions_written = set()
        for inc in self._live():
            inc.regions_written = set()
            inc.size_written = {}
        self._heal()

    @rule(instance_id=IDS, region=REGIONS, hits=st.integers(1, 5))
    def second_writer_under_one_id(self, instance_id: str, region: str, hits: int) -> None:
        """Another handle (same process, so the same host and pid: as two containers whose
        application is PID 1) writes under a live instance's id. Told apart by token: one
        of them moves aside, and nothing is counted twice."""
        if instance_id not in self.live or len(self.extra) >= 2:
            return
        original = self.live[instance_id]
        settings = dataclasses.replace(original.handle.settings, instance_id=actual_id(original))
        handle = CacheStatistics(settings)
        self.opened.append(handle)
        dup = Incarnation(handle)
        for _ in range(hits):
            handle.record_hit(region, 0.001)
        dup.recorded[region] += hits
        self.extra.append(dup)
        assert handle.flush()
        dup.flushed()
        self.crashed.pop(settings.instance_id, None)  # it took the id over: their gauges left
        self.unlisted.discard(settings.instance_id)
        for inc in self._live():  # the displaced one moves aside, and writes on
            assert inc.handle.flush()
            inc.flushed()

    @rule(instance_id=IDS)
    def flush(self, instance_id: str) -> None:
        if instance_id in self.live:
            assert self.live[instance_id].handle.flush()
            self._flushed(instance_id)

    @rule(instance_id=IDS, threads=st.integers(2, 8))
    def flush_concurrently(self, instance_id: str, threads: int) -> None:
        if instance_id not in self.live:
            return
        inc = self.live[instance_id]
        results: list[bool] = []
        workers = [threading.Thread(target=lambda: results.append(inc.handle.flush()))
                   for _ in range(threads)]  # fmt: skip
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert all(results)
        self._flushed(instance_id)

    @rule(instance_id=IDS)
    def stop(self, instance_id: str) -> None:
        if instance_id in self.live:
            inc = self.live.pop(instance_id)
            inc.handle.shutdown()  # final flush, then it leaves the live gauges
            inc.flushed()
            if inc.recorded or inc.size:
                self.crashed.pop(instance_id, None)
            inc.regions_written = set()
            self.ended.append(inc)
            for dup in self.extra:  # one its final flush displaced moves aside at once
                assert dup.handle.flush()
                dup.flushed()

    @rule(instance_id=IDS, region=REGIONS, hits=st.integers(1, 5))
    def fork(self, instance_id: str, region: str, hits: int) -> None:
        """The process forks after setup(): the child is a new instance with fresh tallies;
        it records, then exits cleanly (final flush, departure). The parent is unchanged."""
        if instance_id not in self.live:
            return
        handle = self.live[instance_id].handle
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(hits):
                    handle.record_hit(region, 0.001)
                handle.shutdown()
                os.write(write, handle.settings.instance_id.encode())
            finally:
                os._exit(0)
        os.close(write)
        child_id = os.read(read, 200).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert child_id.endswith(f"-{pid}")
        child = Incarnation(handle)  # what Redis holds of it: its events, no live gauges
        child.written[region] = hits
        self.ended.append(child)

    @rule(instance_id=IDS)
    def crash(self, instance_id: str) -> None:
        if instance_id in self.live:
            inc = self.live.pop(instance_id)
            inc.handle.pipeline.closed = True  # killed: no flush, no departure
            self.ended.append(inc)
            if inc.regions_written:
                self.crashed[actual_id(inc)] = inc

    @rule()
    def redis_restarts_empty(self) -> None:
        self.r.flushall()
        self.must_report.clear()
        self.unlisted.clear()
        self.ghosts.clear()
        for inc in [*self._live(), *self.ended]:
            inc.written = Counter()  # live ones rebuild with their next flush
            inc.regions_written = set()
            inc.size_written = {}
        self.crashed.clear()

    @invariant()
    def redis_equals_the_model(self) -> None:
        incarnations = [*self._live(), *self.ended]
        holding = [*self._live(), *self.crashed.values()]  # hold live gauges
        for region in ("R1", "R2", SIZED):
            totals = self.r.hgetall(f"conduit:cache:stats:aggregated:{region}")
            hits = sum(inc.written[region] for inc in incarnations)
            live = [inc for inc in holding if region in inc.regions_written]
            size = sum(inc.size_written.get(region, 0) for inc in live)
            assert int(totals.get("hit_count", 0)) == hits, (region, totals)
            assert int(totals.get("instance_count", 0)) == len(live), (region, totals)
            live_hits = sum(inc.written[region] for inc in live)
            gauges = (int(totals.get("size_bytes", 0)), int(totals.get("live_hit_count", 0)))
            if gauges != (size, live_hits):  # exact, or the loss of their record reported
                event("live gauges of a lost record, reported")
                assert live and region in self.ghosts, (region, totals, size, live_hits)
                assert int(totals.get("lost_count", 0)) >= 1, (region, totals)
            if not live:  # nobody left: every live gauge is exact again
                self.ghosts.discard(region)
            if region in self.must_report and totals:
                assert int(totals.get("lost_count", 0)) >= 1, (region, totals)
        expected_active = sum(1 for inc in self._live() if inc.regions_written) + sum(
            1 for crashed_id in self.crashed if crashed_id not in self.unlisted
        )
        assert self.store.read_cluster(60).active == expected_active

    def teardown(self) -> None:
        for handle in reversed(self.opened):
            if not handle.pipeline._close_done:  # crashed: never shut down
                handle.pipeline.closed = False
            handle.shutdown()
        self.r.close()


def test_write_protocol_model(server: RedisServer, proxy: TcpProxy) -> None:
    Cluster.url, Cluster.proxy = server.url, proxy
    warm = setup(redis_url=server.url, instance_id="warm", set_global=False, flush_interval=None)
    assert isinstance(warm, CacheStatistics)
    warm.record_hit("R1", 0.001)
    assert warm.flush()  # the scripts are loaded: a lost reply is of a write Redis applied
    warm.shutdown()
    run_state_machine_as_test(
        Cluster, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )

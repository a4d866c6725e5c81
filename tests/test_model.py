"""One model-based test of the write protocol through the public API: instances start,
record in random regions (some regions only ever get a size), flush (also from many
threads at once), fork, stop, crash, restart under the same id; Redis restarts empty, loses
any key of the schema (deleted, evicted, expired); cleanup and reaping run at any time
(as after a partition or a suspension longer than ``retention_period``) and the instances
come back; a second handle writes under a live instance's id. After every step the
cluster counters and live gauges in Redis equal a simple model, and a loss the model
predicts cannot be rebuilt is reported in the region's totals (health reads it)."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conduit_otel_cache import CacheStatistics, setup
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.store import Store
from conduit_otel_cache.writethrough import CHECK_EVERY

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


class Cluster(RuleBasedStateMachine):
    url = ""

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
        for instance_id in ("a", "b"):
            self.start(instance_id)

    def _handle(self, instance_id: str) -> CacheStatistics:
        handle = setup(
            redis_url=self.url, instance_id=instance_id, set_global=False, flush_interval=None,
            aggregation_cache_ttl=0, batch_timeout=0.001,
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

    @rule(kind=st.sampled_from(["stats", "aggregated", "regions", "instance_regions", "meta",
                                "hit_rates", "instances", "samples"]),
          instance_id=IDS, region=st.sampled_from(["R1", "R2", SIZED]))  # fmt: skip
    def redis_loses_a_key(self, kind: str, instance_id: str, region: str) -> None:
        """Redis loses one key (an operator's DEL, an eviction, an expiry), then the live
        instances write on. Keys of a crashed instance are left alone: a crashed instance's
        own keys are all Redis has of its live gauges (see docs/write-protocol.md)."""
        inc = self.live.get(instance_id)
        own = inc.handle.settings.instance_id if inc is not None else None
        keys = {
            "aggregated": f"conduit:cache:stats:aggregated:{region}",
            "regions": "conduit:cache:regions",
            "hit_rates": f"conduit:cache:hit_rates:{region}",
            "instances": "conduit:cache:instances",
        }
        if own is not None and instance_id not in self.crashed:  # (a crashed predecessor
            keys |= {  # under this id still holds gauges through these keys: left alone too)
                "stats": f"conduit:cache:stats:{own}:{region}",
                "samples": f"conduit:cache:stats:{own}:{region}:response_times",
                "meta": f"conduit:cache:instance:{own}",
                "instance_regions": f"conduit:cache:instance:{own}:regions",
            }
        if kind not in keys:
            return
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
        if kind == "instances":  # crashed ones are no longer listed (nor reaped): their
            self.unlisted |= set(self.crashed)  # gauges stay until their id writes again
        self.r.delete(keys[kind])
        self._heal()

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
            inc.handle._closed = True  # killed: no flush, no departure
            self.ended.append(inc)
            if inc.regions_written:
                self.crashed[actual_id(inc)] = inc

    @rule()
    def redis_restarts_empty(self) -> None:
        self.r.flushall()
        self.must_report.clear()
        self.unlisted.clear()
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
            assert int(totals.get("size_bytes", 0)) == size, (region, totals)
            live_hits = sum(inc.written[region] for inc in live)
            assert int(totals.get("live_hit_count", 0)) == live_hits, (region, totals)
            if region in self.must_report and totals:
                assert int(totals.get("lost_count", 0)) >= 1, (region, totals)
        expected_active = sum(1 for inc in self._live() if inc.regions_written) + sum(
            1 for crashed_id in self.crashed if crashed_id not in self.unlisted
        )
        assert self.store.read_cluster(60).active == expected_active

    def teardown(self) -> None:
        for handle in reversed(self.opened):
            if handle._closer is None:  # crashed: never shut down
                handle._closed = False
            handle.shutdown()
        self.r.close()


def test_write_protocol_model(server: RedisServer) -> None:
    Cluster.url = server.url
    run_state_machine_as_test(
        Cluster, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )

"""One model-based test of the write protocol through the public API: instances start,
record in random regions (some regions only ever get a size), flush (also from many
threads at once), fork, stop, crash, restart under the same id; Redis restarts empty. After
every step the cluster counters and live gauges in Redis equal a simple model."""

from __future__ import annotations

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
        assert child_id == f"{instance_id}-{pid}"
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
                self.crashed[instance_id] = inc

    @rule()
    def redis_restarts_empty(self) -> None:
        self.r.flushall()
        for inc in [*self.live.values(), *self.ended]:
            inc.written = Counter()  # live ones rebuild with their next flush
            inc.regions_written = set()
            inc.size_written = {}
        self.crashed.clear()

    @invariant()
    def redis_equals_the_model(self) -> None:
        incarnations = [*self.live.values(), *self.ended]
        holding = [*self.live.values(), *self.crashed.values()]  # hold live gauges
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
        expected_active = sum(1 for inc in holding if inc.regions_written)
        assert self.store.read_cluster(60).active == expected_active

    def teardown(self) -> None:
        for handle in self.opened:
            handle._closed = False
            handle.shutdown()
        self.r.close()


def test_write_protocol_model(server: RedisServer) -> None:
    Cluster.url = server.url
    run_state_machine_as_test(
        Cluster, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )

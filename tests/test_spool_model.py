"""One model-based test of the spool: processes start (each recovering the dead spools it
finds), record, flush, stop, and are killed at any point (in-process: no flush, no
departure, and the spool's lock let go as the kernel does at a SIGKILL); random survivors
recover, alone or several at once. After every step the cluster counters and live gauges
in Redis equal a model in which a killed process's events are all counted once its spool is
recovered, and the spool directory holds only the live processes' and the unrecovered
dead ones' spools."""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from conduit_otel_cache import CacheStatistics, lifecycle, setup
from conduit_otel_cache.embedded import RedisServer

from .conftest import wait_for

REGIONS = st.sampled_from(["R1", "R2"])
PICK = st.integers(0, 1000)


class Process:
    def __init__(self, handle: CacheStatistics) -> None:
        self.handle = handle
        self.recorded: Counter[str] = Counter()
        self.written: Counter[str] = Counter()  # what Redis holds of it

    def flushed(self) -> None:
        self.written = Counter(self.recorded)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


class Pod(RuleBasedStateMachine):
    url = ""
    spool_dir = ""
    ids = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.r = redis.Redis.from_url(self.url, decode_responses=True)
        self.r.flushall()
        for name in os.listdir(self.spool_dir):
            os.unlink(os.path.join(self.spool_dir, name))
        self.live: list[Process] = []
        self.dead: list[Process] = []  # killed, spool not yet recovered
        self.ended: list[Process] = []  # stopped, or killed and recovered
        self.start()

    def _recovered_all(self) -> None:
        for proc in self.dead:
            proc.written = Counter(proc.recorded)  # every event, flushed or not
        self.ended += self.dead
        self.dead = []

    @rule()
    def start(self) -> None:
        """A new process (a new pid, so a new id): it recovers every dead spool at its start
        (its recovery's first pass is awaited; the next one is an hour away)."""
        if len(self.live) >= 3:
            return
        handle = setup(
            redis_url=self.url, instance_id=f"p{next(self.ids)}", set_global=False,
            flush_interval=3600, instance_timeout=7200, retention_period=14400,
            aggregation_cache_ttl=0, spool_dir=self.spool_dir,
        )  # fmt: skip
        assert isinstance(handle, CacheStatistics) and handle.pipeline.recoverer is not None
        recoverer = handle.pipeline.recoverer
        wait_for(lambda: recoverer.passes >= 1, what="the recovery at start")
        self.live.append(Process(handle))
        self._recovered_all()

    @rule(pick=PICK, region=REGIONS, hits=st.integers(1, 5), then_flush=st.booleans())
    def record(self, pick: int, region: str, hits: int, then_flush: bool) -> None:
        if self.live:
            proc = self.live[pick % len(self.live)]
            for _ in range(hits):
                proc.handle.record_hit(region, 0.001)
            proc.recorded[region] += hits
            if then_flush:
                assert proc.handle.flush()
                proc.flushed()

    @rule(pick=PICK)
    def flush(self, pick: int) -> None:
        if self.live:
            proc = self.live[pick % len(self.live)]
            assert proc.handle.flush()
            proc.flushed()

    @rule(pick=PICK)
    def stop(self, pick: int) -> None:
        if self.live:
            proc = self.live.pop(pick % len(self.live))
            proc.handle.shutdown()
            proc.flushed()
            self.ended.append(proc)

    @rule(pick=PICK)
    def kill(self, pick: int) -> None:
        """SIGKILL: nothing runs; the kernel lets go of its spool's lock."""
        if self.live:
            proc = self.live.pop(pick % len(self.live))
            handle = proc.handle
            handle.pipeline.closed = True
            handle.pipeline._stop_beats.set()
            lifecycle.forget(handle.pipeline)
            assert handle.spool is not None
            handle.spool.abandon()
            self.dead.append(proc)

    @rule(picks=st.lists(PICK, min_size=1, max_size=3))
    def survivors_recover(self, picks: list[int]) -> None:
        """Random survivors run a recovery pass, several at once: each dead spool is
        written once."""
        if not self.live:
            return
        recoverers = {id(p): p for p in (self.live[i % len(self.live)] for i in picks)}
        threads = []
        for proc in recoverers.values():
            handle = proc.handle
            assert handle.pipeline.recoverer is not None and handle.spool is not None
            own = (handle.spool.path,)
            threads.append(threading.Thread(target=handle.pipeline.recoverer.run, args=(own,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._recovered_all()

    @invariant()
    def redis_and_the_spool_dir_equal_the_model(self) -> None:
        everyone = [*self.live, *self.dead, *self.ended]
        for region in ("R1", "R2"):
            totals = self.r.hgetall(f"conduit:cache:stats:aggregated:{region}")
            assert int(totals.get("hit_count", 0)) == sum(p.written[region] for p in everyone)
            holding = [p for p in [*self.live, *self.dead] if p.written[region]]
            assert int(totals.get("instance_count", 0)) == len(holding), (region, totals)
        assert len(os.listdir(self.spool_dir)) == len(self.live) + len(self.dead)

    def teardown(self) -> None:
        for proc in self.live:
            proc.handle.shutdown()
        self.r.close()


def test_spool_model(server: RedisServer, tmp_path: Path) -> None:
    Pod.url = server.url
    Pod.spool_dir = str(tmp_path)
    run_state_machine_as_test(
        Pod, settings=settings(max_examples=30, stateful_step_count=25, deadline=None)
    )

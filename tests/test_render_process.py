"""``serve``'s render process: the child encodes the cluster's series exactly as the
serving process would, the serving process adds its own series, and a child that dies
costs no scrape and no data (the refresh renders in-process until a new child is ready)."""

from __future__ import annotations

import gzip
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import choose_encoder

from conduit_otel_cache import Settings
from conduit_otel_cache.serve.render_process import NICENESS
from conduit_otel_cache.serve.rendering import encode
from conduit_otel_cache.serve.series import families
from conduit_otel_cache.serve.service import ExporterService

from .conftest import MakeStats, wait_for
from .serve_process import ServeProcess
from .test_scrape import PROMETHEUS, get, hits, samples

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
def service(redis_url: str) -> Iterator[ExporterService]:
    settings = Settings.load(redis_url=redis_url, aggregation_cache_ttl=0.2)
    service = ExporterService(settings, port=0, render_process=True).start()
    assert service.render_process is not None
    assert service.render_process.wait_ready(60), "the render process never started"
    yield service
    service.stop()


def test_the_child_encodes_what_this_process_would(
    make_stats: MakeStats, service: ExporterService
) -> None:
    stats = make_stats("app-1")
    for region in ("Orders", "Users"):
        stats.record_hit(region, 0.002)
        stats.record_miss(region)
    assert stats.flush()
    service.aggregator.invalidate()  # the view serve read at start-up may be under its ttl
    service.aggregator.refresh_instances()  # per-instance series and drift in the view
    view = service.aggregator.view()
    variants = {(t, gz): e for e, t in map(choose_encoder, ("", OPENMETRICS)) for gz in (0, 1)}
    own = service.exposition.own_series()
    assert service.render_process is not None
    errors, now = service.aggregator.errors_total, time.time()
    child = service.render_process.render(view, errors, now, own, variants)
    # the same pure function here
    cluster = families(view, settings=service.serve, errors_total=errors, now=now)
    here = encode(cluster + own, variants)
    assert child is not None and set(child) == set(here) == set(variants)
    for (content_type, gzipped), body in here.items():  # equal but for the age and gzip's time
        theirs = child[(content_type, gzipped)]
        if gzipped:
            body, theirs = gzip.decompress(body), gzip.decompress(theirs)
        assert _timeless(theirs) == _timeless(body), content_type
        assert b'conduit_cache_hits_total{region="Orders"} 1.0' in body
        assert b"process_start_time_seconds" in body
    assert service.render_process.renderings == 1


def test_scrapes_come_from_the_child_with_this_process_own_series(
    make_stats: MakeStats, service: ExporterService
) -> None:
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    assert stats.flush()
    process = service.render_process
    assert process is not None and process.pid != os.getpid()
    get(service, **PROMETHEUS)  # from now on rendered in the background
    # renderings are not forced: polled
    wait_for(lambda: process.renderings >= 2, 30, 0.01, "the render process renders")
    for headers in ({}, PROMETHEUS):
        body, found = get(service, **headers)
        parsed = samples(body, found)
        assert hits(parsed, "Orders") == 1
        # the process series are this process's (its start time), not the child's
        assert parsed[("process_start_time_seconds", ())] == pytest.approx(_start_time(), abs=0.02)
        names = [line for line in body.splitlines() if line.startswith(b"# EOF")]
        assert names == ([b"# EOF"] if "Accept" in headers else [])


def test_a_dead_child_costs_no_scrape_and_is_replaced(
    make_stats: MakeStats, service: ExporterService
) -> None:
    process = service.render_process
    assert process is not None
    process.restart_after = 0.5
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    assert stats.flush()
    get(service, **PROMETHEUS)
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for expected in (2, 3, 4):  # each flush appears: rendered in-process meanwhile
        stats.record_hit("Orders")
        assert stats.flush()
        wait_for(lambda n=expected: hits(samples(*get(service, **PROMETHEUS)), "Orders") == n,
                 30, 0.01, f"{expected} hits on /metrics")  # fmt: skip
    assert process.failures == 1
    failed = samples(*get(service, **PROMETHEUS))
    assert failed[("conduit_cache_exporter_render_failures_total", ())] == 1.0
    assert process.wait_ready(60) and process.pid not in (None, first)
    done = process.renderings
    stats.record_hit("Orders")
    assert stats.flush()
    wait_for(lambda: process.renderings != done
             and hits(samples(*get(service, **PROMETHEUS)), "Orders") == 5,
             30, 0.01, "the new child renders the last flush")  # fmt: skip


def _timeless(body: bytes) -> list[bytes]:
    return [x for x in body.splitlines() if not x.startswith(b"conduit_cache_exporter_data_age")]


def _start_time() -> float:
    """This process's start time as prometheus_client's ``ProcessCollector`` computes it."""
    with open("/proc/stat", "rb") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().split(b")")[-1].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def test_serve_runs_a_niced_child_without_secrets_that_ends_with_it(
    r: Any, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve``'s child gets no password (neither in its command line nor in its
    environment), runs at a lower CPU priority and ends when ``serve`` is killed."""
    secret = "s3cret-pw"
    r.acl_setuser("app", enabled=True, passwords=[f"+{secret}"], keys=["*"],
                  categories=["+@all"], channels=["*"])  # fmt: skip
    url = f"redis://app:{secret}@127.0.0.1:{redis_server.port}"
    monkeypatch.setenv("CONDUIT_CACHE_STATS_REDIS_URL", url)
    with ServeProcess(url) as serve:
        assert serve.get("/metrics")[0] == 200
        (child,) = _children(serve.proc.pid)
        proc = Path(f"/proc/{child}")
        assert secret.encode() not in (proc / "cmdline").read_bytes()
        assert secret.encode() not in (proc / "environ").read_bytes()
        assert int((proc / "stat").read_text().rsplit(")", 1)[1].split()[16]) == NICENESS
        serve.proc.kill()  # no chance to stop its child
        serve.proc.wait(10)
        wait_for(lambda: not proc.exists()
                 or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 30, 0.01, "the render process ends with serve")  # fmt: skip


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]  # fmt: skip

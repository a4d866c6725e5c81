"""``GET /metrics`` of ``serve``: finished bytes rendered in the background, data age
within ``aggregation_cache_ttl`` plus one refresh, one view per scrape under concurrency,
formats, gzip, the name filter, and the exporter's own process and build-info series."""

from __future__ import annotations

import gzip
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache import Settings
from conduit_otel_cache.serve.http import WORKER_THREADS
from conduit_otel_cache.serve.series import DATA_AGE_HEADER
from conduit_otel_cache.serve.service import ExporterService

from .conftest import MakeStats, wait_for
from .test_prometheus_tools import assert_ok, promtool

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROMETHEUS = {  # what Prometheus 2.x sends
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
#: scheduler slack allowed on top of the bound on a shared CI machine
SLACK = 0.1


@pytest.fixture(params=[False, True], ids=["in-process", "render process"])
def serve(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start ``serve`` (an ``ExporterService``) with the given ``aggregation_cache_ttl``,
    rendering in-process or (as ``serve`` runs) in a render process."""
    services: list[ExporterService] = []

    def start(ttl: float) -> ExporterService:
        settings = Settings.load(redis_url=redis_url, aggregation_cache_ttl=ttl)
        service = ExporterService(settings, port=0, render_process=request.param).start()
        services.append(service)
        if service.render_process is not None:
            assert service.render_process.wait_ready(60), "the render process never started"
        return service

    yield start
    for service in services:
        service.stop()


def get(
    service: ExporterService, query: str = "", method: str = "GET", **headers: str
) -> tuple[bytes, Any]:
    """The body (decompressed when gzipped) and the headers (case-insensitive) of one
    request."""
    url = f"http://127.0.0.1:{service.port}/metrics{query}"
    request = urllib.request.Request(url, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as resp:
        body, found = resp.read(), resp.headers  # header names are case-insensitive
    if found.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return body, found


def samples(body: bytes, headers: Any) -> dict[tuple[str, tuple[Any, ...]], float]:
    """``{(sample name, sorted labels): value}`` parsed by prometheus_client."""
    openmetrics = headers["Content-Type"].startswith("application/openmetrics-text")
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse(body.decode())
        for s in family.samples
    }


def hits(found: dict[tuple[str, tuple[Any, ...]], float], region: str) -> float | None:
    return found.get(("conduit_cache_hits_total", (("region", region),)))


def test_flushed_events_appear_within_ttl_plus_one_refresh(
    make_stats: MakeStats, serve: Any
) -> None:
    ttl = 0.5
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    assert stats.flush()
    service = serve(ttl)
    exporter = service.exposition.renderings
    get(service, **PROMETHEUS)  # Prometheus scrapes: from now on rendered in the background
    ages: list[float] = []
    for round_ in range(1, 4):
        for _ in range(10):
            stats.record_hit("Orders")
        assert stats.flush()
        flushed = time.monotonic()
        expected = 1 + 10 * round_
        deadline = flushed + 10 * (ttl + 1.0)  # bounded; the assertion below is the bound
        while True:
            body, headers = get(service, **PROMETHEUS)
            ages.append(float(headers[DATA_AGE_HEADER]))
            if hits(samples(body, headers), "Orders") == expected:
                break
            assert time.monotonic() < deadline, f"{expected} hits never appeared on /metrics"
            time.sleep(0.01)  # the poll interval of this test, not a wait for a flush
        elapsed = time.monotonic() - flushed
        bound = ttl + exporter.refresh_seconds_max + SLACK
        assert elapsed <= bound, f"round {round_}: {elapsed:.3f} s > {bound:.3f} s"
    assert exporter.prerender and exporter.refreshes >= 3  # served from background refreshes
    if service.render_process is not None:  # rendered by the child
        assert service.render_process.renderings >= 3 and not service.render_process.failures
    assert max(ages) <= ttl + exporter.refresh_seconds_max + SLACK, ages
    # a name filter on a background rendering (which keeps bytes only) collects its view again
    body, headers = get(service, "?name[]=conduit_cache_hits_total", **PROMETHEUS)
    found = samples(body, headers)
    assert set(found) == {("conduit_cache_hits_total", (("region", "Orders"),))}
    assert hits(found, "Orders") == 31


@pytest.mark.parametrize("ttl", [0.0, 0.05], ids=["on demand", "background"])
def test_concurrent_scrapes_each_see_one_view(
    make_stats: MakeStats, serve: Any, ttl: float
) -> None:
    """While the view changes, every body of 4 concurrent scrapers is one whole view: in
    every region the hit ratio on it matches the hits and misses on it."""
    regions = [f"R{j:02d}" for j in range(40)]
    stats = make_stats("app-1")
    for region in regions:
        stats.record_miss(region)
    assert stats.flush()
    service = serve(ttl)
    stop, enough = threading.Event(), threading.Event()
    bodies: list[dict[tuple[str, tuple[Any, ...]], float]] = []
    errors: list[BaseException] = []

    def writer() -> None:
        while not stop.is_set():
            for region in regions:
                stats.record_hit(region)
            stats.flush()

    def scraper() -> None:
        try:
            while not stop.is_set():
                bodies.append(samples(*get(service, **PROMETHEUS)))
                # 60 scrapes across 5 views at least: under load the writer's flushes (and
                # with a TTL the refreshes) come slower than the scrapes
                if len(bodies) >= 60 and len({hits(found, "R00") for found in bodies}) >= 5:
                    enough.set()
        except BaseException as exc:
            errors.append(exc)
            enough.set()

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=scraper) for _ in range(4)
    ]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave often: a shared pin shows at once
    try:
        for t in threads:
            t.start()
        enough.wait(30)  # 60 scrapes of 5 views, or an error
    finally:
        stop.set()
        sys.setswitchinterval(switch)
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len({hits(found, "R00") for found in bodies}) >= 5, "the view did not change"
    if service.render_process is not None and ttl:
        assert service.render_process.renderings >= 5 and not service.render_process.failures
    for found in bodies:
        for region in regions:
            labels = (("region", region),)
            h = found[("conduit_cache_hits_total", labels)]
            m = found[("conduit_cache_misses_total", labels)]
            ratio = found[("conduit_cache_hit_ratio", labels)]
            assert ratio == pytest.approx(h / (h + m)), (region, h, m, ratio)


def test_formats_gzip_name_filter_head_and_own_series(make_stats: MakeStats, serve: Any) -> None:
    stats = make_stats("app-1")
    for _ in range(3):
        stats.record_hit("Orders")
    stats.record_hit("Users")
    assert stats.flush()
    service = serve(5.0)

    text, headers = get(service)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert float(headers[DATA_AGE_HEADER]) >= 0
    found = samples(text, headers)
    assert hits(found, "Orders") == 3 and hits(found, "Users") == 1
    version = metadata.version("conduit-otel-cache")
    assert found[("conduit_cache_exporter_build_info", (("version", version),))] == 1
    names = {name for name, _ in found}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "python_gc_objects_collected_total",
        "python_info",
        "conduit_cache_exporter_data_age_seconds",
    ):
        assert name in names, name
    assert_ok(promtool("check", "metrics", stdin=text))

    om, headers = get(service, Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers["Content-Encoding"] == "gzip" and om.endswith(b"# EOF\n")
    assert hits(samples(om, headers), "Orders") == 3

    body, headers = get(service, "?name[]=conduit_cache_hits_total")
    found = samples(body, headers)
    assert {name for name, _ in found} == {"conduit_cache_hits_total"}
    assert hits(found, "Orders") == 3 and hits(found, "Users") == 1
    body, headers = get(
        service,
        "?name[]=conduit_cache_hits_total&name[]=conduit_cache_exporter_build_info",
        Accept=OPENMETRICS,
    )
    assert {name for name, _ in samples(body, headers)} == {
        "conduit_cache_hits_total",
        "conduit_cache_exporter_build_info",
    }
    assert DATA_AGE_HEADER in headers

    body, headers = get(service, method="HEAD")
    assert body == b"" and headers["Content-Type"].startswith("text/plain")


def test_scrapes_do_not_wait_for_a_stalled_redis(make_stats: MakeStats, serve: Any, r: Any) -> None:
    """While Redis stalls (``CLIENT PAUSE``) the background refresh waits; scrapes keep
    getting the last rendering at once, and its age tells how old it is."""
    ttl = 0.2
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    assert stats.flush()
    service = serve(ttl)
    get(service, **PROMETHEUS)
    r.client_pause(2500)
    try:
        paused = time.monotonic()
        ages: list[float] = []
        while time.monotonic() - paused < 2.0:
            start = time.monotonic()
            body, headers = get(service, **PROMETHEUS)
            assert time.monotonic() - start < 1.0, "a scrape waited for Redis"
            assert hits(samples(body, headers), "Orders") == 1
            ages.append(float(headers[DATA_AGE_HEADER]))
            time.sleep(0.05)  # the poll interval of this test
    finally:
        r.client_unpause()
    assert max(ages) > 1.5, ages  # the refresh was stalled: the data aged past the TTL


def test_rendered_scrapes_are_answered_without_the_app_threads(
    make_stats: MakeStats, serve: Any
) -> None:
    """Once a format is rendered, ``GET /metrics`` is answered from its bytes on the event
    loop: it still answers, the same bytes, while every thread of the WSGI app is busy."""
    stats = make_stats("api-1")
    stats.record_hit("Busy", 0.001)
    assert stats.flush()
    service = serve(60.0)  # one rendering for the whole test
    first = {name: get(service, **h) for name, h in (("text", {}), ("prometheus", PROMETHEUS))}
    release = threading.Event()
    executor = service.server.wsgi.executor
    blockers = [executor.submit(release.wait, 30) for _ in range(WORKER_THREADS)]
    try:
        for name, h in (("text", {}), ("prometheus", PROMETHEUS)):
            body, headers = get(service, **h)
            assert body == first[name][0] and hits(samples(body, headers), "Busy") == 1.0
            head, found = get(service, method="HEAD", **h)
            assert head == b"" and found["Content-Length"] == first[name][1]["Content-Length"]
        with pytest.raises(OSError):  # the control: what needs an app thread waits
            urllib.request.urlopen(f"http://127.0.0.1:{service.port}/health", timeout=0.5)
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
    assert get(service, query="?name[]=conduit_cache_hits_total")[0]  # the app answers again


def test_serve_freezes_its_start_up_out_of_the_garbage_collector(redis_url: str) -> None:
    """``start(freeze=True)`` (what ``serve`` runs): the objects of start-up are not walked
    by later full collections, which would stall every scrape for tens of ms."""
    import subprocess

    code = (
        "import gc, sys\n"
        "from conduit_otel_cache import Settings\n"
        "from conduit_otel_cache.serve.service import ExporterService\n"
        "s = ExporterService(Settings.load(redis_url=sys.argv[1]), port=0)\n"
        "before = gc.get_freeze_count()\n"
        "s.start(freeze=True)\n"
        "print(before, gc.get_freeze_count())\n"
        "s.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", code, redis_url], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    before, after = map(int, out.split())
    assert before == 0 and after > 10_000


def test_serve_collects_garbage_between_requests_not_during_them() -> None:
    """``collect_when_idle`` (what ``serve`` runs): the cyclic garbage collector runs once no
    request is in flight, not while one is, so that the garbage of closed connections is not
    left to a full collection that pauses a scrape."""
    import gc
    import weakref

    from conduit_otel_cache.serve.http import IDLE_GC_AFTER, make_http_server

    entered, release = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            entered.set()
            release.wait(30)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = make_http_server(app, "127.0.0.1", 0)
    server.collect_when_idle()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    class Cycle:
        pass

    gc.disable()  # only the server's idle collections may collect
    try:
        cycle = Cycle()
        cycle.me = cycle  # type: ignore[attr-defined]
        dead = weakref.ref(cycle)
        del cycle
        slow = threading.Thread(
            target=lambda: urllib.request.urlopen(base + "/slow", timeout=30).read()
        )
        slow.start()
        assert entered.wait(10) and server.in_flight == 1
        time.sleep(5 * IDLE_GC_AFTER)  # a request in flight: no collection however long
        assert server.idle_collections == 0 and dead() is not None
        release.set()
        slow.join(30)
        # the timer is not forced: polled
        wait_for(lambda: server.idle_collections, 10, 0.001, "a collection once idle")
        assert dead() is None
    finally:
        gc.enable()
        release.set()
        server.shutdown()
        server.server_close()


def test_data_age_gauge_is_at_render_and_the_header_at_reply(
    make_stats: MakeStats, serve: Any
) -> None:
    """``conduit_cache_exporter_data_age_seconds`` is the data's age when the series were
    collected (rendered); ``X-Conduit-Data-Age`` is its age when the reply is sent. Between
    two scrapes of one rendering the gauge stays and the header grows by the time between."""
    stats = make_stats("app-1")
    stats.record_hit("Orders")
    assert stats.flush()
    service = serve(120.0)  # one rendering serves both scrapes
    age = ("conduit_cache_exporter_data_age_seconds", ())
    first_body, first = get(service)
    started = time.monotonic()
    time.sleep(0.5)  # the age to measure is the time itself
    second_body, second = get(service)
    elapsed = time.monotonic() - started
    gauge = samples(first_body, first)[age]
    assert samples(second_body, second)[age] == gauge
    header_1, header_2 = float(first[DATA_AGE_HEADER]), float(second[DATA_AGE_HEADER])
    assert gauge <= header_1 <= header_2
    assert header_2 - header_1 == pytest.approx(elapsed, abs=0.05)

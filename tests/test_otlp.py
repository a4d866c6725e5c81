"""OTLP push of the cluster view, end to end: real application instances write to a real
redis-server, real ``serve`` processes push over OTLP/HTTP to a receiver in this test that
decodes each request with the official ``opentelemetry-proto`` messages, and every pushed
series is compared with what the same ``serve`` publishes on ``/metrics`` (parsed by
prometheus_client)."""

from __future__ import annotations

import gzip
import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from conduit_otel_cache.config import ConfigError, Settings
from conduit_otel_cache.embedded import free_port
from conduit_otel_cache.serve.otlp import metrics_url

from .conftest import MakeStats, wait_for
from .serve_process import ServeProcess
from .tcp_proxy import TcpProxy
from .test_processes import PLAN, documented_series, served_series, start_instance

REGION = "ProviderResponses"
#: gauges that change between two reads of an idle cluster (compared by presence only)
TIME_VARYING = {"conduit_cache_aggregation_latency_seconds", "conduit_cache_redis_memory_bytes",
                "conduit_cache_last_successful_aggregation_timestamp_seconds",
                "conduit_cache_exporter_data_age_seconds"}  # fmt: skip
#: /metrics families that are not OpenTelemetry instruments (prometheus_client's own)
NOT_PUSHED = ("process_", "python_", "conduit_cache_exporter_build",
              "conduit_cache_exporter_render_failures",
              "conduit_cache_exporter_otlp_pushes")  # fmt: skip
UNIT_SUFFIXES = ("seconds", "bytes", "percent", "ratio")

Point = tuple[str, tuple[tuple[str, str], ...]]  # (Prometheus family, labels)


class Receiver:
    """An OTLP/HTTP metrics receiver: keeps every decoded ``ExportMetricsServiceRequest``;
    while :attr:`refuse` is set it answers ``400`` (a failure the exporter does not retry)."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.paths: set[str] = set()
        #: (Authorization, Content-Encoding) of the requests taken
        self.headers: set[tuple[str | None, str | None]] = set()
        self.refuse = False
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if receiver.refuse:
                    self.send_response(400)
                    self.end_headers()
                    return
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                with receiver._lock:
                    receiver.requests.append(request)
                    receiver.paths.add(self.path)
                    receiver.headers.add(
                        (self.headers.get("Authorization"), self.headers.get("Content-Encoding"))
                    )
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pushes_of(self, instance_id: str) -> list[ExportMetricsServiceRequest]:
        with self._lock:
            return [
                r for r in self.requests if resource(r).get("service.instance.id") == instance_id
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def resource(request: ExportMetricsServiceRequest) -> dict[str, str]:
    (rm,) = request.resource_metrics
    return {a.key: a.value.string_value for a in rm.resource.attributes}


def metrics_of(request: ExportMetricsServiceRequest) -> dict[str, Any]:
    """``{instrument name: Metric}`` of one push."""
    return {m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics}  # fmt: skip


def labels(point: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((a.key, a.value.string_value) for a in point.attributes))


def family_of(name: str, unit_families: set[str]) -> str:
    """The /metrics family of the instrument ``name``: its name in underscores, with the
    unit suffix the Prometheus exporter adds, if any (exactly one must match)."""
    base = name.replace(".", "_")
    found = [f for f in unit_families if f == base or (
        f.startswith(base + "_") and f[len(base) + 1 :] in UNIT_SUFFIXES)]  # fmt: skip
    assert len(found) == 1, (name, found)
    return found[0]


def pushed_points(request: ExportMetricsServiceRequest, families: set[str]) -> dict[Point, Any]:
    """Every data point of one push under its /metrics family and labels: a number for sums
    and gauges, ``(cumulative bucket counts by bound, count, sum)`` for histograms."""
    points: dict[Point, Any] = {}
    for name, metric in metrics_of(request).items():
        family = family_of(name, families)
        kind = metric.WhichOneof("data")
        if kind == "histogram":
            assert metric.histogram.aggregation_temporality == (
                AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            )
            for p in metric.histogram.data_points:
                cumulative, total = {}, 0
                for bound, n in zip(
                    [*p.explicit_bounds, float("inf")], p.bucket_counts, strict=True
                ):
                    total += n
                    cumulative[bound] = total
                points[(family, labels(p))] = (cumulative, p.count, p.sum)
            continue
        data = getattr(metric, kind)
        if kind == "sum":
            assert data.is_monotonic
            assert data.aggregation_temporality == (
                AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            )
        for p in data.data_points:
            points[(family, labels(p))] = p.as_double if p.HasField("as_double") else p.as_int
    return points


def published_points(body: str) -> dict[Point, Any]:
    """The same shape from a /metrics text."""
    points: dict[Point, Any] = {}
    histograms: dict[Point, list[Any]] = {}
    for family in text_string_to_metric_families(body):
        if family.name.startswith(NOT_PUSHED):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if family.type != "histogram":
                points[(family.name, tuple(sorted(s.labels.items())))] = s.value
                continue
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            entry = histograms.setdefault((family.name, rest), [{}, 0, 0.0])
            if s.name.endswith("_bucket"):
                entry[0][float(s.labels["le"])] = s.value
            elif s.name.endswith("_count"):
                entry[1] = s.value
            elif s.name.endswith("_sum"):
                entry[2] = s.value
    points.update({k: tuple(v) for k, v in histograms.items()})
    return points


def families_of(body: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(body)}


def scrape(serve: ServeProcess) -> str:
    status, body, _ = serve.get("/metrics")
    assert status == 200
    return body.decode()


def start_serve(redis_url: str, receiver: Receiver, instance_id: str) -> ServeProcess:
    return ServeProcess(redis_url, "--otlp-endpoint", receiver.url, "--otlp-interval", "0.2",
                        "--instance-id", instance_id, "--aggregation-cache-ttl", "0.2",
                        "--aggregation-interval", "0.1")  # fmt: skip


def pushes_counted(serve: ServeProcess) -> dict[str, float]:
    """``conduit_cache_exporter_otlp_pushes_total`` on /metrics by result."""
    return {s.labels["result"]: s.value
            for f in text_string_to_metric_families(scrape(serve))
            for s in f.samples if s.name == "conduit_cache_exporter_otlp_pushes_total"}  # fmt: skip


def value_of(
    request: ExportMetricsServiceRequest, name: str, attributes: Any = (("region", REGION),)
) -> float | None:
    """The pushed value of the sum or gauge ``name`` with ``attributes``; None when absent."""
    metric = metrics_of(request).get(name)
    if metric is None:
        return None
    found = [p.as_double if p.HasField("as_double") else p.as_int
             for p in getattr(metric, metric.WhichOneof("data")).data_points
             if labels(p) == attributes]  # fmt: skip
    return found[0] if found else None


def hits_of(request: ExportMetricsServiceRequest) -> float | None:
    return value_of(request, "conduit.cache.hits")


@pytest.mark.slow
def test_push_equals_metrics_and_counters_stay_cumulative(
    redis_url: str,
    r: redis.Redis,
    make_stats: MakeStats,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas push while the receiver refuses, then takes; every pushed series
    equals /metrics; more events arrive, replica b is cut off from Redis and comes back,
    Redis loses a region's totals: every pushed counter stays one monotonic stream."""
    hits = sum(h for h, _ in PLAN.values())
    procs = {i: start_instance(redis_url, i, *counts) for i, counts in PLAN.items()}
    receiver.refuse = True  # the receiver refuses the first pushes: counted, then recovered
    # the exporter takes the standard variables (serve never shows the token)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20s3cret")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "gzip")
    serve = start_serve(redis_url, receiver, "exporter-a")
    proxy = TcpProxy(("127.0.0.1", urlsplit(redis_url).port or 6379))  # b's way to Redis
    other = start_serve(f"redis://127.0.0.1:{proxy.port}", receiver, "exporter-b")
    try:
        wait_for(lambda: pushes_counted(serve)["failure"] >= 1, what="a failed push, counted")
        receiver.refuse = False

        def settled(total: float = hits, live: int = len(PLAN)) -> Any:
            """The last push whose every stable series equals /metrics (nothing is written
            meanwhile, so both must settle on the same values), with ``total`` hits and
            ``live`` instances."""
            pushes = receiver.pushes_of("exporter-a")
            if not pushes or hits_of(pushes[-1]) != total:
                return None
            body = scrape(serve)
            families = families_of(body)
            pushed = pushed_points(pushes[-1], families)
            published = published_points(body)
            stable = {k: v for k, v in published.items() if k[0] not in TIME_VARYING}
            instances = [k for k in pushed if k[0] == "conduit_cache_instance_hit_ratio"]
            differ[:] = [(k, pushed.get(k), v) for k, v in stable.items() if pushed.get(k) != v]
            return len(instances) == live and not differ and (pushed, published)

        differ: list[Any] = []  # (series, pushed, published) of the last try, when unequal
        try:
            pushed, published = wait_for(settled, timeout=30, what="a push equal to /metrics")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last (series, pushed, published): {differ}") from None
        # the same series: every OpenTelemetry series of /metrics is pushed, and nothing else
        assert set(pushed) == set(published)
        assert pushed[("conduit_cache_hits", (("region", REGION),))] == hits
        histogram = pushed[("conduit_cache_response_time_seconds", (("region", REGION),))]
        assert histogram[1] == sum(h + m for h, m in PLAN.values())
        assert list(histogram[0]) == [*Settings().response_time_buckets, float("inf")]
        assert receiver.paths == {"/v1/metrics"}
        assert receiver.headers == {("Bearer s3cret", "gzip")}
        assert resource(receiver.pushes_of("exporter-a")[-1])["service.name"] == (
            "conduit-otel-cache-exporter"
        )

        # more events: the pushed counters go on from where they were, never back
        extra = start_instance(redis_url, "api-4", 50, 10)
        procs["api-4"] = extra
        for replica in ("exporter-a", "exporter-b"):
            wait_for(lambda r=replica: hits_of(receiver.pushes_of(r)[-1]) == hits + 50, timeout=30)
        # replica b cut off from Redis pushes no cluster series (as on its /metrics), then
        # goes on with the same streams
        proxy.cut()
        cut_off = wait_for(lambda: value_of(receiver.pushes_of("exporter-b")[-1],
                                            "conduit.cache.redis.up", ()) == 0
                           and receiver.pushes_of("exporter-b")[-1], timeout=30)  # fmt: skip
        assert hits_of(cut_off) is None
        proxy.restore()
        wait_for(lambda: hits_of(receiver.pushes_of("exporter-b")[-1]) == hits + 50, timeout=30)
        # Redis loses the region's totals, a live instance writes again: the hash is rebuilt,
        # the loss counted, and the totals never go back
        stats = make_stats("api-5")
        stats.record_hit(REGION, 0.001)
        assert stats.flush()
        wait_for(lambda: hits_of(receiver.pushes_of("exporter-a")[-1]) == hits + 51, timeout=30)
        r.delete(f"conduit:cache:stats:aggregated:{REGION}")
        stats.record_hit(REGION, 0.001)
        assert stats.flush()
        for replica in ("exporter-a", "exporter-b"):
            wait_for(lambda rep=replica: value_of(receiver.pushes_of(rep)[-1],
                                                  "conduit.cache.data_losses") == 1,
                     timeout=30, what=f"{replica} pushing the data loss")  # fmt: skip
        after_loss = hits_of(receiver.pushes_of("exporter-a")[-1])
        assert after_loss is not None and after_loss >= hits + 51  # never back
        try:
            wait_for(lambda: settled(after_loss, live=5),
                     timeout=30, what="a push equal to /metrics after the loss")  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last (series, pushed, published): {differ}") from None
        for replica in ("exporter-a", "exporter-b"):
            pushes = receiver.pushes_of(replica)
            assert {tuple(sorted(resource(p).items())) for p in pushes} == {
                (("service.instance.id", replica), ("service.name", "conduit-otel-cache-exporter"),
                 ("telemetry.sdk.language", "python"), ("telemetry.sdk.name", "opentelemetry"),
                 ("telemetry.sdk.version", resource(pushes[0])["telemetry.sdk.version"]))
            }  # fmt: skip
            series: dict[Point, list[tuple[int, float]]] = {}
            for push in pushes:
                for name, metric in metrics_of(push).items():
                    if metric.WhichOneof("data") == "sum":
                        for p in metric.sum.data_points:
                            value = p.as_double if p.HasField("as_double") else p.as_int
                            series.setdefault((name, labels(p)), []).append(
                                (p.start_time_unix_nano, value)
                            )
            hits_series = series[("conduit.cache.hits", (("region", REGION),))]
            assert hits_series[0][1] <= hits and hits_series[-1][1] >= hits + 50
            if replica == "exporter-b":  # the pushes of its cut include no cluster series
                assert len(hits_series) < len(pushes)
            for key, values in series.items():
                assert len({start for start, _ in values}) == 1, key  # one cumulative stream
                assert all(a[1] <= b[1] for a, b in itertools.pairwise(values)), key  # monotonic
        received = len(receiver.pushes_of("exporter-a"))  # each taken push is counted
        wait_for(lambda: pushes_counted(serve)["success"] >= received)
        # docs/metrics.md lists the series a pushing replica adds to /metrics
        served = served_series(scrape(serve))
        only_with_push = documented_series(otlp=True)
        assert only_with_push and only_with_push <= served
        documented = documented_series() | only_with_push
        prefixes = tuple(n[:-1] for n in documented if n.endswith("*"))
        assert {n for n in served if n not in documented and not n.startswith(prefixes)} == set()
    finally:
        log = serve.stop() + other.stop()
        proxy.close()
        for proc in procs.values():
            proc.kill()
            proc.wait()
    assert serve.proc.returncode == other.proc.returncode == 0  # a clean stop
    assert "OTLP push to http://127.0.0.1" in log  # the refused pushes, logged
    assert "s3cret" not in log


@pytest.mark.slow
def test_an_unreachable_receiver_is_counted_and_stop_is_prompt(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the endpoint: each push fails after the exporter's timeout (the
    standard ``OTEL_EXPORTER_OTLP_TIMEOUT``), is counted and logged, /metrics is served
    meanwhile, and SIGTERM stops serve cleanly while a push waits to retry."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    with ServeProcess(redis_url, "--otlp-endpoint", f"http://127.0.0.1:{free_port()}",
                      "--otlp-interval", "0.2") as serve:  # fmt: skip
        wait_for(lambda: pushes_counted(serve)["failure"] >= 2, what="failed pushes, counted")
        assert pushes_counted(serve)["success"] == 0
        assert "conduit_cache_redis_up 1.0" in scrape(serve)
        log = serve.stop()
    assert serve.proc.returncode == 0, log
    assert log.count("conduit-otel-cache: OTLP push to") == 1, log  # at most one a minute


def test_otlp_settings_fail_at_start_naming_the_setting() -> None:
    for bad in ("collector:4318", "ftp://collector", "http://", "http://host:port"):
        with pytest.raises(ConfigError, match=r"^otlp_endpoint: "):
            Settings.load(otlp_endpoint=bad)
    with pytest.raises(ConfigError, match=r"^otlp_interval: "):
        Settings.load(otlp_endpoint="http://c:4318", otlp_interval=0)
    with pytest.raises(ConfigError) as caught:  # a token in the URL is never shown
        Settings.load(otlp_endpoint="ftp://user:s3cret@c/?token=s3cret")
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(Settings.load(otlp_endpoint="https://u:s3cret@c:4318"))
    assert metrics_url("http://c:4318") == "http://c:4318/v1/metrics"
    assert metrics_url("http://c:4318/") == "http://c:4318/v1/metrics"
    assert metrics_url("http://c:4318/otlp/v1/metrics") == "http://c:4318/otlp/v1/metrics"

"""``conduit-otel-cache``: serve, demo, stats, health, cleanup."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import __version__
from .aggregate import Aggregator, ClusterView
from .config import ConfigError, Settings
from .health import evaluate
from .model import Statistics
from .store import Store

log = logging.getLogger("conduit_otel_cache")

#: ``{region: {instance_id: statistics}}``
PerInstance = dict[str, dict[str, Statistics]]


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    given = {"redis_url": args.redis_url, "key_prefix": args.key_prefix}
    settings = Settings.load(**{k: v for k, v in given.items() if v is not None}, **extra)
    if settings.redis_url is None:
        raise ConfigError("redis_url: required (--redis-url or CONDUIT_CACHE_STATS_REDIS_URL)")
    return settings


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_table(view: ClusterView, instances: PerInstance) -> str:
    """The cluster and per-instance statistics as aligned text columns."""
    head = ("region", "instance", "hits", "misses", "hit rate", "sets", "evictions", "size",
            "p95 ms", "drift")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for region, total in sorted(view.regions.items()):
        p95 = total.response_times.quantile(0.95)
        rows.append((region, f"cluster ({total.instance_count} live)", str(total.hit_count),
                     str(total.miss_count), f"{total.hit_rate:.1f}%", str(total.set_count),
                     str(total.eviction_count), _human_bytes(total.size_bytes),
                     "-" if p95 is None else f"{p95 * 1000:.2f}",
                     f"{view.drift.get(region, 0.0):.1f}"))  # fmt: skip
        for instance_id, s in sorted(instances.get(region, {}).items()):
            p95 = s.response_times.quantile(0.95)
            rows.append(("", instance_id + ("" if s.live else " (gone)"), str(s.hit_count),
                         str(s.miss_count), f"{s.hit_rate:.1f}%", str(s.set_count),
                         str(s.eviction_count), _human_bytes(s.size_bytes),
                         "-" if p95 is None else f"{p95 * 1000:.2f}", ""))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]  # fmt: skip
    lines.append(f"live instances: {view.active_count}, "
                 f"missing: {len(view.missing_instances)}")  # fmt: skip
    return "\n".join(lines)


def view_json(
    view: ClusterView, instances: PerInstance, region: str | None = None
) -> dict[str, Any]:
    """The cluster view as JSON (optionally one region)."""
    regions = {r: s for r, s in view.regions.items() if region in (None, r)}
    return {
        "regions": {
            r: {
                "cluster": s.to_dict(),
                "drift_percent": view.drift.get(r, 0.0),
                "instances": {i: st.to_dict() for i, st in instances.get(r, {}).items()},
            }
            for r, s in sorted(regions.items())
        },
        "active_instances": view.active_count,
        "missing_instances": list(view.missing_instances),
    }


def _read_view(args: argparse.Namespace) -> tuple[Settings, ClusterView, Aggregator]:
    settings = _settings(args, aggregation_cache_ttl=0)
    aggregator = Aggregator(Store.from_settings(settings), settings)
    return settings, aggregator.view(), aggregator


def read_per_instance(aggregator: Aggregator, regions: Iterable[str]) -> PerInstance:
    """Every instance's statistics of every region in ``regions`` (heartbeats read once)."""
    beats = aggregator.store.heartbeats()
    return {region: aggregator.per_instance(region, beats) for region in regions}


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the cluster and per-instance table (or JSON); with ``--watch``, again and
    again until interrupted."""
    settings, view, aggregator = _read_view(args)
    stop = threading.Event()
    if args.watch:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    while True:
        if not view.redis_up:
            print(f"error: cannot read {settings.safe_redis_url}: {view.redis_error}",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.region:
            view = dataclasses.replace(
                view, regions={k: v for k, v in view.regions.items() if k == args.region}
            )
        instances = read_per_instance(aggregator, view.regions)
        if args.samples:
            print_samples(aggregator, instances, args.samples, args.json)
            return 0
        if args.watch and not args.json:
            print(f"\n{time.strftime('%H:%M:%S')}  {settings.safe_redis_url}")
        print(json.dumps(view_json(view, instances), indent=2) if args.json
              else format_table(view, instances), flush=True)  # fmt: skip
        if not args.watch or stop.wait(args.watch):
            return 0
        view = aggregator.view()


def print_samples(
    aggregator: Aggregator, instances: PerInstance, count: int, as_json: bool
) -> None:
    """The last ``count`` raw response times per instance and region (milliseconds)."""
    samples = {
        region: aggregator.store.read_samples(sorted(by_instance), region, count)
        for region, by_instance in sorted(instances.items())
    }
    if as_json:
        print(json.dumps({"samples_seconds": samples}, indent=2))
        return
    for region, by_instance in samples.items():
        for instance_id, values in sorted(by_instance.items()):
            shown = " ".join(f"{v * 1000:.2f}" for v in values)
            print(f"{region}  {instance_id}  last {len(values)} ms: {shown}")


def cmd_health(args: argparse.Namespace) -> int:
    """Print the health JSON; exit 0 Healthy, 1 Degraded, 2 Unhealthy."""
    settings, view, _ = _read_view(args)
    health = evaluate(view, settings)
    print(json.dumps(health.report_json(), indent=2))
    return int(health.status)


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove instances whose heartbeat is older than the retention period."""
    settings = _settings(args)
    store = Store.from_settings(settings)
    removed = store.cleanup(settings.retention_period)
    reaped = store.reap(settings.instance_timeout)
    print(f"removed {len(removed)} instance(s) older than {settings.retention_period:g}s; "
          f"{len(reaped)} newly expired")  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the cluster exporter until SIGINT/SIGTERM."""
    from .server import ExporterService
    from .webconfig import load_web_config

    web_config = None
    if args.web_config_file:
        if args.certfile or args.keyfile:
            raise ConfigError("web_config_file: give TLS in the file (tls_server_config) "
                              "or with --certfile/--keyfile, not both")  # fmt: skip
        web_config = load_web_config(args.web_config_file)
    elif args.keyfile and not args.certfile:
        raise ConfigError("keyfile: needs --certfile")
    settings = _settings(args)
    service = ExporterService(settings, args.host, args.port, certfile=args.certfile,
                              keyfile=args.keyfile, web_config=web_config)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    scheme = "https" if service.tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {scheme}://{host}:{service.port}/metrics and /health "
          f"for {service.settings.safe_redis_url}", flush=True)  # fmt: skip
    stop.wait()
    service.stop()
    print("stopped", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: private Redis, 3 instances, the exporter, a live table."""
    from .demo import run_demo

    return run_demo(duration=args.duration, port=args.port, instances=args.instances)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="conduit-otel-cache",
        description="Cluster-wide cache statistics through OpenTelemetry, Redis and Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    def redis_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--redis-url", help="Redis URL (default: $CONDUIT_CACHE_STATS_REDIS_URL)")
        p.add_argument("--key-prefix", help="key prefix (default: conduit:)")
        return p

    p = redis_cmd("serve", "Run the cluster exporter: /metrics, /health, /-/healthy, /-/ready.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9464, help="port (default 9464)")
    p.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--keyfile", help="private key of --certfile (PEM)")
    p.add_argument("--web-config-file", metavar="FILE",
                   help="TLS and basic auth in the Prometheus exporter-toolkit web "
                        "configuration format (YAML)")  # fmt: skip
    p.set_defaults(func=cmd_serve)
    p = redis_cmd("stats", "Print cluster and per-instance statistics.")
    p.add_argument("--region", help="only this region")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--samples", type=int, metavar="N",
                   help="print the last N raw response times per instance and region")  # fmt: skip
    p.set_defaults(func=cmd_stats)
    p = redis_cmd("health", "Print health JSON; exit 0 Healthy, 1 Degraded, 2 Unhealthy.")
    p.set_defaults(func=cmd_health)
    p = redis_cmd("cleanup", "Remove instances whose heartbeat is older than retention_period.")
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser(
        "demo",
        help="Run a self-contained demo on a private Redis.",
        description="Start a private Redis, simulated instances and the exporter.",
    )
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    p.add_argument("--port", type=int, default=9464, help="exporter port (0: any free port)")
    p.add_argument("--instances", type=int, default=3, help="simulated instances (default 3)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conduit-otel-cache`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

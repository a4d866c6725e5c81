"""``conduit-otel-cache``: serve, demo, stats, health, cleanup."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .aggregate import Aggregator, ClusterView
from .config import ENV_PREFIX, ConfigError, Settings
from .health import evaluate
from .report import PerInstance, format_table, read_per_instance, view_json
from .shards import open_store
from .stopsignals import StopSignals
from .store import explain

log = logging.getLogger("conduit_otel_cache")


#: the options each command reads: each is a flag ``--<option-name>`` of that command, and
#: an environment variable (every other option does nothing in it)
CONNECTION = (
    "redis_url",
    "redis_cluster",
    "key_prefix",
    "socket_timeout",
    "connect_timeout",
    "connect_retries",
    "socket_keepalive",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
)
HEALTH = (
    "instance_timeout",
    "min_active_instances",
    "missing_instance_grace",
    "max_aggregation_latency",
    "max_drift_percent",
    "drift_min_requests",
    "max_memory_bytes",
    "data_loss_period",
)
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "serve": (
        *CONNECTION,
        *HEALTH,
        "aggregation_cache_ttl",
        "enable_aggregation_cache",
        "aggregation_interval",
        "max_instance_series",
        "retention_period",
        "cleanup_interval",
        "service_name",
        "instance_id",
        "otlp_endpoint",
        "otlp_interval",
        "spool_dir",
    ),
    "stats": (*CONNECTION, "instance_timeout"),
    "health": (*CONNECTION, *HEALTH),
    "cleanup": (*CONNECTION, "instance_timeout", "retention_period"),
}


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    given = {name: getattr(args, name) for name in COMMAND_OPTIONS[args.command]}
    settings = Settings.load(**{k: v for k, v in given.items() if v is not None}, **extra)
    if settings.redis_url is None:
        raise ConfigError("redis_url: required (--redis-url or CONDUIT_CACHE_STATS_REDIS_URL)")
    return settings


def _read_view(args: argparse.Namespace) -> tuple[Settings, ClusterView, Aggregator]:
    settings = _settings(args, aggregation_cache_ttl=0)
    aggregator = Aggregator(open_store(settings.connection), settings.aggregation)
    return settings, aggregator.view(), aggregator


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the cluster and per-instance table (or JSON); with ``--watch``, again and
    again until interrupted."""
    settings, view, aggregator = _read_view(args)
    stop = StopSignals() if args.watch else None
    while True:
        if not view.redis_up:
            raise CommandError(f"cannot read {settings.safe_redis_url}: {view.redis_error}")
        if args.region:
            if args.region not in view.regions:
                known = ", ".join(sorted(view.regions)) or "none yet"
                raise CommandError(f"no region {args.region!r} in the cluster (regions: {known})")
            view = dataclasses.replace(view, regions={args.region: view.regions[args.region]})
        instances = read_per_instance(aggregator, view.regions)
        if args.samples:
            print_samples(aggregator, instances, args.samples, args.json)
            return 0
        if args.watch and not args.json:
            print(f"\n{time.strftime('%H:%M:%S')}  {settings.safe_redis_url}")
        print(
            json.dumps(view_json(view, instances), indent=2)
            if args.json
            else format_table(view, instances),
            flush=True,
        )
        if stop is None or stop.wait(args.watch):
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
    health = evaluate(view, settings.health)
    print(json.dumps(health.report_json(), indent=2))
    return int(health.status)


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove instances whose heartbeat is older than the retention period."""
    settings = _settings(args)
    store = open_store(settings.connection)
    try:
        removed = store.cleanup(settings.retention_period)
        reaped = store.reap(settings.instance_timeout)
        acknowledged = store.acknowledge_losses() if args.acknowledge_losses else None
    except Exception as exc:
        raise CommandError(f"cannot clean up {settings.safe_redis_url}: {explain(exc)}") from None
    print(
        f"removed {len(removed)} instance(s) older than {settings.retention_period:g}s; "
        f"{len(reaped)} newly expired"
    )
    if acknowledged is not None:
        named = ", ".join(acknowledged) or "none"
        print(f"acknowledged the data losses of {len(acknowledged)} region(s): {named}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the cluster exporter until SIGINT/SIGTERM."""
    from .serve.service import ExporterService
    from .serve.webconfig import load_web_config, tls_files_config

    web_config = None
    if args.web_config_file:
        if args.certfile or args.keyfile:
            raise ConfigError(
                "web_config_file: give TLS in the file (tls_server_config) "
                "or with --certfile/--keyfile, not both"
            )
        web_config = load_web_config(args.web_config_file)
    elif args.keyfile and not args.certfile:
        raise ConfigError("keyfile: needs --certfile")
    elif args.certfile:
        web_config = tls_files_config(args.certfile, args.keyfile)
    if args.probes_without_auth and not (web_config and web_config.users):
        raise ConfigError("probes_without_auth: needs basic_auth_users in --web-config-file")
    settings = _settings(args)
    service = ExporterService(
        settings,
        args.host,
        args.port,
        web_config=web_config,
        probes_without_auth=args.probes_without_auth,
        render_process=True,
    )
    stop = StopSignals()
    signal.signal(signal.SIGHUP, lambda *_: service.reload_web_config())
    service.start(freeze=True)
    scheme = "https" if service.tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    push = (
        ""
        if service.push is None
        else (
            f", pushing over OTLP to {service.push.endpoint} every {service.push.interval:g}s as "
            f"service.instance.id {settings.instance_id}"
        )
    )
    print(
        f"serving {scheme}://{host}:{service.port}/metrics and /health "
        f"for {service.settings.safe_redis_url}{push}",
        flush=True,
    )
    stop.wait()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # its handler sets an event stop() sets too
    service.stop()
    print("stopped", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: private Redis, 3 instances, the exporter, a live table."""
    from .demo import run_demo

    return run_demo(duration=args.duration, port=args.port, instances=args.instances)


#: exit status of a usage or configuration error (sysexits' EX_USAGE): apart from health's
#: 0/1/2 and from 1, a command that could not do its work
EX_USAGE = 64


class CommandError(Exception):
    """A command could not do its work (exit 1, one line on stderr)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(
        prog="conduit-otel-cache",
        description="Cluster-wide cache statistics through OpenTelemetry, Redis and Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}

    def redis_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_ + " Every option below is also an environment "
            "variable, shown with it; a flag wins over its variable.",
        )
        for option in COMMAND_OPTIONS[name]:
            default = defaults[option]
            shown = "none" if default is None else str(default).lower()
            if isinstance(default, tuple):
                shown = ",".join(f"{b:g}" for b in default)
            if option == "instance_id":  # serve's: the OTLP push's service.instance.id
                shown = "$INSTANCE_ID, else <host name>-<pid>"
            p.add_argument(
                "--" + option.replace("_", "-"),
                dest=option,
                metavar="VALUE",
                help=f"${ENV_PREFIX}{option.upper()} (default: {shown})",
            )
        return p

    p = redis_cmd(
        "serve",
        "Run the cluster exporter: /metrics, /health, /-/healthy, /-/ready; "
        "with --otlp-endpoint it also pushes the cluster view over OTLP/HTTP.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9464, help="port (default 9464)")
    p.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--keyfile", help="private key of --certfile (PEM)")
    p.add_argument(
        "--web-config-file",
        metavar="FILE",
        help="TLS and basic auth in the Prometheus exporter-toolkit web "
        "configuration format (YAML); read again when it or a file it names "
        "changes, and on SIGHUP",
    )
    p.add_argument(
        "--probes-without-auth",
        action="store_true",
        help="serve /-/healthy and /-/ready without basic auth (the rest keeps it)",
    )
    p.set_defaults(func=cmd_serve)
    p = redis_cmd("stats", "Print cluster and per-instance statistics.")
    p.add_argument("--region", help="only this region")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument(
        "--samples",
        type=_positive,
        metavar="N",
        help="print the last N raw response times per instance and region",
    )
    p.set_defaults(func=cmd_stats)
    p = redis_cmd("health", "Print health JSON; exit 0 Healthy, 1 Degraded, 2 Unhealthy.")
    p.set_defaults(func=cmd_health)
    p = redis_cmd("cleanup", "Remove instances whose heartbeat is older than retention_period.")
    p.add_argument(
        "--acknowledge-losses",
        action="store_true",
        help="also acknowledge every data loss reported so far: health is no longer "
        "Degraded for them (conduit_cache_data_losses_total is unchanged)",
    )
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser(
        "demo",
        help="Run a self-contained demo on a private Redis.",
        description="Start a private Redis, simulated instances and the exporter.",
    )
    p.add_argument("--duration", type=float, default=None, help="stop N s after all report")
    p.add_argument("--port", type=int, default=9464, help="exporter port (0: any free port)")
    p.add_argument("--instances", type=int, default=3, help="simulated instances (default 3)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conduit-otel-cache`` command."""
    args = build_parser().parse_args(argv)
    # the one-shot commands say what failed in one line of their own; -v shows the log
    quiet = args.command in ("stats", "health", "cleanup") and not args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.CRITICAL if quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The demo: a private Redis, simulated application instances in their own processes,
the cluster exporter, and a refreshing summary table."""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time

from .config import Settings
from .embedded import RedisServer, free_port
from .report import format_table, read_per_instance
from .serve.service import ExporterService
from .stopsignals import StopSignals

HIT_RATIOS = (0.9, 0.75, 0.6, 0.85, 0.5)
REGIONS = ("ProviderResponses", "ModelCatalog", "Embeddings")


def run_worker(redis_url: str, instance_id: str, hit_ratio: float, rate: float) -> int:
    """Simulate one application instance until SIGTERM/SIGINT, then shut down cleanly."""
    from . import setup

    stop = StopSignals()
    stats = setup(
        redis_url=redis_url,
        instance_id=instance_id,
        flush_interval=1.0,
        instance_timeout=5.0,
        set_global=False,
    )
    rng = random.Random(instance_id)
    sizes = dict.fromkeys(REGIONS, 0)
    while not stop.wait(1.0 / rate):
        region = rng.choice(REGIONS)
        if rng.random() < hit_ratio:
            stats.record_hit(region, rng.lognormvariate(-7, 0.6))
        else:
            stats.record_miss(region, rng.lognormvariate(-4.5, 0.5))
            stats.record_set(region)
            sizes[region] += rng.randint(200, 4000)
            if sizes[region] > 2_000_000:
                stats.record_eviction(region)
                sizes[region] //= 2
        stats.set_size_bytes(region, sizes[region])
    stats.shutdown()
    return 0


def run_demo(duration: float | None = None, port: int = 9464, instances: int = 3) -> int:
    """Run everything until Ctrl-C or ``duration`` seconds; returns the exit code."""
    stop = StopSignals()
    redis_server = RedisServer().start()
    workers: list[subprocess.Popen[bytes]] = []
    service = None
    try:
        settings = Settings.load(
            redis_url=redis_server.url,
            instance_timeout=5.0,
            flush_interval=1.0,
            aggregation_cache_ttl=1.0,
        )
        port = port if port == 0 or _port_free(port) else free_port()
        service = ExporterService(settings, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{service.port}"
        print(f"private Redis:  {redis_server.url}")
        print(f"metrics:        {base}/metrics")
        print(f"health:         {base}/health  and  {base}/health/cache_statistics")
        print("stop with Ctrl-C" + (f" (or after {duration:g}s)" if duration else ""), flush=True)
        for n in range(instances):
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "conduit_otel_cache.demo",
                        "worker",
                        redis_server.url,
                        f"demo-{n + 1}",
                        str(HIT_RATIOS[n % len(HIT_RATIOS)]),
                        "200",
                    ]
                )
            )
        deadline = None  # counted from when every instance reported (a slow start-up)
        started = time.monotonic()
        while not stop.wait(2.0):
            view = service.aggregator.view()
            everyone = view.active_count >= instances or time.monotonic() - started > 60
            if deadline is None and duration is not None and everyone:
                deadline = time.monotonic() + duration
            health = service.health()
            print(f"\n{time.strftime('%H:%M:%S')}  health: {health.status.label}")
            per_instance = read_per_instance(service.aggregator, view.regions)
            print(format_table(view, per_instance), flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        ended = [worker.returncode for worker in workers]
        if any(ended):  # a worker that did not stop cleanly cannot have deregistered
            print(f"\nworkers' exit codes (-9: killed after 10 s): {ended}", flush=True)
        if service is not None:
            final = service.aggregator
            final.invalidate()
            print("\nfinal cluster totals (instances deregistered):")
            view = final.view()
            print(format_table(view, read_per_instance(final, view.regions)), flush=True)
            service.stop()
        redis_server.close()
    print("demo stopped cleanly", flush=True)
    return 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m conduit_otel_cache.demo worker URL ID HIT_RATIO RATE``."""
    parser = argparse.ArgumentParser(prog="conduit_otel_cache.demo")
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("redis_url")
    parser.add_argument("instance_id")
    parser.add_argument("hit_ratio", type=float)
    parser.add_argument("rate", type=float)
    args = parser.parse_args(argv)
    return run_worker(args.redis_url, args.instance_id, args.hit_ratio, args.rate)


if __name__ == "__main__":
    sys.exit(main())

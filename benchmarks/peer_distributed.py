"""The Redis-backed peer, prometheus-distributed-client, timed in its own venv.

Run by ``benchmarks.hot_path`` with ``benchmarks/.peer-venv/bin/python`` (the peer pins
prometheus-client 0.23, so it is never a dependency of the library). Prints one JSON
object: seconds per call (min and median of the repetitions) and, with ``--mode down``
(Redis stopped), the time per event and whether the call raised into the caller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from typing import Any


def per_call(stmt: str, env: dict[str, Any], number: int, repeat: int) -> dict[str, float]:
    runs = [r / number for r in timeit.repeat(stmt, globals=env, number=number, repeat=repeat)]
    return {"min": min(runs), "median": statistics.median(runs), "reps": repeat}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--mode", choices=["up", "down"], default="up")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import prometheus_client
    from prometheus_client import CollectorRegistry
    from prometheus_distributed_client import setup
    from prometheus_distributed_client.redis import Counter, Histogram
    from redis import Redis

    conn = Redis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=5)
    setup(redis=conn, redis_prefix="peerbench", redis_expire=3600)
    registry = CollectorRegistry()
    counter = Counter("peer_hits", "hits", ["region"], registry=registry)
    histogram = Histogram("peer_rt_seconds", "response time", ["region"], registry=registry)
    out: dict[str, Any] = {
        "prometheus_client": _version("prometheus-client"),
        "peer": _version("prometheus-distributed-client"),
        "redis_py": _version("redis"),
        "mode": args.mode,
    }
    if args.mode == "up":
        child = counter.labels(region="ProviderResponses")
        hchild = histogram.labels(region="ProviderResponses")
        child.inc()
        hchild.observe(0.0012)
        env = {"inc": child.inc, "observe": hchild.observe}
        out["inc"] = per_call("inc()", env, args.number, args.repeat)
        out["observe"] = per_call("observe(0.0012)", env, max(1, args.number // 10), args.repeat)
        local = prometheus_client.Counter("local_hits", "hits", ["region"], registry=registry)
        lchild = local.labels(region="ProviderResponses")
        out["local_inc"] = per_call("inc()", {"inc": lchild.inc}, 200_000, args.repeat)
        total = conn.hget("peerbench_peer_hits", '_total:{"region":"ProviderResponses"}')
        out["stored_total"] = float(total) if total is not None else None
    else:
        child = counter.labels(region="ProviderResponses")
        events, raised, errors = 20, 0, set()
        start = time.perf_counter()
        for _ in range(events):
            try:
                child.inc()
            except Exception as exc:
                raised += 1
                errors.add(type(exc).__name__)
        out["down"] = {
            "seconds_per_event": (time.perf_counter() - start) / events,
            "events": events,
            "raised": raised,
            "errors": sorted(errors),
        }
    json.dump(out, sys.stdout)
    print()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()

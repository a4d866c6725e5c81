"""Flush: us per flush of one instance and Redis round trips, against the seed's design.

``python -m benchmarks.flush [--quick]``

The seed's ``FlushBatchAsync`` pipelines one ``HINCRBY`` per field per region plus a
``ZADD`` heartbeat; ours is one ``EVALSHA`` of ``flush.lua`` that stores cumulative values,
beats the heartbeat and applies the change to the cluster totals.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from conduit_otel_cache import setup
from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.store import Store

from .common import (
    RoundTrips,
    ServerCommands,
    Target,
    Timing,
    arguments,
    plain_client,
    show,
    show_targets,
)

RT = 0.0012


def _timed_loop(step: Callable[[], object], reps: int, between: Callable[[int], object]) -> Timing:
    times: list[float] = []
    for i in range(reps):
        between(i)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), reps)


def _count(
    server: ServerCommands, step: Callable[[], object], between: Callable[[int], object], n: int
) -> tuple[float, float, dict[str, int]]:
    """Round trips, server-side commands and Redis CPU us (``cpu_us``) per ``step()``
    over ``n`` steps."""
    with server.counting() as cmds, RoundTrips.counting() as trips:  # INFO calls not counted
        for i in range(n):
            between(i)
            step()
    # ``between`` does no Redis I/O in any caller, so every trip belongs to a step
    per = {k: v // n for k, v in cmds.items() if k not in ("total", "cpu_us")}
    per["cpu_us"] = round(cmds["cpu_us"] / n)
    return trips[0] / n, cmds["total"] / n, per


def seed_flush(client: Any, instance_id: str, deltas: Mapping[str, Mapping[str, Any]]) -> None:
    """The seed's FlushBatchAsync: one pipelined HINCRBY per field per region + heartbeat."""
    pipe = client.pipeline(transaction=False)
    for region, fields in deltas.items():
        key = f"conduit:cache:stats:{instance_id}:{region}"
        for name, value in fields.items():
            if name == "rt_sum":
                pipe.hincrbyfloat(key, name, value)
            elif name == "size_bytes":
                pipe.hset(key, name, value)
            else:
                pipe.hincrby(key, name, value)
    pipe.zadd("conduit:cache:instances", {instance_id: time.time()})
    pipe.execute()


def run(quick: bool = False) -> list[Target]:
    reps = 50 if quick else 200
    print(f"\n## 2. Flush of one instance ({reps} flushes per case)", flush=True)
    rows: list[list[object]] = []
    targets: list[Target] = []
    steady_ok = True
    with RedisServer() as server:
        client = plain_client(server.url)
        cmds = ServerCommands(client)
        for n_regions in (10, 100):
            regions = [f"region{j:03d}" for j in range(n_regions)]
            stats = setup(
                redis_url=server.url,
                instance_id=f"bench-flush-{n_regions}",
                set_global=False,
                flush_interval=None,
                aggregation_cache_ttl=0,
                max_regions=max(100, n_regions),
            )
            for j, region in enumerate(regions):
                for k in range(20):
                    stats.record_hit(region, RT * (1 + (j + k) % 7))
                stats.record_miss(region, RT * 5)
                stats.record_set(region)
                stats.set_size_bytes(region, 1_048_576)
            assert stats.exporter is not None
            store = stats.exporter.store
            captured: dict[str, Any] = {}
            real_flush = store.flush

            def capture(
                *args: Any, _real: Any = real_flush, _into: dict[str, Any] = captured, **kw: Any
            ) -> Any:
                _into["args"], _into["kw"] = args, kw
                return _real(*args, **kw)

            store.flush = capture  # type: ignore[method-assign]
            stats.flush()
            stats.flush()  # steady state: script loaded, connection open
            store.flush = real_flush  # type: ignore[method-assign]

            def touch(i: int, _stats: Any = stats, _regions: list[str] = regions) -> None:
                for region in _regions:
                    _stats.record_hit(region, RT)

            t_handle = _timed_loop(stats.flush, reps, touch)
            trips, total, per = _count(cmds, stats.flush, touch, min(reps, 50))
            evalsha = per.get("evalsha", 0)
            steady_ok &= trips == 1 and evalsha == 1 and "eval" not in per
            rows.append(
                [
                    f"ours: stats.flush() ({n_regions} regions)",
                    *t_handle.us(),
                    f"{trips:g}",
                    f"{evalsha} EVALSHA",
                    f"{total:,.0f}",
                    f"{per['cpu_us']:,}",
                ]
            )

            # the raw store call, with the fields the handle sends
            instance_id, token, fields = captured["args"]
            fields = {r: dict(f) for r, f in fields.items()}
            raw_store = Store(plain_client(server.url))
            raw_store.flush(instance_id + "-raw", token, fields, **captured["kw"])

            def bump(i: int, _fields: dict[str, dict[str, str]] = fields) -> None:
                for f in _fields.values():
                    f["hit_count"] = str(int(f["hit_count"]) + 1)

            def raw(
                _s: Store = raw_store,
                _id: str = instance_id + "-raw",
                _t: str = token,
                _f: dict[str, dict[str, str]] = fields,
                _kw: dict[str, Any] = captured["kw"],
            ) -> None:
                _s.flush(_id, _t, _f, **_kw)

            t_raw = _timed_loop(raw, reps, bump)
            trips, total, per = _count(cmds, raw, bump, min(reps, 50))
            rows.append(
                [
                    f"ours: store.flush(...) ({n_regions} regions)",
                    *t_raw.us(),
                    f"{trips:g}",
                    f"{per.get('evalsha', 0)} EVALSHA",
                    f"{total:,.0f}",
                    f"{per['cpu_us']:,}",
                ]
            )

            # the seed's design: HINCRBY deltas per field per region + ZADD, pipelined
            n_fields = len(next(iter(fields.values())))
            deltas = {
                r: {k: (0.0012 if k == "rt_sum" else 1) for k in f} for r, f in fields.items()
            }
            seed_client = plain_client(server.url)

            def seed(_c: Any = seed_client, _d: Any = deltas) -> None:
                seed_flush(_c, "bench-seed", _d)

            seed()
            t_seed = _timed_loop(seed, reps, lambda i: None)
            trips, total, per = _count(cmds, seed, lambda i: None, min(reps, 50))
            rows.append(
                [
                    f"seed: pipelined HINCRBY x field + ZADD ({n_regions} regions)",
                    *t_seed.us(),
                    f"{trips:g}",
                    f"{sum(per.values()) - per['cpu_us']:,} commands ({n_fields} fields/region)",
                    f"{total:,.0f}",
                    f"{per['cpu_us']:,}",
                ]
            )
            rows.append(
                [
                    f"ours / seed, {n_regions} regions (median)",
                    f"{t_handle.median / t_seed.median:.2f}x (handle)",
                    f"{t_raw.median / t_seed.median:.2f}x (raw)",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            seed_client.close()
            raw_store.close()
            stats.shutdown()
        client.close()
    show(
        "Flush: us per flush, Redis round trips per flush",
        [
            "flush",
            "min us",
            "median us",
            "round trips",
            "client commands",
            "server commands (incl. inside Lua)",
            "Redis CPU us per flush",
        ],
        rows,
    )
    targets.append(
        Target(
            "1 EVALSHA (1 round trip) per flush in steady state",
            steady_ok,
            "counted: client socket writes + INFO commandstats",
        )
    )
    show_targets("Flush targets", targets)
    return targets


def main() -> None:
    args = arguments(__doc__ or "")
    run(quick=args.quick)


if __name__ == "__main__":
    main()

"""Run every benchmark and print a summary: ``python -m benchmarks [--quick] [--no-peer]``.

Figures, not pass/fail: the exit code is 0 whether or not a target is met.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

from conduit_otel_cache.embedded import redis_server_binary

from . import (
    end_to_end,
    fleet,
    flush,
    flush_in_app,
    hot_path,
    import_time,
    results,
    scale,
    scrape,
    spool,
    work_horse,
)
from .common import Target, show_targets

#: every benchmark by its --only name, in the order they run: what an application owner
#: asks first
BENCHMARKS = {
    "e2e": end_to_end,
    "hot": hot_path,
    "flush": flush,
    "app-flush": flush_in_app,
    "scale": scale,
    "fleet": fleet,
    "scrape": scrape,
    "import": import_time,
    "horse": work_horse,
    "spool": spool,
}


def machine() -> str:
    try:
        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        redis_version = out.split("v=")[1].split()[0]
    except Exception as exc:
        redis_version = f"unknown ({type(exc).__name__})"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores (load {load} at the start), {platform.machine()}, "
        f"Python {platform.python_version()}, "
        f"redis-server {redis_version}, {platform.system()} {platform.release()}, "
        f"{datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small N, few reps")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip prometheus-distributed-client (needs PyPI)"
    )
    parser.add_argument(
        "--only",
        choices=list(BENCHMARKS),
        action="append",
        help="run only these",
    )
    args = parser.parse_args()
    only = set(args.only or BENCHMARKS)
    started = time.perf_counter()
    print(f"# conduit-otel-cache benchmarks{' (--quick)' if args.quick else ''}")
    machine_line, command = machine(), " ".join(["python -m benchmarks", *sys.argv[1:]])
    print(f"machine: {machine_line}")
    print(f"command: {command}", flush=True)
    measured: dict[str, list[Target]] = {}
    for name, module in BENCHMARKS.items():
        if name in only:
            peer = {"peer": not args.no_peer} if module is hot_path else {}
            measured[name] = module.run(quick=args.quick, **peer)
    targets = [t for ts in measured.values() for t in ts]
    if not args.quick:  # the figures README quotes (benchmarks/results.py)
        results.save(measured, machine_line, command, order=list(BENCHMARKS))
        results.write_readme(results.load())
    print("\n## Summary")
    show_targets("All targets", targets)
    met = sum(1 for t in targets if t.met)
    missed = sum(1 for t in targets if t.met is False)
    print(
        f"\n{met} met, {missed} missed, {len(targets) - met - missed} not judged; "
        f"total time {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()

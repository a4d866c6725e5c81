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
    flush,
    flush_in_app,
    hot_path,
    import_time,
    scale,
    scrape,
    spool,
    work_horse,
)
from .common import Target, show_targets


def machine() -> str:
    try:
        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        redis_version = out.split("v=")[1].split()[0]
    except Exception as exc:
        redis_version = f"unknown ({type(exc).__name__})"
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
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
        choices=["hot", "flush", "scale", "scrape", "horse", "import", "e2e", "app-flush", "spool"],
        action="append",
        help="run only these",
    )
    args = parser.parse_args()
    only = set(
        args.only
        or ["hot", "flush", "scale", "scrape", "horse", "import", "e2e", "app-flush", "spool"]
    )
    started = time.perf_counter()
    print(f"# conduit-otel-cache benchmarks{' (--quick)' if args.quick else ''}")
    print(f"machine: {machine()}")
    print(f"command: {' '.join(['python -m benchmarks', *sys.argv[1:]])}", flush=True)
    targets: list[Target] = []
    if "e2e" in only:  # first: what an application owner asks
        targets += end_to_end.run(quick=args.quick)
    if "hot" in only:
        targets += hot_path.run(quick=args.quick, peer=not args.no_peer)
    if "flush" in only:
        targets += flush.run(quick=args.quick)
    if "app-flush" in only:
        targets += flush_in_app.run(quick=args.quick)
    if "scale" in only:
        targets += scale.run(quick=args.quick)
    if "scrape" in only:
        targets += scrape.run(quick=args.quick)
    if "import" in only:
        targets += import_time.run(quick=args.quick)
    if "horse" in only:
        targets += work_horse.run(quick=args.quick)
    if "spool" in only:
        targets += spool.run(quick=args.quick)
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

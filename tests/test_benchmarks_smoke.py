"""The benchmarks still run (a quick smoke run, without the PyPI-installed peer)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_quick_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-peer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a smoke run, not a timing: generous for a loaded machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for header in (
        "### Hot path: ns per call",
        "### Hot path ratios",
        "### Hot path with cold caches: ns per call right after a",
        "### Redis stopped: time per event and errors raised into the caller",
        "### Flush: us per flush, Redis round trips and Redis CPU per flush",
        "### Scrape (/metrics via ExporterService registry) and cluster totals",
        "### Per-instance pass, seed read-time sum, Redis memory",
        "### Growth: figure at 10x / figure before (median)",
        "### Exporter process RSS",
        "### Fleet: Redis CPU per flush, measured",
        "### Fleet: Redis CPU of a serve replica's reads",
        "### Fleet: the per-instance pass at",
        "### Fleet: Redis CPU at",
        "### Fleet: where a Redis Cluster's CPU goes",
        "### Fleet targets",
        "### GET /metrics at 100 x 10: ms p50 / p99",
        "### Data age a scrape sees",
        "### serve's cost at 100 x 10",
        "### Peer: prometheus_client multiprocess mode",
        "### Work horse per job: ms per job",
        "### Import time (fresh interpreter, median ms)",
        "### End to end: gunicorn gthread 2x4 on one core",
        "### End to end: the library's own threads (the flush, the heartbeat) in the workers",
        "### End to end, side by side: each variant and the uninstrumented service",
        "### Flush inside the application: CPU us per flush",
        "### Probe thread (sleeps 1 ms in a loop)",
        "### Spool size of one instance (one thread; a record per thread and region)",
        "### All targets",
    ):
        assert header in out, f"missing {header!r} in:\n{out[-3000:]}"
    assert re.search(r"1 EVALSHA \(1 round trip\) per flush in steady state\s*\|\s*met\s*\|", out)
    # the cold-cache call is judged against prometheus_client's observe()
    assert re.search(r"with cold caches <= 1\.0x Histogram\.observe\(\).*\| \d+\.\d\dx: ", out)
    # the layout that would write an instance in one call: measured on a Redis Cluster
    assert re.search(r"one flush\.lua call per flush: every key of an.*\|\s+[\d,]+ \|", out)
    # the workers' thread accounting sees the flushes of the 1 s variant (3 s of load)
    flushing = re.search(r"\| conduit, flush_interval 1 s +\| +([\d.]+) \|", out)
    assert flushing and float(flushing.group(1)) > 0, out[-3000:]
    # side by side: the uninstrumented service beside itself, the floor of any recording and
    # conduit beside it, measured
    labels = (r"no instrumentation \(A/A\)", r"conduit, defaults", r"redis-py .* a dict")
    for label in labels:
        assert re.search(rf"\| {label}.* +\| +\d\.\d{{3}} \(", out), out[-3000:]
    # the floor of any recording, and conduit beyond it, in the throughput target's figures
    assert re.search(r"cheapest recording of each event -?\d+\.\d %, conduit beyond that", out)


def quick_run(module: str) -> subprocess.CompletedProcess[str]:
    """``python -m <module> --quick``, which must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_serve_memory_quick_run() -> None:
    """``python -m benchmarks.serve_memory`` (what deploy/kubernetes sizes memory from) runs
    and sees the render process beside the serving one."""
    proc = quick_run("benchmarks.serve_memory")
    (line,) = proc.stdout.splitlines()
    result = json.loads(line)
    assert result["N x R"] == "100 x 10"
    for phase in ("idle", "4 scrapers", "4 scrapers + 200 slow"):
        sample = result[phase]
        assert sample["rss_main"] > 0 and sample["rss_child"] > 0, result
        assert sample["pss_sum"] < sample["rss_main"] + sample["rss_child"], result


def test_otlp_push_quick_run() -> None:
    """``python -m benchmarks.otlp_push`` runs: a push taken by its receiver at 100 x 10."""
    proc = quick_run("benchmarks.otlp_push")
    assert re.search(r"\| 100 x 10 +\| +\d{3,} \|", proc.stdout), proc.stdout

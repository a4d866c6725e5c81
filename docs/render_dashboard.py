"""Render docs/dashboard.png: the Grafana dashboard's panels drawn from real data.

Starts what the end-to-end test starts (a private redis-server, `serve`, a real Prometheus
scraping it every second, instances recording traffic with tests/traffic_process.py), changes
the cluster while it runs (a third instance joins, one shuts down), then runs every query of
grafana/conduit-cache-statistics.json through Prometheus's /api/v1/query_range and draws the
panels at their dashboard positions with matplotlib. matplotlib is a dev-time tool, not a
dependency of the package:

    pip install matplotlib && python docs/render_dashboard.py [--seconds 90]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.gridspec import GridSpec

from conduit_otel_cache.embedded import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "conduit-cache-statistics.json"
TRAFFIC = ROOT / "tests" / "traffic_process.py"
JOB = "conduit-cache"
RATE_INTERVAL = "10s"


def promql(expr: str) -> str:
    for variable, value in (("$__rate_interval", RATE_INTERVAL), ("$job", JOB), ("$region", ".+")):
        expr = expr.replace(variable, value)
    return expr


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def start_instance(url: str, instance_id: str, hits: int, misses: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(TRAFFIC), url, instance_id, str(hits), str(misses)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "recording"
    return proc


def stop_instance(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("stop\n")
    proc.stdin.close()
    proc.wait(15)


def collect(seconds: float) -> tuple[dict[str, Any], float, float]:
    """Run the stack for ``seconds`` and return {expr: query_range result}, start, end."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("prometheus not found: apt-get install prometheus")
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    tmp = Path(tempfile.mkdtemp(prefix="conduit-render-"))
    procs: list[subprocess.Popen[Any]] = []
    with RedisServer() as redis_server:
        try:
            serve_port, prom_port = free_port(), free_port()
            env = {**os.environ, "CONDUIT_CACHE_STATS_AGGREGATION_CACHE_TTL": "0",
                   "CONDUIT_CACHE_STATS_AGGREGATION_INTERVAL": "1"}  # fmt: skip
            serve = subprocess.Popen(
                [sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url",
                 redis_server.url, "--port", str(serve_port)],
                stdout=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            procs.append(serve)
            (tmp / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                f"scrape_configs:\n  - job_name: {JOB}\n"
                f"    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n"
            )
            procs.append(subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=error"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
            ))  # fmt: skip
            base = f"http://127.0.0.1:{prom_port}"
            wait("Prometheus", lambda: urllib.request.urlopen(base + "/-/ready").status == 200)
            start = time.time()
            instances = {"api-1": start_instance(redis_server.url, "api-1", 8, 2),
                     "api-2": start_instance(redis_server.url, "api-2", 4, 6)}  # fmt: skip
            procs.extend(instances.values())
            time.sleep(seconds / 3)  # a scenario in real time, not a wait for a condition
            instances["api-3"] = start_instance(redis_server.url, "api-3", 9, 1)
            procs.append(instances["api-3"])
            time.sleep(seconds / 3)
            stop_instance(instances["api-2"])
            time.sleep(seconds / 3)
            end = time.time()
            results = {}
            for expr in exprs:
                query = urllib.parse.urlencode(
                    {"query": promql(expr), "start": start, "end": end, "step": "1"}
                )
                reply = get_json(f"{base}/api/v1/query_range?{query}")
                assert reply["status"] == "success", reply
                results[expr] = reply["data"]["result"]
            return results, start, end
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)


SCALE = {"percentunit": (100.0, "%"), "suffix: pts": (1.0, "points"), "bytes": (1 / 1024, "KiB"),
         "s": (1.0, "s"), "ops": (1.0, "ops/s"), "short": (1.0, ""), "none": (1.0, "")}  # fmt: skip


def render(results: dict[str, Any], start: float, end: float, out: Path) -> None:
    board = json.loads(DASHBOARD.read_text())
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    fig = plt.figure(figsize=(18, height * 0.42), facecolor="#111217")
    grid = GridSpec(height, 24, figure=fig, hspace=2.5, wspace=2.0, top=0.96, bottom=0.03)
    plt.rcParams.update({"text.color": "#ccccdc", "axes.labelcolor": "#ccccdc",
                         "xtick.color": "#8e8e9e", "ytick.color": "#8e8e9e"})  # fmt: skip
    fig.suptitle(f"{board['title']} — real data, {end - start:.0f} s", color="#ccccdc", y=0.995)
    for panel in board["panels"]:
        pos = panel["gridPos"]
        area = grid[pos["y"] : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[pos["y"], :])
            ax.axis("off")
            ax.text(0, 0.5, panel["title"], fontsize=12, weight="bold", va="center")
            continue
        ax = fig.add_subplot(area, facecolor="#181b1f")
        ax.set_title(panel["title"], fontsize=9, loc="left", color="#ccccdc")
        defaults = panel["fieldConfig"]["defaults"]
        factor, label = SCALE.get(defaults["unit"], (1.0, defaults["unit"]))
        if panel["title"] == "Redis memory":
            factor, label = 1 / 2**20, "MiB"
        series = [(target, s) for target in panel["targets"] for s in results[target["expr"]]]
        if panel["type"] == "stat":
            values = [float(v) for _, s in series for _, v in s["values"][-1:]]
            text = "no data" if not values else _stat_text(panel, values[-1], factor, label)
            ax.text(0.5, 0.45, text, fontsize=18, ha="center", va="center", weight="bold",
                    transform=ax.transAxes)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        elif panel["type"] == "table":
            rows = sorted(
                (s["metric"].get("region", ""), s["metric"].get("instance_id", ""),
                 f"{float(s['values'][-1][1]) * factor:.1f}{label}")
                for _, s in series
                if float(s["values"][-1][0]) >= end - 2  # an instant query at the end
            )  # fmt: skip
            ax.axis("off")
            table = ax.table(cellText=rows, colLabels=["Region", "Instance", "Hit ratio"],
                             loc="upper center", cellLoc="left")  # fmt: skip
            for cell in table.get_celld().values():
                cell.set_facecolor("#181b1f")
                cell.set_edgecolor("#2c3235")
                cell.get_text().set_color("#ccccdc")
        else:
            for target, s in series:
                legend = target["legendFormat"]
                for key, value in s["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) * factor for _, v in s["values"]]
                ys = [y if math.isfinite(y) else math.nan for y in ys]
                ax.plot(xs, ys, linewidth=1.2, label=legend or None)
            top = max((y for _, s in series for _, v in s["values"]
                       if math.isfinite(y := float(v) * factor)), default=0.0)  # fmt: skip
            for step in defaults["thresholds"]["steps"][1:]:
                limit = step["value"] * factor
                if limit <= 3 * top:  # a far-away threshold would flatten the data
                    ax.axhline(limit, color="#f2495c", linestyle="--", lw=0.8)
                else:
                    ax.set_title(f"threshold {limit:g} {label}", fontsize=7, loc="right")
            ax.set_xlim(0, end - start)
            ax.set_ylabel(label, fontsize=8)
            ax.set_xlabel("seconds", fontsize=8)
            ax.tick_params(labelsize=7)
            if series:
                ax.legend(fontsize=6, loc="upper left", ncol=2, facecolor="#181b1f",
                          edgecolor="#2c3235", labelcolor="#ccccdc")  # fmt: skip
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor(), bbox_inches="tight")


def _stat_text(panel: dict[str, Any], value: float, factor: float, label: str) -> str:
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        text = mapping.get("options", {}).get(str(int(value)), {}).get("text")
        if text is not None and value == int(value):
            return str(text)
    if label == "s":
        return f"{value:.1f} s"
    return f"{value * factor:g}{label}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    results, start, end = collect(args.seconds)
    render(results, start, end, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

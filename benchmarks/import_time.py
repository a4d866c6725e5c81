"""What ``import conduit_otel_cache`` costs an application, beside the two imports it cannot
avoid (``opentelemetry.sdk.metrics`` and ``redis``), each in fresh interpreters.

``python -m benchmarks.import_time [--quick]``
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from .common import Target, arguments, judged, show

PROBE = """
import time
t = time.perf_counter()
{before}
middle = time.perf_counter()
{after}
print(time.perf_counter() - middle if {split} else middle - t)
"""
#: the target: at most the two unavoidable imports plus this much
BUDGET_S = 0.050


#: as an installed package runs: from bytecode (pip compiles it at install; an editable
#: checkout gets it at its first import unless PYTHONDONTWRITEBYTECODE forbids writing it)
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _seconds(before: str, after: str = "", split: bool = False, runs: int = 7) -> float:
    code = PROBE.format(before=before or "pass", after=after or "pass", split=split)
    times = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=_ENV).stdout)
        for _ in range(runs + 1)
    ]  # fmt: skip
    return statistics.median(times[1:])  # the first run wrote any bytecode missing


def run(quick: bool = False) -> list[Target]:
    runs = 3 if quick else 7
    sdk = _seconds("import opentelemetry.sdk.metrics", runs=runs)
    redis = _seconds("import redis", runs=runs)
    both = _seconds("import opentelemetry.sdk.metrics, redis", runs=runs)
    ours = _seconds("import opentelemetry.sdk.metrics, redis", "import conduit_otel_cache",
                    split=True, runs=runs)  # fmt: skip
    alone = _seconds("import conduit_otel_cache", runs=runs)
    show(
        "Import time (fresh interpreter, median ms)",
        ["import", "ms"],
        [
            ["opentelemetry.sdk.metrics", f"{sdk * 1000:.0f}"],
            ["redis", f"{redis * 1000:.0f}"],
            ["both", f"{both * 1000:.0f}"],
            ["conduit_otel_cache after both", f"{ours * 1000:.0f}"],
            ["conduit_otel_cache alone", f"{alone * 1000:.0f}"],
        ],
    )
    return judged(
        "Import targets",
        [Target(f"import conduit_otel_cache: at most the two imports + {BUDGET_S * 1000:.0f} ms",
                ours <= BUDGET_S, f"+{ours * 1000:.0f} ms on top of {both * 1000:.0f} ms")],
        quick,
    )  # fmt: skip


if __name__ == "__main__":
    run(quick=arguments(__doc__ or "").quick)

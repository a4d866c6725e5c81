"""Shared helpers: timing with repetitions, Redis round-trip counting, tables, targets."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.connection

from conduit_otel_cache.config import Settings


@dataclasses.dataclass(frozen=True)
class Timing:
    """Min and median of several repetitions, in seconds per operation."""

    min: float
    median: float
    reps: int

    def ns(self) -> tuple[str, str]:
        return f"{self.min * 1e9:,.0f}", f"{self.median * 1e9:,.0f}"

    def us(self) -> tuple[str, str]:
        return f"{self.min * 1e6:,.1f}", f"{self.median * 1e6:,.1f}"

    def ms(self) -> tuple[str, str]:
        return fmt_ms(self.min), fmt_ms(self.median)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.2f}" if ms < 100 else f"{ms:,.0f}"


def per_call(stmt: str, env: dict[str, Any], number: int, repeat: int) -> Timing:
    """Seconds per execution of ``stmt`` (timeit.repeat: ``repeat`` runs of ``number``)."""
    runs = timeit.repeat(stmt, globals=env, number=number, repeat=repeat)
    per = [r / number for r in runs]
    return Timing(min(per), statistics.median(per), repeat)


def per_call_auto(stmt: str, env: dict[str, Any], repeat: int, seconds: float) -> Timing:
    """Like :func:`per_call`, with the number of calls per run chosen so that one run
    takes about ``seconds``."""
    trial = 1000
    spent = timeit.timeit(stmt, globals=env, number=trial)
    number = max(trial, min(2_000_000, int(trial * seconds / max(spent, 1e-9))))
    return per_call(stmt, env, number, repeat)


def measure_trips(
    fn: Callable[[], object], reps: int, budget: float = 30.0
) -> tuple[Timing, float]:
    """:func:`measure`, plus the Redis round trips per call counted over the same calls."""
    with RoundTrips.counting() as trips:
        timing = measure(fn, reps, budget)
    return timing, trips[0] / timing.reps


def measure(
    fn: Callable[[], object],
    reps: int,
    budget: float = 30.0,
    before: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn()`` up to ``reps`` times (at least once; fewer when past ``budget`` s).
    ``before`` runs untimed before each repetition."""
    times: list[float] = []
    deadline = time.monotonic() + budget
    while len(times) < reps and (not times or time.monotonic() < deadline):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), len(times))


# -- Redis round trips, counted for real --------------------------------------------------


class RoundTrips:
    """Counts every request written to a Redis socket by redis-py in this process (a
    pipeline is one write, so one round trip), by wrapping ``send_packed_command``."""

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        original = redis.connection.Connection.send_packed_command

        def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            cls.count += 1
            original(self, command, check_health)

        redis.connection.Connection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        cls._installed = True

    @classmethod
    @contextmanager
    def counting(cls) -> Iterator[list[int]]:
        """Yields a one-element list holding the number of round trips once the block ends."""
        cls.install()
        result = [0]
        start = cls.count
        try:
            yield result
        finally:
            result[0] = cls.count - start


class ServerCommands:
    """Commands the server executed (``INFO stats total_commands_processed``; counts the
    commands a Lua script runs too) and per-command calls (``INFO commandstats``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._overhead = 0
        a = self._total()
        b = self._total()
        self._overhead = b - a  # the INFO call itself

    def _total(self) -> int:
        return int(self.client.info("stats")["total_commands_processed"])

    def _calls(self) -> dict[str, int]:
        return {k: int(v["calls"]) for k, v in self.client.info("commandstats").items()}

    def _cpu_us(self) -> int:
        cpu = self.client.info("cpu")
        return round((float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6)

    @contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        """Yields a dict filled at the end: ``total``, ``cpu_us`` (the server process's
        CPU time, protocol handling included) plus ``cmdstat_*`` call deltas."""
        result: dict[str, int] = {}
        calls0 = self._calls()
        cpu0 = self._cpu_us()
        total0 = self._total()
        try:
            yield result
        finally:
            total1 = self._total()
            cpu1 = self._cpu_us()
            calls1 = self._calls()
            result["total"] = total1 - total0 - self._overhead
            result["cpu_us"] = cpu1 - cpu0
            for name, n in calls1.items():
                delta = n - calls0.get(name, 0)
                if delta and name != "cmdstat_info":
                    result[name.removeprefix("cmdstat_")] = delta


def plain_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def settings(**options: Any) -> Settings:
    """``Settings.load`` with the options this version of the library knows (others are
    dropped, so the benchmarks run across versions)."""
    known = {f.name for f in dataclasses.fields(Settings)}
    return Settings.load(environ={}, **{k: v for k, v in options.items() if k in known})


# -- output -------------------------------------------------------------------------------


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown pipe table (readable in a terminal, pasteable into the README)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str], right: bool) -> str:
        parts = [
            c.rjust(w) if right and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "| " + " | ".join(parts) + " |"

    out = [f"\n### {title}\n", line(cells[0], False)]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [line(r, True) for r in cells[1:]]
    return "\n".join(out)


def show(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(table(title, headers, rows), flush=True)


@dataclasses.dataclass(frozen=True)
class Target:
    """One target and whether this run met it."""

    name: str
    met: bool | None  # None: not measured
    detail: str

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("met" if self.met else "MISSED")


def show_targets(title: str, targets: Sequence[Target]) -> None:
    show(title, ["target", "result", "figure"], [[t.name, t.verdict, t.detail] for t in targets])


def judged(title: str, targets: list[Target], quick: bool) -> list[Target]:
    """Show ``targets``; a quick run (sizes reduced) judges none of them."""
    if quick:
        targets = [Target(t.name + " (quick: sizes reduced)", None, t.detail) for t in targets]
    show_targets(title, targets)
    return targets


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def arguments(description: str, peer: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: small N, few reps")
    if peer:
        parser.add_argument(
            "--no-peer",
            action="store_true",
            help="skip prometheus-distributed-client (its venv needs PyPI)",
        )
    return parser.parse_args()

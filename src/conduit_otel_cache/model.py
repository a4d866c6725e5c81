"""The one statistics type shared by the local, cluster and per-instance views."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ResponseTimes:
    """A response-time histogram: upper bounds in seconds, per-bucket (not cumulative) counts.

    ``counts`` has one more entry than ``bounds``: the last is the ``+Inf`` bucket.
    Histograms with the same bounds add up exactly, so cluster quantiles are real.
    """

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,)
    sum: float = 0.0

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)

    def merge(self, other: ResponseTimes) -> ResponseTimes:
        """The sum of two histograms (bounds are united when they differ)."""
        if other.count == 0 and other.sum == 0:
            return self
        if self.count == 0 and self.sum == 0:
            return other
        if self.bounds == other.bounds:
            counts = tuple(a + b for a, b in zip(self.counts, other.counts))
            return ResponseTimes(self.bounds, counts, self.sum + other.sum)
        merged: dict[float, int] = {}
        for hist in (self, other):
            for bound, n in zip((*hist.bounds, math.inf), hist.counts):
                merged[bound] = merged.get(bound, 0) + n
        bounds = tuple(sorted(b for b in merged if b != math.inf))
        counts = tuple(merged.get(b, 0) for b in (*bounds, math.inf))
        return ResponseTimes(bounds, counts, self.sum + other.sum)

    def quantile(self, q: float) -> float | None:
        """Estimate quantile ``q`` (0-1) the way Prometheus' ``histogram_quantile`` does."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        lower = 0.0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            if seen + n >= rank and n > 0:
                if bound == math.inf:
                    return self.bounds[-1] if self.bounds else None
                return lower + (bound - lower) * (rank - seen) / n
            seen += n
            lower = bound
        return self.bounds[-1] if self.bounds else None

    def to_fields(self) -> dict[str, str]:
        """Hash fields for Redis: ``rt_sum`` and ``le:<bound>`` per non-empty bucket."""
        fields = {"rt_sum": repr(float(self.sum))}
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            if n:
                fields[f"le:{_fmt_bound(bound)}"] = str(n)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str], bounds: Iterable[float] = ()) -> ResponseTimes:
        """Inverse of :meth:`to_fields`, with empty buckets at ``bounds`` filled in;
        raises ``ValueError`` on malformed data."""
        buckets: dict[float, int] = dict.fromkeys(bounds, 0)
        known = len(buckets)
        for key, value in fields.items():
            if key[:3] == "le:":
                buckets[_bound(key)] = _nonneg_int(value)
        total = _nonneg_float(fields.get("rt_sum", "0"))
        inf = buckets.pop(math.inf, 0)
        if len(buckets) == known:  # only the configured bounds (in order): no sort
            return cls(tuple(buckets), (*buckets.values(), inf), total)
        uppers = tuple(sorted(buckets))
        return cls(uppers, (*(buckets[b] for b in uppers), inf), total)


@functools.lru_cache(maxsize=1024)
def _bound(key: str) -> float:
    """The upper bound of an ``le:<bound>`` field; ``ValueError`` when it is not one."""
    bound = float(key[3:])
    if math.isnan(bound) or bound <= 0:
        raise ValueError(f"bad bucket bound {key!r}")
    return bound


def _fmt_bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _nonneg_int(value: str) -> int:
    n = int(value)
    if n < 0 or n > 2**63:
        raise ValueError(f"counter out of range: {value!r}")
    return n


def _nonneg_float(value: str) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"value out of range: {value!r}")
    return x


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Cache statistics of one region: for one instance, or summed over the cluster."""

    hit_count: int = 0
    miss_count: int = 0
    set_count: int = 0
    eviction_count: int = 0
    size_bytes: int = 0
    response_times: ResponseTimes = ResponseTimes()
    instance_count: int = 0
    last_updated: float | None = None
    live: bool = True

    @property
    def total_requests(self) -> int:
        """Hits plus misses."""
        return self.hit_count + self.miss_count

    @property
    def hit_ratio(self) -> float:
        """Hits over requests, 0-1 (0 with no traffic)."""
        total = self.total_requests
        return self.hit_count / total if total else 0.0

    @property
    def average_response_time(self) -> float:
        """Mean response time in seconds (0 with no samples)."""
        n = self.response_times.count
        return self.response_times.sum / n if n else 0.0

    def merge(self, other: Statistics) -> Statistics:
        """The sum of two parts of one region (the shards of :mod:`.shards`): counters,
        sizes, histograms and instance counts add up; the later update is kept."""
        updated = [t for t in (self.last_updated, other.last_updated) if t is not None]
        return Statistics(
            hit_count=self.hit_count + other.hit_count,
            miss_count=self.miss_count + other.miss_count,
            set_count=self.set_count + other.set_count,
            eviction_count=self.eviction_count + other.eviction_count,
            size_bytes=self.size_bytes + other.size_bytes,
            response_times=self.response_times.merge(other.response_times),
            instance_count=self.instance_count + other.instance_count,
            last_updated=max(updated) if updated else None,
            live=self.live or other.live,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (counts, hit ratio, latency quantiles)."""
        rt = self.response_times
        return {
            "hit_count": self.hit_count,
            "miss_count": self.miss_count,
            "set_count": self.set_count,
            "eviction_count": self.eviction_count,
            "size_bytes": self.size_bytes,
            "hit_ratio": round(self.hit_ratio, 6),
            "total_requests": self.total_requests,
            "instance_count": self.instance_count,
            "avg_response_time_ms": round(self.average_response_time * 1000, 4),
            "p50_response_time_ms": _ms(rt.quantile(0.5)),
            "p95_response_time_ms": _ms(rt.quantile(0.95)),
            "p99_response_time_ms": _ms(rt.quantile(0.99)),
            "last_updated": self.last_updated,
            "live": self.live,
        }

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, str], bounds: Iterable[float] = (), **extra: Any
    ) -> Statistics:
        """Parse a Redis hash (histogram buckets at ``bounds`` filled in);
        raises ``ValueError`` on malformed data."""
        get = fields.get
        return cls(
            hit_count=_nonneg_int(get("hit_count", "0")),
            miss_count=_nonneg_int(get("miss_count", "0")),
            set_count=_nonneg_int(get("set_count", "0")),
            eviction_count=_nonneg_int(get("eviction_count", "0")),
            size_bytes=_nonneg_int(fields.get("size_bytes", "0")),
            response_times=ResponseTimes.from_fields(fields, bounds),
            **extra,
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)

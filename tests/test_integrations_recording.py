"""What every integration shares: the Recording protocol, the guard, settings resolution and
the clear ImportError of a missing extra."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from conduit_otel_cache import CacheStatistics, Settings
from conduit_otel_cache.integrations.recording import (
    Recording,
    RegionRecorder,
    resolve_region,
    resolve_stats,
)

from .conftest import MakeStats

#: For the dotted-path form of the stats settings.
DOTTED: Any = None


class BrokenStats:
    """A Recording whose every method raises: the caches must not notice."""

    def record_hit(self, *args: Any) -> None:
        raise RuntimeError("statistics broken")

    def record_miss(self, *args: Any) -> None:
        raise RuntimeError("statistics broken")

    def record_set(self, *args: Any) -> None:
        raise RuntimeError("statistics broken")

    def record_eviction(self, *args: Any) -> None:
        raise RuntimeError("statistics broken")

    def set_size_bytes(self, *args: Any) -> None:
        raise RuntimeError("statistics broken")


def test_handles_satisfy_the_protocol(make_stats: MakeStats) -> None:
    stats = make_stats("api-1")
    assert isinstance(stats, Recording)
    assert isinstance(CacheStatistics(Settings.load(enabled=False)), Recording)
    assert isinstance(BrokenStats(), Recording)
    assert not isinstance(object(), Recording)


def test_region_recorder_records_and_swallows(
    make_stats: MakeStats, caplog: pytest.LogCaptureFixture
) -> None:
    stats = make_stats("api-1")
    rec = RegionRecorder(stats, "R")
    rec.hit(0.002)
    rec.miss(0.004)
    rec.lookups(2, 5, 0.010)  # 2 hits and 3 misses, 0.002 s each
    rec.lookups(0, 0, 1.0)  # nothing
    rec.sets(3)
    rec.evictions(2)
    s = stats.local_statistics("R")
    assert (s.hit_count, s.miss_count, s.set_count, s.eviction_count) == (3, 4, 3, 2)
    assert s.response_times.count == 7
    assert s.response_times.sum == pytest.approx(0.016)

    broken = RegionRecorder(BrokenStats(), "R")
    broken.hit(0.1)
    broken.miss(0.1)
    broken.lookups(1, 2, 0.1)
    broken.sets()
    broken.evictions()
    assert "recording cache statistics of region 'R' failed" in caplog.text
    assert caplog.text.count("failed") == 1  # rate-limited: one line, not one per event


def test_resolve_stats_and_region(make_stats: MakeStats) -> None:
    global DOTTED
    stats = make_stats("api-1")
    assert resolve_stats(stats, "S") is stats
    DOTTED = stats
    assert resolve_stats(f"{__name__}.DOTTED", "S") is stats
    DOTTED = lambda: stats  # noqa: E731 - a factory is called
    assert resolve_stats(f"{__name__}.DOTTED", "S") is stats
    DOTTED = None
    with pytest.raises(ValueError, match=r"^S must be the statistics handle"):
        resolve_stats(f"{__name__}.DOTTED", "S")
    with pytest.raises(ValueError, match=r"^S: cannot import 'nowhere.x'"):
        resolve_stats("nowhere.x", "S")
    with pytest.raises(ValueError, match=r"^S: cannot import 'nodots'"):
        resolve_stats("nodots", "S")
    with pytest.raises(ValueError, match=r"^S must be .* not int"):
        resolve_stats(3, "S")
    assert resolve_region("Users.v2", "R") == "Users.v2"
    for bad in ("", "a b", "x" * 129, None, 5):
        with pytest.raises(ValueError, match=r"^R: region"):
            resolve_region(bad, "R")


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("django", "django", "django"),
        ("flask_caching", "flask_caching", "flask"),
        ("aiocache", "aiocache", "aiocache"),
        ("dogpile", "dogpile", "dogpile"),
    ],
)
def test_missing_library_gives_clear_import_error(module: str, blocked: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "try:\n"
        f"    import conduit_otel_cache.integrations.{module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert f"pip install 'conduit-otel-cache[{extra}]'" in out

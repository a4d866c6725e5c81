"""A real redis-server under ``maxmemory`` pressure, real application processes (issue 22
row 3, issue 23 item 3): with ``volatile-lru`` Redis evicts keys of the schema while 4
workers write 100 regions; with ``noeviction`` it refuses their writes. Neither may count
anything twice; once memory is freed, the live workers rebuild exact totals, a loss is
reported where Redis lost something, and the refused flushes are carried through Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis

from conduit_otel_cache.embedded import RedisServer
from conduit_otel_cache.writethrough import CHECK_EVERY

HERE = Path(__file__).parent
WORKERS, REGIONS, SECONDS = 4, 100, 4.0
MAXMEMORY = "1500kb"


def start(url: str, instance_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "eviction_worker.py"), url, instance_id, str(REGIONS),
         str(SECONDS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def hits(r: redis.Redis) -> dict[str, tuple[int, int]]:
    out = {}
    for key in r.scan_iter("conduit:cache:stats:aggregated:*"):
        if key.endswith(":writes"):  # the record of the writes the totals hold
            continue
        fields = r.hgetall(key)
        out[key.rsplit(":", 1)[1]] = (int(fields.get("hit_count", 0)),
                                      int(fields.get("lost_count", 0)))  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["volatile-lru", "noeviction"])
def test_memory_pressure_never_counts_twice_and_live_workers_rebuild(policy: str) -> None:
    with RedisServer(None, "--maxmemory", MAXMEMORY, "--maxmemory-policy", policy) as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        workers = [start(server.url, f"w{n}") for n in range(WORKERS)]
        try:
            recorded: Counter[str] = Counter()
            for w in workers:
                assert w.stdout is not None
                word, counts = w.stdout.readline().split(" ", 1)
                assert word == "recorded"
                recorded.update(json.loads(counts))
            under_pressure = hits(r)
            assert r.info("stats")["evicted_keys"] > 0 or policy == "noeviction"
            for region, (total, _) in under_pressure.items():
                assert total <= recorded[region], (region, total, recorded[region])
            r.config_set("maxmemory", "0")  # memory freed: the live workers write on
            errors = 0
            for w in workers:
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write(f"flush {CHECK_EVERY + 1}\n")
                w.stdin.flush()
            for w in workers:
                assert w.stdout is not None
                word, ok, failed = w.stdout.readline().split()
                assert (word, ok) == ("flushed", str(CHECK_EVERY + 1))
                errors += int(failed)
            after = hits(r)
            assert {region: total for region, (total, _) in after.items()} == dict(recorded)
            lost = {region for region, (_, n) in after.items() if n}
            if policy == "noeviction":
                assert errors > 0 and not lost  # refused, never lost
                carried = r.hgetall("conduit:cache:flush_errors")
                assert sum(int(n) for n in carried.values()) == errors, carried
            print(f"{policy}: {sum(recorded.values())} recorded, "
                  f"{r.info('stats')['evicted_keys']} keys evicted, {errors} flush errors, "
                  f"{len(lost)} regions reported lost")  # fmt: skip
        finally:
            for w in workers:
                if w.stdin is not None:
                    w.stdin.close()
            for w in workers:
                w.wait(30)

"""Recovery: the final values of dead incarnations' spools (:mod:`.spool`) written to
Redis under each one's own identity, exactly once.

Any process with the same ``spool_dir`` recovers (an application process at its start and
every ``flush_interval``, ``serve`` as a sidecar): it locks a dead incarnation's spool,
writes its cumulative values under that incarnation's id and token through the normal
write protocol (a repeat, by this process or another, adds nothing), deregisters it,
marks the spool recovered and removes it. A write that fails leaves the spool for the
next attempt.

A spool is written only where Redis still knows its incarnation (the instance's token is
the spool's), or where the incarnation never had a write acknowledged. Otherwise (another
incarnation took its id over, or ``cleanup`` removed it after ``retention_period``) its
values cannot be written exactly: the spool is removed with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from .config import WriteThroughSettings
from .identity import Identity
from .model import ResponseTimes
from .ratelimit import RateLimitedLog
from .recorder import BUCKET0, EVICT, HIT, MISS, RT_SUM, SET
from .shards import Shards
from .spool import RECOVERED, RECOVERING, Claim, DeadSpool, claim_dead
from .store import Store, explain
from .writethrough import Fields, RedisMetricExporter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recovered:
    """What one pass did."""

    written: int = 0  # dead incarnations written and deregistered
    dropped: int = 0  # spools that could not be written exactly (warned)
    failed: int = 0  # writes that failed (left for the next pass)
    seconds: float = 0.0


def spool_fields(spool: DeadSpool) -> Fields:
    """The write-through fields (cumulative per region) of a dead incarnation's totals."""
    bounds = tuple(spool.identity["bounds"])
    fields: Fields = {}
    for region, t in spool.totals.items():
        counts = tuple(int(n) for n in t[BUCKET0:])
        fields[region] = {
            "size_bytes": "0",
            "hit_count": str(int(t[HIT])),
            "miss_count": str(int(t[MISS])),
            "set_count": str(int(t[SET])),
            "eviction_count": str(int(t[EVICT])),
            **ResponseTimes(bounds, counts, t[RT_SUM]).to_fields(),
        }
    return fields


class Recoverer:
    """Recovers the dead incarnations' spools of ``settings.spool_dir`` into ``store``."""

    def __init__(self, settings: WriteThroughSettings, store: Store | Shards) -> None:
        assert settings.spool_dir is not None
        self.settings = settings
        self.directory = settings.spool_dir
        self.store = store
        self.total = Recovered()
        #: recovery passes finished, the last one, and its last error
        self.passes = 0
        self.last = Recovered()
        self.last_error: str | None = None
        #: time.time() of the last spool dropped (it could not be written exactly)
        self.dropped_at = 0.0
        self._errors = RateLimitedLog(log)

    def run(self, own: tuple[str, ...] = ()) -> Recovered:
        """One pass over the directory; ``own``: this process's spool paths."""
        start = time.monotonic()
        done = Recovered()
        for claim, why in claim_dead(self.directory, own):
            spool = claim.spool
            if why or spool.state == RECOVERED:
                if why:
                    log.warning(
                        "conduit-otel-cache: removed unreadable spool %s (%s)", spool.path, why
                    )
                claim.discard()
                continue
            try:
                outcome = self._write(claim)
            except Exception as exc:
                done.failed += 1
                self.last_error = explain(exc)
                self._errors.error(
                    "conduit-otel-cache: recovery of the spool of instance %s failed: %s; "
                    "tried again later",
                    spool.identity.get("instance_id"),
                    explain(exc),
                )
                claim.release()
                continue
            if outcome:
                done.written += 1
            else:
                done.dropped += 1
                self.dropped_at = time.time()
            claim.done()
        done.seconds = time.monotonic() - start
        for name in ("written", "dropped", "failed"):
            setattr(self.total, name, getattr(self.total, name) + getattr(done, name))
        self.passes += 1
        self.last = done
        return done

    def _write(self, claim: Claim) -> bool:
        """Write one dead incarnation; False when it cannot be written exactly."""
        spool = claim.spool
        who: dict[str, Any] = spool.identity
        instance_id, token = who["instance_id"], who["token"]
        held = self.store.client.hget(self.store.of(instance_id).keys.meta(instance_id), "token")
        known = who.get("confirmed") or spool.state == RECOVERING
        if held != token and (held is not None or known):
            events = sum(int(t[HIT] + t[MISS] + t[SET] + t[EVICT]) for t in spool.totals.values())
            log.warning(
                "conduit-otel-cache: the spool of dead instance %s (pid %s) holds %d events "
                "but Redis no longer knows that incarnation (%s); they cannot be written "
                "exactly and are dropped",
                instance_id,
                who.get("pid"),
                events,
                "another took its id over" if held else "removed by cleanup or lost",
            )
            return False
        fields = spool_fields(spool)
        if fields:
            claim.begin()
            identity = Identity.of(instance_id, token, who["owner"])
            RedisMetricExporter(self.settings, self.store, identity=identity).recover(fields)
        log.info(
            "conduit-otel-cache: recovered the spool of dead instance %s (pid %s)",
            instance_id,
            who.get("pid"),
        )
        return True

    def loop(self, stop: threading.Event, every: float, own: Any) -> None:
        """Run a pass now and every ``every`` seconds until ``stop``; ``own()`` gives this
        process's spool paths."""
        while True:
            try:
                self.run(own())
            except Exception as exc:  # never let the thread die
                self._errors.error("conduit-otel-cache: spool recovery failed: %s", explain(exc))
            if stop.wait(every):
                return

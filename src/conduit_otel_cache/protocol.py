"""The wire protocol of the scripts in ``lua/``: for each script, what goes in ``KEYS`` and
``ARGV`` (an encoder, returning a :class:`Call`) and what its reply means (a decoder). The
store sends nothing else; each Lua file states the same layout in its header.

The write scripts (``flush``, ``beat``, ``regions``) share one ``ARGV`` layout
(``lua/lib.lua``): :meth:`Writer.header`, then :func:`entry_args` per region entry. Every
region's keys are :func:`region_keys`, six per region, in the order the scripts read them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .keys import KeySchema

#: the files of each script after ``lib.lua`` (the name is the last one's)
SCRIPTS: dict[str, tuple[str, ...]] = {
    "flush": ("region.lua", "instance.lua", "flush.lua"),
    "beat": ("instance.lua", "beat.lua"),
    "regions": ("region.lua", "regions.lua"),
    "depart": ("region.lua", "instance.lua", "depart.lua"),
    "depart_regions": ("region.lua", "depart_regions.lua"),
    "redis_cluster_depart": ("instance.lua", "redis_cluster_depart.lua"),
    "settled": ("settled.lua",),
    "liveness": ("liveness.lua",),
    "members": ("member.lua", "members.lua"),
    "stray": ("member.lua", "stray.lua"),
    "aggregates": ("aggregates.lua",),
    "acknowledge": ("acknowledge.lua",),
    "continuity": ("continuity.lua",),
}


@dataclasses.dataclass(frozen=True)
class Call:
    """One script call: the script's name (a key of :data:`SCRIPTS`), its KEYS and ARGV."""

    script: str
    keys: list[str]
    args: list[Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One region of a write: cumulative values of the changed (or, ``full``, all) fields,
    and raw response times since the last write. ``after``: the number of the region's
    last write Redis acknowledged, which a partial entry continues from (Redis refuses it
    when it does not hold that write). A partial entry with no fields and no samples is a
    check: Redis only confirms it holds the region up to ``after``. ``epoch``: the epoch of
    the totals that hold the writer's last acknowledged write of the region, and ``base``
    what that write held (a full entry: if the stats hash is gone while the totals still
    hold it, Redis continues from ``base``; ``base["live"] == "1"`` when the live gauges
    are still in the totals)."""

    fields: Mapping[str, str]
    full: bool = True
    samples: Sequence[float] = ()
    after: int = 0
    epoch: str = ""
    base: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def is_check(self) -> bool:
        """A check: no fields, no samples, not full (``is_check()`` in ``lua/lib.lua``)."""
        return not self.full and not self.fields and not self.samples


#: the position in :meth:`Writer.header` of whether the write refreshes ('1') or checks
#: ('c') regions, or neither ('0')
HEADER_CHECKS = 7


@dataclasses.dataclass(frozen=True)
class Writer:
    """Who writes: the instance id, its incarnation token and owner (``host:pid``), and
    the limits every write carries."""

    instance_id: str
    token: str
    owner: str
    ttl: float
    instance_timeout: float
    sample_cap: int = 0
    sample_ttl: float = 3600.0
    #: failed flushes of the incarnation so far by kind (``Kind=n,...``), and the last kind
    errors: str = ""
    last_error: str = ""

    def header(
        self, refresh: bool = True, seq: int = 0, known: bool = False, checks: bool = False
    ) -> list[Any]:
        """The first 12 arguments of every write script (``header()`` in ``lua/lib.lua``);
        ``refresh``: renew the TTLs of every key the write names and check key types;
        ``checks``: the write checks regions (it lists every region it names);
        ``seq``: the write's number; ``known``: Redis acknowledged this incarnation before."""
        return [
            self.instance_id,
            self.token,
            self.owner,
            max(1, int(self.ttl)),
            self.instance_timeout,
            max(1, self.sample_cap),
            max(1, int(self.sample_ttl)),
            "1" if refresh else "c" if checks else "0",
            seq,
            "1" if known else "0",
            self.errors,
            self.last_error,
        ]


@dataclasses.dataclass(frozen=True)
class FlushResult:
    """What a write learnt from Redis.

    ``status`` is ``ok``; ``duplicate`` (another live process writes as this instance id:
    nothing was written); or ``unregistered`` (a new incarnation with nothing to write:
    it is not live). ``stale`` lists the regions an earlier incarnation under this id
    reported (to leave the live gauges); ``need_full`` the entries refused for being
    partial where Redis holds no state of this incarnation (resend them whole).
    """

    server_time: float
    status: str = "ok"
    stale: tuple[str, ...] = ()
    need_full: tuple[str, ...] = ()
    #: Redis did not hold this incarnation as live (reaped, or lost): write it whole
    rebuild: bool = False
    #: the incarnation that left ``stale`` was live when this one took over: ``"1"``;
    #: ``"m"``: it was, but Redis lost its regions set (``stale`` is then every region,
    #: and it leaves those where Redis still shows it live); else ``"0"``
    stale_live: str = "0"
    #: ``{region: epoch}`` of the totals each full entry was written to
    epochs: Mapping[str, str] = dataclasses.field(default_factory=dict)


# -- KEYS ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # every flush names the same regions' keys again
def region_keys(keys: KeySchema, instance_id: str, region: str) -> tuple[str, ...]:
    """One region of one instance (``region_at()`` in ``lua/region.lua``): stats hash,
    aggregated hash, counts hash, samples list, the totals' record of writes, continuity
    record. Declared, so that a Redis Cluster routes the call by every key it touches."""
    return (
        keys.stats(instance_id, region),
        keys.aggregate(region),
        keys.counts(region),
        keys.samples(instance_id, region),
        keys.writes(region),
        keys.continuity(region),
    )


def regions_keys(keys: KeySchema, instance_id: str, regions: Iterable[str]) -> list[str]:
    """:func:`region_keys` of each region, in order."""
    out: list[str] = []
    for region in regions:
        out += region_keys(keys, instance_id, region)
    return out


def beat_keys(keys: KeySchema, instance_id: str) -> list[str]:
    """The instance-level keys of a write (``beat()`` in ``lua/instance.lua``): heartbeats,
    regions set, meta hash, the instance's regions set, flush errors."""
    return [
        keys.instances,
        keys.regions,
        keys.meta(instance_id),
        keys.instance_regions(instance_id),
        keys.flush_errors,
    ]


def instance_keys(keys: KeySchema, instance_id: str) -> list[str]:
    """The instance part of a departure: heartbeats, meta hash, the instance's regions set."""
    return [keys.instances, keys.meta(instance_id), keys.instance_regions(instance_id)]


# -- ARGV of the write scripts -------------------------------------------------------------


def entry_args(entries: Iterable[tuple[str, Entry]]) -> list[str]:
    """The region entries after the header (``entries()`` in ``lua/lib.lua``): one argument,
    a JSON array of ``[region, full, after, epoch, fields, base, samples]`` (fields and base
    objects of field -> value, base ``null`` when empty, samples csv: seconds to the
    nanosecond). One argument whatever the entries: redis-py encodes arguments one by one
    in Python (some 0.8 us each), and Redis decodes JSON in C."""
    return [
        _json(
            [
                [
                    region,
                    "1" if entry.full else "0",
                    entry.after,
                    entry.epoch,
                    entry.fields,
                    entry.base or None,
                    _csv(entry.samples),
                ]
                for region, entry in entries
            ]
        )
    ]


_json = json.JSONEncoder(separators=(",", ":")).encode


def _csv(samples: Sequence[float]) -> str:
    """Raw response times as Redis keeps them: seconds to the nanosecond, comma-separated
    (a third of the cost of each float's shortest ``repr``; a flush of a busy service
    carries thousands)."""
    return ("%.9f," * len(samples))[:-1] % tuple(samples)


# -- one encoder per script ----------------------------------------------------------------


def flush(
    keys: KeySchema, header: list[Any], instance_id: str, entries: Sequence[tuple[str, Entry]]
) -> Call:
    """``lua/flush.lua`` (standalone): the heartbeat and ``entries`` in one call."""
    return Call(
        "flush",
        [*beat_keys(keys, instance_id), *regions_keys(keys, instance_id, (r for r, _ in entries))],
        [*header, *entry_args(entries)],
    )


def beat(
    keys: KeySchema, header: list[Any], instance_id: str, entries: Sequence[tuple[str, Entry]]
) -> Call:
    """``lua/beat.lua``: the instance part of a write; of ``entries`` it needs only the names
    of the full ones, and of all when the write checks regions (``listed_regions()`` in
    ``lua/lib.lua``): those are sent, the rest of each entry empty, in the same layout."""
    every = header[HEADER_CHECKS] != "0"
    names = [(region, Entry({}, entry.full)) for region, entry in entries if every or entry.full]
    return Call("beat", beat_keys(keys, instance_id), [*header, *entry_args(names)])


def regions(
    keys: KeySchema,
    header: list[Any],
    instance_id: str,
    entries: Sequence[tuple[str, Entry]],
    *,
    with_sets: bool,
) -> Call:
    """``lua/regions.lua``: region entries without the heartbeat. KEYS: each region's keys,
    then (``with_sets``: standalone, where they share the slot) the regions set and the
    instance's regions set, which the script records the names in."""
    sets = [keys.regions, keys.instance_regions(instance_id)] if with_sets else []
    return Call(
        "regions",
        [*regions_keys(keys, instance_id, (r for r, _ in entries)), *sets],
        [*header, *entry_args(entries)],
    )


def depart(
    keys: KeySchema, instance_id: str, regions: Sequence[str], age: str, remove: bool, lost: bool
) -> Call:
    """``lua/depart.lua`` (standalone): a whole departure. ARGV: id, max heartbeat age or
    '', '1' to delete its keys, 'm' when its regions set is lost."""
    return Call(
        "depart",
        [*instance_keys(keys, instance_id), *regions_keys(keys, instance_id, regions)],
        [instance_id, age, "1" if remove else "0", "m" if lost else ""],
    )


def depart_regions(
    keys: KeySchema,
    instance_id: str,
    regions: Sequence[str],
    *,
    remove: bool = False,
    unless_token: str = "",
    was_live: str = "0",
) -> Call:
    """``lua/depart_regions.lua``: regions leaving the live gauges. ARGV: id, '1' to delete
    the stats hashes, a token whose own regions stay (or ''), was live ('1', 'm', '0')."""
    return Call(
        "depart_regions",
        regions_keys(keys, instance_id, regions),
        [instance_id, "1" if remove else "0", unless_token, was_live],
    )


def redis_cluster_depart(keys: KeySchema, instance_id: str, age: str, phase: str) -> Call:
    """``lua/redis_cluster_depart.lua``: the instance part of a departure on a Redis
    Cluster; ``phase`` is ``check``, ``keep`` or ``remove``."""
    return Call("redis_cluster_depart", instance_keys(keys, instance_id), [instance_id, age, phase])


def settled(keys: KeySchema, instance_id: str, token: str) -> Call:
    """``lua/settled.lua``: the earlier incarnations' regions left; stop listing them."""
    return Call("settled", [keys.meta(instance_id)], [token])


def liveness(keys: KeySchema, instance_timeout: float) -> Call:
    """``lua/liveness.lua``: heartbeats, regions set, flush errors; ARGV: instance_timeout."""
    return Call("liveness", [keys.instances, keys.regions, keys.flush_errors], [instance_timeout])


def members(keys: KeySchema, instance_timeout: float) -> Call:
    """``lua/members.lua``: the heartbeats; ARGV: instance_timeout and the meta hash key of
    an empty id (the script derives each instance's)."""
    return Call("members", [keys.instances], [instance_timeout, keys.meta("")])


def stray(keys: KeySchema, member: str) -> Call:
    """``lua/stray.lua``: one heartbeat member :func:`members` returned, removed if it still
    has no live instance behind it. KEYS: heartbeats, its meta hash, its regions set."""
    return Call(
        "stray", [keys.instances, keys.meta(member), keys.instance_regions(member)], [member]
    )


def aggregates(hashes: Sequence[str]) -> Call:
    """``lua/aggregates.lua`` (standalone): each hash named (the regions' aggregated hashes
    and continuity records)."""
    return Call("aggregates", list(hashes), [])


def continuity(keys: KeySchema, region: str, expected: str, record: dict[str, str]) -> Call:
    """``lua/continuity.lua``: the region's continuity record written unless its epoch is no
    longer ``expected``. KEYS: continuity record, aggregated hash; ARGV: expected epoch,
    then field and value pairs."""
    return Call(
        "continuity",
        [keys.continuity(region), keys.aggregate(region)],
        [expected, *(x for pair in record.items() for x in pair)],
    )


def check_reads(keys: KeySchema, instance_id: str, region: str) -> list[tuple[str, ...]]:
    """A check as two plain reads instead of a script call (a Redis Cluster's write that
    renews no TTL: one call per region's slot would cost more than the check): the stats
    hash's token, write number and epoch, and the totals' epoch. :func:`check_passed`
    decides as ``check_region()`` in ``lua/region.lua`` does."""
    return [
        ("HMGET", keys.stats(instance_id, region), "token", "seq", "epoch"),
        ("HGET", keys.aggregate(region), "epoch"),
    ]


def acknowledge(keys: KeySchema, region: str) -> Call:
    """``lua/acknowledge.lua``: acknowledge the region's data losses."""
    return Call("acknowledge", [keys.aggregate(region)], [])


# -- decoders ------------------------------------------------------------------------------


def epochs(flat: Any) -> dict[str, str]:
    """``{region: epoch}`` of a flat region, epoch reply."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def beat_result(reply: Any) -> FlushResult:
    """``lua/beat.lua``'s reply (``beat()``: time, status, stale regions, rebuild, stale
    live); ``lua/flush.lua``'s adds the regions that need a full entry and the epochs."""
    now, status, stale, rebuild, stale_live = reply[:5]
    result = FlushResult(
        float(now),
        str(status),
        tuple(str(r) for r in stale),
        rebuild=rebuild == "1",
        stale_live=str(stale_live),
    )
    if len(reply) <= 5:
        return result
    need = tuple(str(r) for r in reply[5])
    return dataclasses.replace(result, need_full=need, epochs=epochs(reply[6]))


def regions_result(reply: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """``lua/regions.lua``'s reply: the regions that need a full entry, and the epochs."""
    return tuple(str(r) for r in reply[0]), epochs(reply[1])


def check_passed(token: str, entry: Entry, stats: Any, epoch: Any) -> bool:
    """Redis still holds every write of the region up to ``entry.after`` for ``token``, in
    the totals it was written to (the replies of :func:`check_reads`); else the region is
    resent whole, as when ``check_region()`` says ``full``."""
    if isinstance(stats, Exception):  # not a hash
        return False
    got, seq, written_to = stats
    return (
        got == token and _count(seq) >= entry.after and (written_to is None or epoch == written_to)
    )


def _count(value: Any) -> float:
    """A stored number as ``num()`` in ``lua/lib.lua`` reads it: malformed is 0."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return 0.0
    return n if math.isfinite(n) and n >= 0 else 0.0

"""Every Redis call of the library, through the scripts of ``lua/`` and the key schema of
:mod:`.keys`.

A write is one ``lua/flush.lua`` call on a standalone Redis; on a Redis Cluster one
pipeline of a ``lua/beat.lua`` call and one ``lua/regions.lua`` call per region (the same
Lua functions and the same argument layout, ``lua/lib.lua``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from .config import Settings, valid_name
from .connection import Client, connect, pipeline
from .keys import KeySchema

#: a hash read, or why it could not be
Hash = dict[str, str] | Exception


def _strs(reply: Any) -> list[str]:
    """A Redis list or set reply (``decode_responses=True``) as a list of str."""
    return [str(item) for item in reply]


def _zrange(pipe: Any, key: str) -> None:
    """Queue ``ZRANGE key 0 -1 WITHSCORES`` with its raw reply (see :func:`_pairs`)."""
    pipe.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")


def _pairs(reply: Any) -> list[tuple[str, float]]:
    """``(member, score)`` of a raw ``ZRANGE ... WITHSCORES`` reply, flat (RESP2) or nested
    (RESP3); read raw because redis-py's own score conversion costs more than the read."""
    if reply and isinstance(reply[0], list):
        return [(member, float(score)) for member, score in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply) - 1, 2)]


#: the per-instance pass reads in round trips of at most about this many seconds (and a
#: quarter of ``socket_timeout``): Redis answers a
#: pipeline only when it has run all of it, and 10,000 instances take up to 0.2 s per region
#: (a pass over 100 regions in one round trip outlasted the default ``socket_timeout``)
PASS_ROUND_TRIP = 0.5
#: and, on a Redis Cluster, in pipelines of at most this many reads
PASS_COMMANDS = 10_000

_NOPERM = re.compile(r"NOPERM.*?'([A-Za-z|_-]+)' command|no permissions to run the '([^']+)'")


def explain(exc: BaseException) -> str:
    """``Type: message`` of a Redis error; an ACL refusal names the command to allow, also
    when a script ran it (``@user_script:...``)."""
    text = f"{type(exc).__name__}: {exc}"
    match = _NOPERM.search(str(exc))
    if match:
        command = (match.group(1) or match.group(2)).split("|")[0].lower()
        return f"the Redis user may not run {command.upper()} (allow +{command}): {text}"
    return text


_SCRIPT_LINE = re.compile(r"@user_script:(\d+)")
_CALL = re.compile(r"redis\.p?call\('([A-Za-z]+)'")


def _named(exc: Exception, script: Script) -> Exception:
    """A script's ACL refusal (``... @user_script:41``) names the command that line runs."""
    line = _SCRIPT_LINE.search(str(exc))
    if not line or "can't run this command" not in str(exc):
        return exc
    lines = str(script.script).splitlines()
    n = int(line.group(1))
    call = _CALL.search(lines[n - 1]) if 0 < n <= len(lines) else None
    if call is None:
        return exc
    command = call.group(1).lower()
    return type(exc)(f"the Redis user may not run {command.upper()} (allow +{command}): {exc}")


def _entry_args(entries: Sequence[tuple[str, Entry]]) -> list[Any]:
    """Region entries as script arguments (the layout of ``lua/lib.lua``)."""
    args: list[Any] = []
    for region, entry in entries:
        args += [region, "1" if entry.full else "0", entry.after, entry.epoch, len(entry.fields)]
        for name, value in entry.fields.items():
            args += [name, value]
        args.append(len(entry.base))
        for name, value in entry.base.items():
            args += [name, value]
        args.append(",".join(repr(float(x)) for x in entry.samples))
    return args


def _epochs(flat: Any) -> dict[str, str]:
    """``{region: epoch}`` of a flat region, epoch reply."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _script_source(*names: str) -> str:
    """``lib.lua`` followed by the named files of ``lua/``, as one script."""
    lua = files(__package__).joinpath("lua")
    return "\n".join(lua.joinpath(name).read_text() for name in ("lib.lua", *names))


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
        """The first arguments of every write script (the layout of ``lua/lib.lua``);
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


@dataclasses.dataclass(frozen=True)
class ClusterData:
    """Raw cluster data: server time, liveness and the aggregated hashes per region."""

    server_time: float
    #: instances whose heartbeat is at most ``instance_timeout`` old
    active: int
    #: ``{instance_id: heartbeat}`` of registered instances whose heartbeat expired
    missing: dict[str, float]
    aggregates: dict[str, dict[str, str]]
    errors: tuple[str, ...] = ()
    #: why expired instances could not be taken out of the live gauges (a write refused,
    #: e.g. Redis out of memory); they are tried again with the next read
    reap_error: str | None = None
    #: ``{error kind: count}`` of the instances' failed flushes, carried by their next writes
    flush_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``{region: continuity record}`` (``{}`` when it has none): what data losses took
    #: from each region's totals, carried over by every reader (continuity.py)
    continuity: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Heartbeats:
    """Every registered instance's last heartbeat, at one server time."""

    server_time: float
    beats: dict[str, float]
    errors: tuple[str, ...] = ()


class Store:
    """Every Redis operation of the library, on one key schema (standalone or Redis Cluster)."""

    def __init__(self, client: Client, key_prefix: str = "conduit:", batch_size: int = 100) -> None:
        self.client = client
        #: most regions one standalone flush script call updates (the rest follow in the
        #: same pipeline), so that no script holds Redis for long
        self.batch_size = batch_size
        #: Redis Cluster: hash-tagged keys, one script call per hash slot
        self.redis_cluster = isinstance(client, RedisCluster)
        pool = getattr(client, "connection_pool", None)
        timeout = pool.connection_kwargs.get("socket_timeout") if pool is not None else None
        #: the per-instance pass's round trips take about this long (a quarter of the timeout)
        self.pass_round_trip = min(PASS_ROUND_TRIP, (timeout or PASS_ROUND_TRIP * 4) / 4)
        self.keys = KeySchema(key_prefix, redis_cluster=self.redis_cluster)
        # the instance part of a flush; alone, a heartbeat (its keys share one hash slot)
        self._beat = self._script("instance.lua", "beat.lua")
        self._regions = self._script("region.lua", "regions.lua")
        self._depart_regions = self._script("region.lua", "depart_regions.lua")
        self._settled = self._script("settled.lua")
        if self.redis_cluster:
            self._depart_instance = self._script("instance.lua", "redis_cluster_depart.lua")
        else:
            self._flush = self._script("region.lua", "instance.lua", "flush.lua")
            self._depart = self._script("region.lua", "instance.lua", "depart.lua")
            self._aggregates = self._script("aggregates.lua")
            self._counts = self._script("counts.lua")
        self._liveness = self._script("liveness.lua")
        self._acknowledge = self._script("acknowledge.lua")
        self._continuity = self._script("continuity.lua")

    def _script(self, *names: str) -> Script:
        return self.client.register_script(_script_source(*names))

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """A store on a new client for ``settings``."""
        batch = settings.batch_size if settings.enable_batching else 1
        return cls(connect(settings), settings.key_prefix, batch)

    # -- writes -------------------------------------------------------------------------

    def flush(
        self,
        writer: Writer,
        entries: Mapping[str, Entry],
        *,
        refresh: bool = True,
        seq: int = 0,
        beat_first: bool = False,
        known: bool = False,
        checks: bool = False,
    ) -> FlushResult:
        """Write ``entries`` and the heartbeat in one round trip (on a Redis Cluster: one
        pipeline, one script call per hash slot). ``refresh`` renews TTLs; ``seq`` is the
        write's number (see :class:`Entry`). ``beat_first`` (a Redis Cluster write of an
        incarnation not yet known to Redis) checks the instance id before any region is
        written, at the cost of a second round trip. ``known``: Redis acknowledged this
        incarnation before (another token under its id then means it was displaced);
        ``checks``: the write checks every unchanged region (and lists all in the regions
        sets)."""
        items = list(entries.items())
        header = writer.header(refresh, seq, known, checks)
        head: tuple[Script, list[str], list[Any]]
        if self.redis_cluster:  # the beat alone, then one call per region (its own slot)
            names: list[Any] = []
            for region, entry in items:
                names += [region, "1" if entry.full else "0", 0, "", 0, 0, ""]
            head = (self._beat, self.keys.beat(writer.instance_id), [*header, *names])
            batches = [[item] for item in items]
        else:  # the beat with the first batch_size regions, then the other batches
            step = self.batch_size
            batches = [items[i : i + step] for i in range(0, len(items), step)] or [[]]
            keys = self.keys.beat(writer.instance_id)
            for region, _ in batches[0]:
                keys += self.keys.region(writer.instance_id, region)
            head = (self._flush, keys, [*header, *_entry_args(batches.pop(0))])
        rest = [
            (
                self._regions,
                self.keys.batch(writer.instance_id, [r for r, _ in batch]),
                [*header, *_entry_args(batch)],
            )
            for batch in batches
        ]
        if rest and beat_first:
            result = self._head_result(self._run([head])[0])
            if result.status != "ok":
                return result
            replies = self._run([*self._leave_earlier(writer, result, items), *rest])[-len(rest) :]
        else:
            replies = self._run([head, *rest])
            result = self._head_result(replies.pop(0))
        need = (*result.need_full, *(str(r) for reply in replies for r in reply[0]))
        epochs = dict(result.epochs)
        for reply in replies:
            epochs.update(_epochs(reply[1]))
        return dataclasses.replace(result, need_full=need, epochs=epochs)

    def _leave_earlier(
        self, writer: Writer, result: FlushResult, items: Sequence[tuple[str, Entry]]
    ) -> list[tuple[Script, list[str], list[Any]]]:
        """Before a new incarnation's regions that its beat went ahead of: the live gauges
        of a live earlier incarnation leave those regions (as ``lua/flush.lua`` does for
        the ones it writes with the beat), also where its stats hash is gone."""
        if result.stale_live == "0":
            return []
        args = [writer.instance_id, "0", writer.token, result.stale_live]
        earlier = set(result.stale)
        return [
            (self._depart_regions, self.keys.region(writer.instance_id, region), args)
            for region, _ in items
            if region in earlier
        ]

    @staticmethod
    def _beat_result(reply: Any) -> FlushResult:
        now, status, stale, rebuild, stale_live = reply[:5]
        stale = tuple(str(r) for r in stale)
        return FlushResult(
            float(now), str(status), stale, rebuild=rebuild == "1", stale_live=str(stale_live)
        )

    @classmethod
    def _head_result(cls, reply: Any) -> FlushResult:
        """beat.lua's reply, or flush.lua's (which adds the regions that need a full entry)."""
        result = cls._beat_result(reply)
        if len(reply) <= 5:
            return result
        need = tuple(str(r) for r in reply[5])
        return dataclasses.replace(result, need_full=need, epochs=_epochs(reply[6]))

    def heartbeat(self, writer: Writer) -> FlushResult:
        """Beat the heartbeat (Redis server time) without writing statistics; an
        incarnation that has written nothing yet stays unregistered."""
        reply = self._beat(keys=self.keys.beat(writer.instance_id), args=writer.header(False))
        return self._beat_result(reply)

    def leave_stale(self, writer: Writer, regions: Sequence[str], *, live: str = "0") -> None:
        """Take the regions that earlier incarnations under ``writer``'s id reported, and
        ``writer`` has not written, out of the live gauges; then stop listing them.
        ``live``: ``"1"`` when the earlier incarnation had not departed (a stats hash of it
        that is gone left its live gauges behind), ``"m"`` when Redis also lost its regions
        set (see :attr:`FlushResult.stale_live`)."""
        valid = sorted(r for r in set(regions) if valid_name(r))
        args = [writer.instance_id, "0", writer.token, live]
        if self.redis_cluster:
            calls = [
                (self._depart_regions, self.keys.region(writer.instance_id, r), args) for r in valid
            ]
        else:
            keys = [k for r in valid for k in self.keys.region(writer.instance_id, r)]
            calls = [(self._depart_regions, keys, args)] if keys else []
        if calls:
            self._run(calls)
        self._run([(self._settled, [self.keys.meta(writer.instance_id)], [writer.token])])

    def _run(self, calls: Sequence[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """Run script calls in one non-transactional pipeline (a Redis Cluster groups them
        per node); a node that lacks a script (new, or promoted by a failover) gets every
        script loaded and the calls it refused run again. Raises the first error."""
        replies = self._pipeline_scripts(calls)
        refused = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            for script in {id(calls[n][0]): calls[n][0] for n in refused}.values():
                self.client.script_load(script.script)  # on every primary of a Redis Cluster
            for n, reply in zip(refused, self._pipeline_scripts([calls[n] for n in refused])):
                replies[n] = reply
        for (script, _, _), reply in zip(calls, replies):
            if isinstance(reply, Exception):
                raise _named(reply, script)
        return replies

    def _pipeline_scripts(self, calls: Sequence[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        pipe = pipeline(self.client)
        for script, keys, args in calls:
            # queued as a plain command: redis-py's Redis Cluster pipeline has no evalsha(), yet
            # it routes EVALSHA by its keys (which must share one hash slot)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    def depart(
        self,
        instance_id: str,
        *,
        max_age: float | None = None,
        remove: bool = False,
        regions: Sequence[str] = (),
    ) -> bool:
        """Take the instance's gauges out of the totals (if its heartbeat is older than
        ``max_age``); with ``remove``, delete its keys and heartbeat. Counters stay.
        ``regions``: regions the instance wrote besides those Redis lists for it (the
        writer's own, in case the list was lost)."""
        age = "" if max_age is None else repr(float(max_age))
        if self.redis_cluster:
            return self._depart_redis_cluster(instance_id, age, remove, regions)
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(self.keys.instance_regions(instance_id))
        pipe.hget(self.keys.meta(instance_id), "live")
        members, live = pipe.execute(raise_on_error=False)
        # not a set: nothing to take out but the heartbeat
        listed = [] if isinstance(members, Exception) else _strs(members)
        lost = not listed and live == "1"  # Redis lost its regions set: every region
        if lost:
            listed = self._all_regions()
        valid = {r for r in regions if valid_name(r)}
        keys = self.keys.instance(instance_id, sorted(valid.union(listed)))
        args = [instance_id, age, "1" if remove else "0", "m" if lost else ""]
        return bool(self._depart(keys=keys, args=args))

    def _all_regions(self) -> list[str]:
        """Every region Redis lists (an instance whose regions set is lost may be in any)."""
        try:
            return [r for r in _strs(self.client.smembers(self.keys.regions)) if valid_name(r)]
        except redis.ResponseError:
            return []

    def _depart_redis_cluster(
        self, instance_id: str, age: str, remove: bool, extra: Sequence[str]
    ) -> bool:
        # 1. is it due, and its regions; 2. the regions (one call per slot, pipelined);
        # 3. only then the instance keys, so a failure in 2 leaves it to be reaped again
        keys = [
            self.keys.instances,
            self.keys.meta(instance_id),
            self.keys.instance_regions(instance_id),
        ]
        (due,) = self._run([(self._depart_instance, keys, [instance_id, age, "check"])])
        if due is None:
            return False
        live, regions = due
        if live == "1" and not regions:  # Redis lost its regions set: every region
            live, regions = "m", self._all_regions()
        flag = "1" if remove else "0"
        calls = [
            (
                self._depart_regions,
                self.keys.region(instance_id, region),
                [instance_id, flag, "", live, "1" if age else ""],
            )
            for region in sorted(set(regions).union(extra))
            if valid_name(region)
        ]
        self._run(calls)
        phase = "remove" if remove else "keep"
        (done,) = self._run([(self._depart_instance, keys, [instance_id, age, phase])])
        return bool(done)

    def reap(self, instance_timeout: float, expired: Sequence[str] | None = None) -> list[str]:
        """Take every instance whose heartbeat expired (or those of ``expired``) out of the
        live gauges; returns them."""
        if expired is None:
            now = self.server_time()
            expired = _strs(
                self.client.zrangebyscore(self.keys.instances, "-inf", now - instance_timeout)
            )
        if not expired:
            return []
        pipe = self.client.pipeline(transaction=False)
        for instance_id in expired:
            pipe.hget(self.keys.meta(instance_id), "live")
            pipe.exists(self.keys.instance_regions(instance_id))
        flags = pipe.execute(raise_on_error=False)
        return [
            instance_id
            for instance_id, live, listed in zip(expired, flags[::2], flags[1::2])
            # live, or its meta hash lost while its regions set is not
            if (live == "1" or (live is None and listed == 1))
            and self.depart(instance_id, max_age=instance_timeout)
        ]

    def cleanup(self, retention_period: float) -> list[str]:
        """Delete instances whose heartbeat is older than ``retention_period``; returns them."""
        now = self.server_time()
        old = _strs(self.client.zrangebyscore(self.keys.instances, "-inf", now - retention_period))
        return [i for i in old if self.depart(i, max_age=retention_period, remove=True)]

    def acknowledge_losses(self) -> list[str]:
        """Acknowledge every data loss reported so far (health is no longer Degraded for
        them; the loss counters are unchanged); returns the regions that had any."""
        regions = sorted(self._all_regions())
        calls: list[tuple[Script, list[str], list[Any]]] = [
            (self._acknowledge, [self.keys.aggregate(r)], []) for r in regions
        ]
        replies = self._run(calls) if calls else []
        return [region for region, done in zip(regions, replies) if done == 1]

    # -- reads --------------------------------------------------------------------------

    def server_time(self) -> float:
        """Redis server time in seconds."""
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def read_cluster(self, instance_timeout: float, *, reap: bool = False) -> ClusterData:
        """Liveness and the cluster totals of every region, in two round trips whatever
        the number of instances (live ones are counted by Redis, not listed); with
        ``reap``, expired instances leave the live gauges before the totals are read.

        Keys of the wrong type or malformed entries are skipped and listed in ``errors``.
        """
        keys = [self.keys.instances, self.keys.regions, self.keys.flush_errors]
        ((seconds, micros, active, missing, members, bad, failed),) = self._run(
            [(self._liveness, keys, [instance_timeout, self.keys.meta("")])]
        )
        errors: list[str] = [
            f"{self.keys.instances}: removed member {str(m)[:40]!r} (no live instance)" for m in bad
        ]
        for key, (ok, reply) in (
            (self.keys.instances, missing),
            (self.keys.regions, members),
            (self.keys.flush_errors, failed),
        ):
            if not ok:
                errors.append(f"{key}: {reply}")
        flush_errors: dict[str, int] = {}
        if failed[0]:
            for kind, count in zip(failed[1][::2], failed[1][1::2]):
                if re.fullmatch(r"\w{1,40}", kind) and count.isdigit():
                    flush_errors[kind] = int(count)
                else:
                    errors.append(f"{self.keys.flush_errors}: bad entry {kind[:40]!r}")
        regions: list[str] = []
        if members[0]:
            regions = sorted(r for r in members[1] if valid_name(r))
            errors += [
                f"{self.keys.regions}: invalid region {r[:40]!r}"
                for r in members[1]
                if not valid_name(r)
            ]
        expired = self._valid_beats(_pairs(missing[1]) if missing[0] else [], errors)
        reap_error = None
        if reap and expired:
            try:
                self.reap(instance_timeout, sorted(expired))
            except redis.ResponseError as exc:  # a refused write (OOM, READONLY, ACL)
                reap_error = explain(exc)
        aggregates: dict[str, dict[str, str]] = {}
        continuity: dict[str, dict[str, str]] = {}
        for region, reply, record in zip(regions, *self._read_aggregates(regions)):
            if isinstance(reply, Exception):
                errors.append(f"{self.keys.aggregate(region)}: {reply}")
            elif reply:
                aggregates[region] = reply
            if isinstance(record, Exception):  # written again by a reader that knows it
                errors.append(f"{self.keys.continuity(region)}: {record}")
            elif reply:
                continuity[region] = record
        return ClusterData(
            float(seconds) + int(micros) / 1e6,
            int(active[1]) if active[0] else 0,
            expired,
            aggregates,
            tuple(errors),
            reap_error,
            flush_errors,
            continuity,
        )

    def _read_aggregates(self, regions: list[str]) -> tuple[list[Hash], list[Hash]]:
        """The aggregated hash and the continuity record of each region; errors are
        returned, not raised."""
        keys = [k for r in regions for k in (self.keys.aggregate(r), self.keys.continuity(r))]
        if not regions:
            return [], []
        if self.redis_cluster:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            replies: list[Hash] = list(pipe.execute(raise_on_error=False))
        else:
            step = 2 * self.batch_size  # so that no script call holds Redis for long
            calls: list[tuple[Script, list[str], list[Any]]] = [
                (self._aggregates, keys[i : i + step], []) for i in range(0, len(keys), step)
            ]
            replies = [
                dict(zip(flat[::2], flat[1::2])) if ok else redis.ResponseError(flat)
                for chunk in self._run(calls)
                for ok, flat in chunk
            ]
        return replies[::2], replies[1::2]

    def share_continuity(
        self, region: str, expected: str, record: dict[str, str]
    ) -> dict[str, str]:
        """Write a region's continuity ``record`` unless its epoch in Redis is no longer
        ``expected`` (``""``: there was none): a compare-and-set, so that of two readers
        that saw one data loss only the first adds it. Returns the record Redis holds."""
        (reply,) = self._run(
            [
                (
                    self._continuity,
                    [self.keys.continuity(region), self.keys.aggregate(region)],
                    [expected, *(x for pair in record.items() for x in pair)],
                )
            ]
        )
        return record if reply == 1 else dict(zip(reply[::2], reply[1::2]))

    def heartbeats(self) -> Heartbeats:
        """Every registered instance's heartbeat (lists them all: one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("TIME")  # a Redis Cluster pipeline has no time(): one node's clock
        _zrange(pipe, self.keys.instances)
        (seconds, micros), reply = pipe.execute(raise_on_error=False)
        errors: list[str] = []
        if isinstance(reply, Exception):
            errors.append(f"{self.keys.instances}: {reply}")
            reply = []
        beats = self._valid_beats(_pairs(reply), errors)
        return Heartbeats(float(seconds) + micros / 1e6, beats, tuple(errors))

    def _valid_beats(self, pairs: list[tuple[str, float]], errors: list[str]) -> dict[str, float]:
        beats = {}
        for member, score in pairs:
            if valid_name(member) and math.isfinite(score):
                beats[member] = score
            else:
                errors.append(f"{self.keys.instances}: invalid member {member[:40]!r}")
        return beats

    def read_hit_ratios(
        self, regions: Sequence[str]
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """``{region: {instance_id: hit ratio}}`` of live instances (stored x 100), pipelined,
        and the malformed entries skipped."""
        if not regions:
            return {}, []
        pipe = self.client.pipeline(transaction=False)
        for region in regions:
            _zrange(pipe, self.keys.hit_rates(region))
        result: dict[str, dict[str, float]] = {}
        errors: list[str] = []
        valid: set[str] = set()  # the same instance ids recur in every region
        for region, reply in zip(regions, pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception):
                errors.append(f"{self.keys.hit_rates(region)}: {reply}")
                continue
            result[region] = rates = {}
            for member, rate in _pairs(reply):
                if member not in valid and valid_name(member):
                    valid.add(member)
                if member in valid and 0 <= rate <= 100:
                    rates[member] = rate / 100
                else:
                    errors.append(f"{self.keys.hit_rates(region)}: bad entry {member[:40]!r}")
        return result, errors

    def read_instances(
        self, instance_ids: Sequence[str], regions: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, str] | Exception]:
        """Every instance's hash of every region, pipelined; errors are returned, not raised."""
        pairs = [(i, r) for i in instance_ids for r in regions]
        if not pairs:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for instance_id, region in pairs:
            pipe.hgetall(self.keys.stats(instance_id, region))
        return dict(zip(pairs, pipe.execute(raise_on_error=False)))

    def read_request_counts(
        self, regions: Sequence[str]
    ) -> tuple[dict[str, dict[str, tuple[str, str]]], list[str]]:
        """``{region: {instance_id: (hit_count, miss_count)}}`` of the instances in each
        region's hit-ratio set (as stored, '' when absent), in one round trip, and the
        malformed entries skipped (as :meth:`read_hit_ratios` reports them)."""
        result: dict[str, dict[str, tuple[str, str]]] = {}
        errors: list[str] = []
        if not regions:
            return result, errors
        if self.redis_cluster:
            rates, errors = self.read_hit_ratios(regions)
            pairs = [(i, region) for region, by_instance in rates.items() for i in by_instance]
            for start in range(0, len(pairs), PASS_COMMANDS):  # bounded replies
                part = pairs[start : start + PASS_COMMANDS]
                pipe = self.client.pipeline(transaction=False)
                for instance_id, region in part:
                    pipe.hmget(self.keys.stats(instance_id, region), "hit_count", "miss_count")
                for (instance_id, region), reply in zip(part, pipe.execute(raise_on_error=False)):
                    hits, misses = ("x", "x") if isinstance(reply, Exception) else reply
                    result.setdefault(region, {})[instance_id] = (hits or "", misses or "")
            return result, errors
        prefix = self.keys.prefix + "stats:"
        assert self.keys.stats("i", "r") == f"{prefix}i:r"
        replies: list[Any] = []
        size, start = 1, 0  # regions per round trip, grown so that each takes pass_round_trip
        while start < len(regions):
            chunk = regions[start : start + size]
            began = time.monotonic()
            calls = [(self._counts, [self.keys.hit_rates(r)], [prefix, r]) for r in chunk]
            replies += self._run(calls)
            per_region = (time.monotonic() - began) / len(chunk)
            start += len(chunk)
            size = max(1, min(256, int(self.pass_round_trip / max(per_region, 1e-6))))
        for region, (ok, flat) in zip(regions, replies):
            key = self.keys.hit_rates(region)
            if not ok:
                errors.append(f"{key}: {flat}")
                continue
            result[region] = counts = {}
            for n in range(0, len(flat), 4):
                member, ratio = flat[n], float(flat[n + 1])
                if valid_name(member) and 0 <= ratio <= 100:
                    counts[member] = (flat[n + 2], flat[n + 3])
                else:
                    errors.append(f"{key}: bad entry {member[:40]!r}")
        return result, errors

    def read_samples(
        self, instance_ids: Sequence[str], region: str, count: int
    ) -> dict[str, list[float]]:
        """The last ``count`` raw response times (seconds) of each instance in ``region``;
        malformed entries are skipped."""
        if not instance_ids or count < 1:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for instance_id in instance_ids:
            pipe.lrange(self.keys.samples(instance_id, region), -count, -1)
        result: dict[str, list[float]] = {}
        for instance_id, reply in zip(instance_ids, pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception) or not reply:
                continue
            values = []
            for item in reply:
                try:
                    value = float(item)
                except ValueError:
                    continue
                if math.isfinite(value) and value >= 0:
                    values.append(value)
            result[instance_id] = values
        return result

    def ping(self) -> float:
        """Round-trip time of a PING in seconds (raises if Redis is unreachable)."""
        start = time.perf_counter()
        self.client.ping()
        return time.perf_counter() - start

    def used_memory(self) -> int:
        """``used_memory`` of ``INFO memory`` in bytes (summed over a Redis Cluster's primaries)."""
        if isinstance(self.client, RedisCluster):
            info = self.client.info("memory", target_nodes=RedisCluster.PRIMARIES)
            if "used_memory" in info:  # a Redis Cluster of one primary answers for it alone
                return int(info["used_memory"])
            return sum(int(node.get("used_memory", 0)) for node in info.values())
        return int(self.client.info("memory").get("used_memory", 0))

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()

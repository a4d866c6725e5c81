"""Every Redis call of the library, through the scripts of ``lua/`` and the key schema of
:mod:`.keys`.

What each script takes and returns is :mod:`.protocol`; what differs between a standalone
Redis and a Redis Cluster is one :class:`Topology` object, chosen when the store is made. A
write is one ``lua/flush.lua`` call on a standalone Redis; on a Redis Cluster one pipeline
of a ``lua/beat.lua`` call and one ``lua/regions.lua`` call per region (the same Lua
functions and the same argument layout, ``lua/lib.lua``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from . import protocol
from .config import ConnectionSettings, valid_name
from .connection import Client, connect, pipeline
from .keys import KeySchema
from .protocol import Call, Entry, FlushResult, Writer

__all__ = ["ClusterData", "Entry", "FlushResult", "Heartbeats", "Store", "Writer", "explain"]

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


def _script_source(*names: str) -> str:
    """``lib.lua`` followed by the named files of ``lua/``, as one script."""
    lua = files(__package__).joinpath("lua")
    return "\n".join(lua.joinpath(name).read_text() for name in ("lib.lua", *names))


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


#: ``{region: {instance_id: "<hit_count> <miss_count>"}}`` as stored
Counts = dict[str, dict[str, str]]


class Store:
    """Every Redis operation of the library, on one key schema (standalone or Redis Cluster)."""

    def __init__(
        self,
        client: Client,
        key_prefix: str = "conduit:",
        batch_size: int = 100,
        *,
        shard: str = "",
    ) -> None:
        self.client = client
        #: most regions one standalone flush script call updates (the rest follow in the
        #: same pipeline), so that no script holds Redis for long
        self.batch_size = batch_size
        #: what differs between a standalone Redis and a Redis Cluster (hash-tagged keys,
        #: one script call per hash slot); a ``shard`` of a Redis Cluster (:mod:`.shards`)
        #: holds every key under one tag, so it is written as a standalone Redis is
        redis_cluster = isinstance(client, RedisCluster)
        self.topology: Topology = (
            RedisClusterTopology() if redis_cluster and not shard else Standalone()
        )
        pool = getattr(client, "connection_pool", None)
        timeout = pool.connection_kwargs.get("socket_timeout") if pool is not None else None
        #: the per-instance pass's round trips take about this long (a quarter of the timeout)
        self.pass_round_trip = min(PASS_ROUND_TRIP, (timeout or PASS_ROUND_TRIP * 4) / 4)
        self.keys = KeySchema(key_prefix, redis_cluster=redis_cluster, shard=shard)
        self._scripts = {
            name: client.register_script(_script_source(*names))
            for name, names in protocol.SCRIPTS.items()
        }
        encoder = client.get_encoder()
        self._encoding: tuple[str, str] = (encoder.encoding, encoder.encoding_errors)

    @classmethod
    def from_settings(cls, settings: ConnectionSettings) -> Store:
        """A store on a new client for ``settings`` (one key schema: see
        :func:`.shards.open_store` for ``redis_cluster_shards``)."""
        return cls(connect(settings), settings.key_prefix, settings.batch_size)

    @property
    def parts(self) -> list[Store]:
        """The key schemas readers read one by one: this one (see :class:`.shards.Shards`)."""
        return [self]

    def of(self, instance_id: str) -> Store:
        """Where ``instance_id``'s keys are written: here."""
        return self

    home = of  # where they are read (see :meth:`.shards.Shards.home`)

    def discover(self) -> list[str]:
        """One keyspace: nothing to find (see :meth:`.shards.Shards.discover`)."""
        return []

    def record_layout(self) -> None:
        """One keyspace: nothing to record (see :meth:`.shards.Shards.record_layout`)."""

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
        head, rest, plain = self.topology.write(self, writer.instance_id, header, items, refresh)
        reads = [
            read
            for region, _ in plain
            for read in protocol.check_reads(self.keys, writer.instance_id, region)
        ]
        if (rest or reads) and beat_first:
            result = protocol.beat_result(self._run([head])[0])
            if result.status != "ok":
                return result
            leave = self._leave_earlier(writer, result, items)
            replies = self._run([*leave, *rest], reads)[len(leave) :]
        else:
            replies = self._run([head, *rest], reads)
            result = protocol.beat_result(replies.pop(0))
        need = list(result.need_full)
        epochs = dict(result.epochs)
        for reply in replies[: len(rest)]:
            refused, written = protocol.regions_result(reply)
            need += refused
            epochs.update(written)
        got = replies[len(rest) :]
        for n, (region, entry) in enumerate(plain):
            if not protocol.check_passed(writer.token, entry, got[2 * n], got[2 * n + 1]):
                need.append(region)
        return dataclasses.replace(result, need_full=tuple(need), epochs=epochs)

    def _leave_earlier(
        self, writer: Writer, result: FlushResult, items: Sequence[tuple[str, Entry]]
    ) -> list[Call]:
        """Before a new incarnation's regions that its beat went ahead of: the live gauges
        of a live earlier incarnation leave those regions (as ``lua/flush.lua`` does for
        the ones it writes with the beat), also where its stats hash is gone."""
        if result.stale_live == "0":
            return []
        earlier = set(result.stale)
        return self.topology.leave(
            self.keys,
            writer.instance_id,
            [region for region, _ in items if region in earlier],
            unless_token=writer.token,
            was_live=result.stale_live,
        )

    def heartbeat(self, writer: Writer) -> FlushResult:
        """Beat the heartbeat (Redis server time) without writing statistics; an
        incarnation that has written nothing yet stays unregistered."""
        call = protocol.beat(self.keys, writer.header(False), writer.instance_id, [])
        return protocol.beat_result(self._run([call])[0])

    def leave_stale(self, writer: Writer, regions: Sequence[str], *, live: str = "0") -> None:
        """Take the regions that earlier incarnations under ``writer``'s id reported, and
        ``writer`` has not written, out of the live gauges; then stop listing them.
        ``live``: ``"1"`` when the earlier incarnation had not departed (a stats hash of it
        that is gone left its live gauges behind), ``"m"`` when Redis also lost its regions
        set (see :attr:`FlushResult.stale_live`)."""
        valid = sorted(r for r in set(regions) if valid_name(r))
        calls = self.topology.leave(
            self.keys, writer.instance_id, valid, unless_token=writer.token, was_live=live
        )
        if calls:
            self._run(calls)
        self._run([protocol.settled(self.keys, writer.instance_id, writer.token)])

    def _run(self, calls: Sequence[Call], reads: Sequence[tuple[str, ...]] = ()) -> list[Any]:
        """Run script calls, then plain ``reads``, in one non-transactional pipeline (a
        Redis Cluster groups them per node); a node that lacks a script (new, or promoted by
        a failover) gets every script loaded and the calls it refused run again. Raises the
        first error of a script call; a read's error is its reply."""
        replies = self._pipeline_scripts(calls, reads)
        refused = [
            n for n, reply in enumerate(replies[: len(calls)]) if isinstance(reply, NoScriptError)
        ]
        if refused:
            names = {calls[n].script for n in refused}
            self._load([self._scripts[name] for name in names])
            for n, reply in zip(refused, self._pipeline_scripts([calls[n] for n in refused])):
                replies[n] = reply
        for call, reply in zip(calls, replies):
            if isinstance(reply, Exception):
                raise _named(reply, self._scripts[call.script])
        return replies

    def _load(self, scripts: list[Script]) -> None:
        """Load ``scripts`` where a call found them missing (on a Redis Cluster, every
        primary, with the node map read again first: a primary that lacks them is new or
        promoted, or took a slot over, and redis-py (6.0) may hold it for a replica after a
        slot migration)."""
        if isinstance(self.client, RedisCluster):
            self.client.nodes_manager.initialize()
        for script in scripts:
            self.client.script_load(script.script)

    def _pipeline_scripts(
        self, calls: Sequence[Call], reads: Sequence[tuple[str, ...]] = ()
    ) -> list[Any]:
        pipe = pipeline(self.client)
        encoding, errors = self._encoding
        for call in calls:
            # queued as a plain command: redis-py's Redis Cluster pipeline has no evalsha(), yet
            # it routes EVALSHA by its keys (which must share one hash slot). Text goes as
            # bytes, encoded as redis-py would: its encoder, a call per argument, costs about
            # as much again as the encoding (a flush of 10 regions has some 80: 65 keys)
            arguments = (*call.keys, *call.args)
            wire = [a.encode(encoding, errors) if type(a) is str else a for a in arguments]
            sha = self._scripts[call.script].sha
            pipe.execute_command("EVALSHA", sha, len(call.keys), *wire)
        for read in reads:
            pipe.execute_command(*read)
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
        extra = {r for r in regions if valid_name(r)}
        return self.topology.depart(self, instance_id, age, remove, extra)

    def _all_regions(self) -> list[str]:
        """Every region Redis lists (an instance whose regions set is lost may be in any)."""
        try:
            return [r for r in _strs(self.client.smembers(self.keys.regions)) if valid_name(r)]
        except redis.ResponseError:
            return []

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
        calls = [protocol.acknowledge(self.keys, r) for r in regions]
        replies = self._run(calls) if calls else []
        return [region for region, done in zip(regions, replies) if done == 1]

    # -- reads --------------------------------------------------------------------------

    def server_time(self) -> float:
        """Redis server time in seconds."""
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def read_cluster(self, instance_timeout: float, *, reap: bool = False) -> ClusterData:
        """Liveness and the cluster totals of every region, in two round trips whatever
        the number of instances (live ones are counted by Redis, not listed or read: see
        :meth:`remove_strays`); with ``reap``, expired instances leave the live gauges
        before the totals are read.

        Keys of the wrong type or malformed entries are skipped and listed in ``errors``.
        """
        ((seconds, micros, active, missing, members, failed),) = self._run(
            [protocol.liveness(self.keys, instance_timeout)]
        )
        errors: list[str] = []
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
            elif reply or record:  # a record without totals: what their loss took
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

    def remove_strays(self, instance_timeout: float) -> list[str]:
        """Check every heartbeat younger than ``instance_timeout`` (one read each, in one
        script call): members that are no live instance (foreign data, or an instance whose
        records Redis lost) are removed, so that :meth:`read_cluster`'s count is of live
        instances; returns them as errors to report."""
        (candidates,) = self._run([protocol.members(self.keys, instance_timeout)])
        members = [str(m) for m in candidates]
        try:  # each checked again with its keys declared, in one round trip
            done = self._run([protocol.stray(self.keys, m) for m in members]) if members else []
        except (redis.exceptions.TryAgainError, redis.exceptions.ClusterError):
            return []  # keys on two nodes (a slot in migration): the next pass checks again
        return [
            f"{self.keys.instances}: removed member {m[:40]!r} (no live instance)"
            for m, removed in zip(members, done)
            if removed
        ]

    def _read_aggregates(self, regions: list[str]) -> tuple[list[Hash], list[Hash]]:
        """The aggregated hash and the continuity record of each region; errors are
        returned, not raised."""
        keys = [k for r in regions for k in (self.keys.aggregate(r), self.keys.continuity(r))]
        replies = self.topology.read_hashes(self, keys) if keys else []
        return replies[::2], replies[1::2]

    def share_continuity(
        self, region: str, expected: str, record: dict[str, str]
    ) -> dict[str, str]:
        """Write a region's continuity ``record`` unless its epoch in Redis is no longer
        ``expected`` (``""``: there was none): a compare-and-set, so that of two readers
        that saw one data loss only the first adds it. Returns the record Redis holds."""
        (reply,) = self._run([protocol.continuity(self.keys, region, expected, record)])
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

    def read_request_counts(self, regions: Sequence[str]) -> tuple[Counts, list[str]]:
        """``{region: {instance_id: "<hit_count> <miss_count>"}}`` of the live instances in
        each region's counts hash (as stored: the caller parses them), one ``HGETALL`` per
        region, pipelined in round trips of about ``pass_round_trip`` (Redis answers a
        pipeline only when it has run all of it); members that are no instance id are
        skipped and reported."""
        result: Counts = {}
        errors: list[str] = []
        valid: set[str] = set()  # the same instance ids recur in every region
        size, start = 1, 0  # regions per round trip, grown so that each takes pass_round_trip
        while start < len(regions):
            chunk = regions[start : start + size]
            began = time.monotonic()
            pipe = self.client.pipeline(transaction=False)
            for region in chunk:
                pipe.hgetall(self.keys.counts(region))
            replies = pipe.execute(raise_on_error=False)
            per_region = (time.monotonic() - began) / len(chunk)
            start += len(chunk)
            size = max(1, min(256, int(self.pass_round_trip / max(per_region, 1e-6))))
            for region, reply in zip(chunk, replies):
                key = self.keys.counts(region)
                if isinstance(reply, Exception):
                    errors.append(f"{key}: {reply}")
                    continue
                valid.update(m for m in reply if m not in valid and valid_name(m))
                bad = [m for m in reply if m not in valid]
                for member in bad:
                    del reply[member]
                    errors.append(f"{key}: bad entry {member[:40]!r}")
                result[region] = reply
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


class Topology(Protocol):
    """What differs between a standalone Redis and a Redis Cluster, chosen once per store."""

    #: a write's region calls run beside its beat (so also when the beat refuses the write)
    regions_apart: bool

    def write(
        self,
        store: Store,
        instance_id: str,
        header: list[Any],
        items: list[tuple[str, Entry]],
        refresh: bool,
    ) -> tuple[Call, list[Call], list[tuple[str, Entry]]]:
        """One write: the call with the heartbeat, the other calls, and the checks sent as
        plain reads (:func:`protocol.check_reads`), all in one pipeline."""
        ...

    def leave(
        self, keys: KeySchema, instance_id: str, regions: Sequence[str], **how: Any
    ) -> list[Call]:
        """``lua/depart_regions.lua`` calls for ``regions`` (``how``: its options)."""
        ...

    def depart(
        self, store: Store, instance_id: str, age: str, remove: bool, extra: set[str]
    ) -> bool:
        """A whole departure (see :meth:`Store.depart`)."""
        ...

    def read_hashes(self, store: Store, keys: list[str]) -> list[Hash]:
        """The hashes named (aggregated hashes, continuity records); errors are returned,
        not raised."""
        ...


class Standalone:
    """One Redis: a write is one ``lua/flush.lua`` call (more regions than ``batch_size``
    follow as ``lua/regions.lua`` calls), a departure one ``lua/depart.lua`` call."""

    regions_apart = False

    def write(
        self,
        store: Store,
        instance_id: str,
        header: list[Any],
        items: list[tuple[str, Entry]],
        refresh: bool,
    ) -> tuple[Call, list[Call], list[tuple[str, Entry]]]:
        step = store.batch_size
        batches = [items[i : i + step] for i in range(0, len(items), step)] or [[]]
        head = protocol.flush(store.keys, header, instance_id, batches[0])
        rest = [
            protocol.regions(store.keys, header, instance_id, batch, with_sets=True)
            for batch in batches[1:]
        ]
        return head, rest, []  # a check costs least inside the one script call

    def leave(
        self, keys: KeySchema, instance_id: str, regions: Sequence[str], **how: Any
    ) -> list[Call]:
        return [protocol.depart_regions(keys, instance_id, regions, **how)] if regions else []

    def depart(
        self, store: Store, instance_id: str, age: str, remove: bool, extra: set[str]
    ) -> bool:
        pipe = store.client.pipeline(transaction=False)
        pipe.smembers(store.keys.instance_regions(instance_id))
        pipe.hget(store.keys.meta(instance_id), "live")
        members, live = pipe.execute(raise_on_error=False)
        # not a set: nothing to take out but the heartbeat
        listed = [] if isinstance(members, Exception) else _strs(members)
        lost = not listed and live == "1"  # Redis lost its regions set: every region
        if lost:
            listed = store._all_regions()
        regions = sorted(extra.union(listed))
        (done,) = store._run([protocol.depart(store.keys, instance_id, regions, age, remove, lost)])
        return bool(done)

    def read_hashes(self, store: Store, keys: list[str]) -> list[Hash]:
        step = store.batch_size  # so that no script call holds Redis for long
        calls = [protocol.aggregates(keys[i : i + step]) for i in range(0, len(keys), step)]
        return [
            dict(zip(flat[::2], flat[1::2])) if ok else redis.ResponseError(flat)
            for chunk in store._run(calls)
            for ok, flat in chunk
        ]


class RedisClusterTopology:
    """A Redis Cluster: every script call stays in one hash slot, so a write is a
    ``lua/beat.lua`` call (slot ``{global}``) and one ``lua/regions.lua`` call per region
    (slot ``{<region>}``) in one pipeline; a departure checks the instance, takes out each
    region, then marks or removes the instance (``lua/redis_cluster_depart.lua``)."""

    regions_apart = True

    def write(
        self,
        store: Store,
        instance_id: str,
        header: list[Any],
        items: list[tuple[str, Entry]],
        refresh: bool,
    ) -> tuple[Call, list[Call], list[tuple[str, Entry]]]:
        head = protocol.beat(store.keys, header, instance_id, items)
        # a check that renews no TTL is two plain reads, not a script call in its slot
        checks = [(r, e) for r, e in items if e.is_check and not refresh]
        rest = [
            protocol.regions(store.keys, header, instance_id, [(r, e)], with_sets=False)
            for r, e in items
            if not (e.is_check and not refresh)
        ]
        return head, rest, checks

    def leave(
        self, keys: KeySchema, instance_id: str, regions: Sequence[str], **how: Any
    ) -> list[Call]:
        return [protocol.depart_regions(keys, instance_id, [r], **how) for r in regions]

    def depart(
        self, store: Store, instance_id: str, age: str, remove: bool, extra: set[str]
    ) -> bool:
        # 1. is it due, and its regions; 2. the regions (one call per slot, pipelined);
        # 3. only then the instance keys, so a failure in 2 leaves it to be reaped again
        keys = store.keys
        (due,) = store._run([protocol.redis_cluster_depart(keys, instance_id, age, "check")])
        if due is None:
            return False
        live, regions = due
        if live == "1" and not regions:  # Redis lost its regions set: every region
            live, regions = "m", store._all_regions()
        valid = sorted(r for r in extra.union(regions) if valid_name(r))
        store._run(self.leave(keys, instance_id, valid, remove=remove, was_live=live))
        phase = "remove" if remove else "keep"
        (done,) = store._run([protocol.redis_cluster_depart(keys, instance_id, age, phase)])
        return bool(done)

    def read_hashes(self, store: Store, keys: list[str]) -> list[Hash]:
        pipe = store.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return list(pipe.execute(raise_on_error=False))

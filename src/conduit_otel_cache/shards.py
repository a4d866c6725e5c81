"""A Redis Cluster's statistics, in the layout by region or in S shards by instance
(``redis_cluster_shards``: for fleets that outgrow one primary), read across every layout
in use.

In the layout by region (``redis_cluster_shards`` 0, the default) a region's keys share the
slot ``{<region>}`` and an instance's the slot ``{global}``, so a flush is one script call
per changed region and one for the heartbeat. With S shards, each instance belongs to one
shard (by a hash of its id), and every key of the instance, with its shard's part of the
totals of every region it writes to, lives under its shard's hash tag, named as on a
standalone Redis. A flush is then one ``lua/flush.lua`` call, as on a standalone Redis, and
the shards' tags are chosen so that their slots spread evenly over the slot range (on Redis
Cluster's even split, over the primaries).

Each keyspace (the layout by region, or one shard) is a
:class:`~conduit_otel_cache.store.Store`; :class:`Shards` sends an instance's operations to
the keyspace its layout gives it, and runs a reader's on every keyspace in use, adding them
up: a region's totals are the sum of its parts, each kept monotonic across a data loss on
its own (continuity.py), the live instances are those of every heartbeat set. Writers
record their layout (``<prefix>cache:layouts``: layout -> when last recorded), so that
readers read the layout by region and every layout written within ``statistics_ttl``,
whatever their own: instances of several layouts (a rolling change of
``redis_cluster_shards``) add up exactly.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .config import MAX_SHARDS, ConnectionSettings
from .connection import Client, connect
from .protocol import FlushResult, Writer
from .store import Counts, Heartbeats, Store, Topology

__all__ = ["Shards", "open_store", "shard_tags"]


def open_store(settings: ConnectionSettings) -> Store | Shards:
    """The store of ``settings``, on a new client: :class:`Shards` on a Redis Cluster, else
    one :class:`~conduit_otel_cache.store.Store`."""
    client = connect(settings)
    if not isinstance(client, RedisCluster):
        return Store(client, settings.key_prefix, settings.batch_size)
    return Shards(
        client, settings.key_prefix, settings.batch_size, settings.redis_cluster_shards,
        ttl=settings.statistics_ttl,
    )  # fmt: skip


def shard_tags(count: int) -> list[str]:
    """The hash tags of ``count`` shards: shard k's is the first ``s<k>.<n>`` whose slot lies
    in the middle half of the k-th of ``count`` equal parts of the slot range (so that a
    split of the slots that differs by a few from equal parts still puts it in the k-th)."""
    tags = []
    for k in range(count):
        width = REDIS_CLUSTER_HASH_SLOTS / count
        low, high = (k + 0.25) * width, (k + 0.75) * width
        n = 0
        while not low <= key_slot(f"s{k}.{n}".encode()) < high:
            n += 1
        tags.append(f"s{k}.{n}")
    return tags


class Shards:
    """The statistics of one ``key_prefix`` on a Redis Cluster: written in the layout of
    ``count`` (0: by region, else that many shards), read in every layout in use."""

    def __init__(
        self,
        client: Client,
        key_prefix: str = "conduit:",
        batch_size: int = 100,
        count: int = 0,
        *,
        ttl: float = 86_400.0,
    ) -> None:
        self.client = client
        self.count = count
        #: how long a layout's record lasts (``statistics_ttl``: its keys' lifetime)
        self.ttl = ttl
        self._prefix, self._batch = key_prefix, batch_size
        self._stores: dict[str, Store] = {}  # by shard tag ("": the layout by region)
        self.own = self._layout(count)
        self.layouts_key = self.own[0].keys.layouts
        #: the keyspaces readers read (:meth:`discover` finds them)
        self.parts = [*self._layout(0), *self._layout(count)] if count else self.own
        self.topology: Topology = self.own[0].topology
        self._where: dict[str, Store] = {}  # instance id -> where its heartbeat was read

    def _layout(self, count: int) -> list[Store]:
        """The keyspaces of a layout (one store per shard tag, made once)."""
        tags = shard_tags(count) if count else [""]
        for tag in tags:
            if tag not in self._stores:
                self._stores[tag] = Store(self.client, self._prefix, self._batch, shard=tag)
        return [self._stores[tag] for tag in tags]

    def record_layout(self) -> None:
        """Record that this layout is written (a writer's first write, and every renewal
        of its TTLs): one round trip."""
        now, seconds = time.time(), max(1, math.ceil(self.ttl))
        pipe = self.client.pipeline(transaction=False)  # type: ignore[no-untyped-call, unused-ignore]
        pipe.zadd(self.layouts_key, {str(self.count): now})
        pipe.zremrangebyscore(self.layouts_key, "-inf", now - self.ttl)
        pipe.expire(self.layouts_key, seconds)
        pipe.execute()

    def discover(self) -> list[str]:
        """Read the layouts written within ``statistics_ttl``: :attr:`parts` becomes the
        layout by region, this one and those; returns the malformed records (skipped)."""
        counts, errors = {0, self.count}, []
        try:
            members = self.client.zrangebyscore(self.layouts_key, time.time() - self.ttl, "+inf")
        except redis.ResponseError as exc:  # not a sorted set: the keyspaces known so far
            return [f"{self.layouts_key}: {exc}"]
        for member in members:
            text = str(member)
            if text.isdigit() and int(text) <= MAX_SHARDS:
                counts.add(int(text))
            else:
                errors.append(f"{self.layouts_key}: invalid layout {text[:20]!r}")
        parts: list[Store] = []
        for count in sorted(counts):
            parts += [part for part in self._layout(count) if part not in parts]
        self.parts = parts
        return errors

    def of(self, instance_id: str) -> Store:
        """The keyspace this layout gives ``instance_id`` (where it writes)."""
        return self.own[zlib.crc32(instance_id.encode()) % len(self.own)]

    def home(self, instance_id: str) -> Store:
        """Where ``instance_id``'s keys were read last (:meth:`heartbeats`), else where this
        layout puts them."""
        return self._where.get(instance_id) or self.of(instance_id)

    # -- an instance's operations: where its layout puts it ---------------------------

    def flush(self, writer: Writer, entries: Any, **options: Any) -> FlushResult:
        """:meth:`Store.flush` in the writer's shard."""
        return self.of(writer.instance_id).flush(writer, entries, **options)

    def heartbeat(self, writer: Writer) -> FlushResult:
        """:meth:`Store.heartbeat` in the writer's shard."""
        return self.of(writer.instance_id).heartbeat(writer)

    def leave_stale(self, writer: Writer, regions: Sequence[str], *, live: str = "0") -> None:
        """:meth:`Store.leave_stale` in the writer's shard."""
        self.of(writer.instance_id).leave_stale(writer, regions, live=live)

    def depart(self, instance_id: str, **options: Any) -> bool:
        """:meth:`Store.depart` in the instance's shard."""
        return self.of(instance_id).depart(instance_id, **options)

    def read_instances(
        self, instance_ids: Sequence[str], regions: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, str] | Exception]:
        """:meth:`Store.read_instances`, each instance where it is (:meth:`home`)."""
        result: dict[tuple[str, str], dict[str, str] | Exception] = {}
        for part, ids in self._by_shard(instance_ids):
            result.update(part.read_instances(ids, regions))
        return result

    def read_samples(
        self, instance_ids: Sequence[str], region: str, count: int
    ) -> dict[str, list[float]]:
        """:meth:`Store.read_samples`, each instance where it is (:meth:`home`)."""
        result: dict[str, list[float]] = {}
        for part, ids in self._by_shard(instance_ids):
            result.update(part.read_samples(ids, region, count))
        return result

    def _by_shard(self, instance_ids: Sequence[str]) -> list[tuple[Store, list[str]]]:
        groups: dict[Store, list[str]] = {}
        for instance_id in instance_ids:
            groups.setdefault(self.home(instance_id), []).append(instance_id)
        return list(groups.items())

    # -- readers: every keyspace in use ---------------------------------------------

    def reap(self, instance_timeout: float) -> list[str]:
        """:meth:`Store.reap` in every keyspace in use."""
        self.discover()
        return [i for part in self.parts for i in part.reap(instance_timeout)]

    def cleanup(self, retention_period: float) -> list[str]:
        """:meth:`Store.cleanup` in every keyspace in use."""
        self.discover()
        return [i for part in self.parts for i in part.cleanup(retention_period)]

    def acknowledge_losses(self) -> list[str]:
        """:meth:`Store.acknowledge_losses` in every keyspace in use; the regions that had
        any."""
        self.discover()
        return sorted({r for part in self.parts for r in part.acknowledge_losses()})

    def remove_strays(self, instance_timeout: float) -> list[str]:
        """:meth:`Store.remove_strays` in every shard."""
        return [e for part in self.parts for e in part.remove_strays(instance_timeout)]

    def heartbeats(self) -> Heartbeats:
        """Every keyspace's heartbeats, at the first one's server time (an id in two, as
        after a change of layout, with its latest); remembers where each id is."""
        beats: dict[str, float] = {}
        where: dict[str, Store] = {}
        errors: list[str] = []
        server_time = None
        for part in self.parts:
            read = part.heartbeats()
            server_time = read.server_time if server_time is None else server_time
            errors += read.errors
            for instance_id, beat in read.beats.items():
                if beat >= beats.get(instance_id, -math.inf):
                    beats[instance_id], where[instance_id] = beat, part
        self._where = where
        return Heartbeats(server_time or 0.0, beats, tuple(errors))

    def read_request_counts(self, regions: Sequence[str]) -> tuple[Counts, list[str]]:
        """:meth:`Store.read_request_counts` of every keyspace, by region."""
        result: Counts = {}
        errors: list[str] = []
        for part in self.parts:
            counts, bad = part.read_request_counts(regions)
            errors += bad
            for region, by_instance in counts.items():
                result.setdefault(region, {}).update(by_instance)
        return result, errors

    def server_time(self) -> float:
        """Redis server time in seconds."""
        return self.own[0].server_time()

    def ping(self) -> float:
        """Round-trip time of a PING in seconds."""
        return self.own[0].ping()

    def used_memory(self) -> int:
        """``used_memory`` summed over the primaries."""
        return self.own[0].used_memory()

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()
